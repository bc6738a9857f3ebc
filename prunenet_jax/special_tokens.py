"""A model's BOS and EOS token ids, looked up once for everything that samples or starts text
(launch.generate, energy's calibration, recovery's distillation text, the report's continuation).

Looked up as transformers' `generate` does: an HF folder's generation_config.json wins over its
config.json where both name the token (config.json is built from metadata for GGUF); where
neither does, the tokenizer's. `tokenizer_fn()` loads the tokenizer, and is only called then.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

from prunenet_jax.files import json_files
from prunenet_jax.weights import ModelWeights

GENERATION_CONFIG = "generation_config.json"


def generation_config(weights: ModelWeights) -> dict:
    """The model folder's generation_config.json ({} where there is none)."""
    if not weights.tokenizer_dir:
        return {}
    path = os.path.join(weights.tokenizer_dir, GENERATION_CONFIG)
    if not os.path.isfile(path):
        return {}
    # transformers writes it (NaN/Infinity included, as Python's json does)
    return json_files.read_json(path, fix="fix or remove it", constants=True)


def _ids(value) -> list[int]:
    """A config's token id entry (an id, a list of ids, or null) as a list."""
    if value is None:
        return []
    return [int(i) for i in value] if isinstance(value, list) else [int(value)]


def _lookup(weights: ModelWeights, key: str, tokenizer_fn: Callable) -> list[int]:
    for config in (generation_config(weights), weights.hf_config):
        ids = _ids(config.get(key))
        if ids:
            return ids
    tokenizer = tokenizer_fn()
    return [] if tokenizer is None else _ids(getattr(tokenizer, key, None))


def bos_id(weights: ModelWeights, tokenizer_fn: Callable = lambda: None) -> Optional[int]:
    """The BOS id (the first, where a config lists several); None where nothing names one."""
    ids = _lookup(weights, "bos_token_id", tokenizer_fn)
    return ids[0] if ids else None


def eos_ids(weights: ModelWeights, tokenizer_fn: Callable = lambda: None) -> list[int]:
    """The EOS ids, sorted (a config may list several: end of text, end of turn)."""
    return sorted(set(_lookup(weights, "eos_token_id", tokenizer_fn)))
