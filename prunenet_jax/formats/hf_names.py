"""Canonical tensor names (models/registry.py) to and from a family's Hugging Face names, with
fused q/k/v tensors split on read and fused on write (models/fused_qkv.py)."""
from __future__ import annotations

import re
from typing import Iterator, Optional

import numpy as np

from prunenet_jax.models import families, fused_qkv, registry
from prunenet_jax.models.config import ModelConfig

# Canonical q/k/v tensors and their part of a fused tensor.
_QKV_PART = {registry.Q: 0, registry.K: 1, registry.V: 2,
             registry.Q_BIAS: 0, registry.K_BIAS: 1, registry.V_BIAS: 2}


def layer_source(cfg: ModelConfig, suffix: str) -> tuple[str, Optional[int]]:
    """The HF layer suffix canonical `suffix` is stored under, and its part (0 q, 1 k, 2 v) of a
    fused q/k/v tensor (None: stored whole)."""
    family = families.family_of(cfg.model_type)
    if family.fused_qkv and suffix in _QKV_PART:
        return f"{family.fused_qkv}.{suffix.rsplit('.', 1)[1]}", _QKV_PART[suffix]
    return family.hf_layer_name(cfg, suffix), None


def split_part(cfg: ModelConfig, fused: np.ndarray, part: int) -> np.ndarray:
    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    return fused_qkv.split(fused, heads, kv, d)[part]


def fused_shape(cfg: ModelConfig, suffix: str) -> tuple:
    """The HF shape of the fused tensor that holds canonical q/k/v `suffix`."""
    rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    return (rows, cfg.hidden_size) if suffix.endswith(".weight") else (rows,)


def global_name(cfg: ModelConfig, name: str) -> str:
    return families.family_of(cfg.model_type).hf_global_name(name)


def layer_pattern(cfg: ModelConfig) -> re.Pattern:
    """Matches an HF per-layer name; group 1 is the layer index, group 2 the suffix."""
    prefix = families.family_of(cfg.model_type).layer_prefix
    return re.compile("^" + re.escape(prefix).replace(re.escape("{}"), r"(\d+)") + "(.+)$")


def hf_named_arrays(cfg: ModelConfig, globals_: dict, layers: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) of every tensor: globals first, then layer by layer; a fused q/k/v is
    built per layer (one small copy), everything else is a view."""
    family = families.family_of(cfg.model_type)
    for name, array in globals_.items():
        yield global_name(cfg, name), array
    L = next(iter(layers.values())).shape[0] if layers else 0
    for i in range(L):
        prefix = family.layer_prefix.format(i)
        fused: dict[str, list] = {}
        for suffix, stacked in layers.items():
            hf_suffix, part = layer_source(cfg, suffix)
            if part is None:
                yield prefix + hf_suffix, stacked[i]
                continue
            fused.setdefault(hf_suffix, [None] * 3)[part] = stacked[i]
            if all(p is not None for p in fused[hf_suffix]):
                q, k, v = fused.pop(hf_suffix)
                yield prefix + hf_suffix, fused_qkv.fuse(q, k, v, cfg.num_attention_heads,
                                                         cfg.num_key_value_heads, cfg.head_dim)
