"""Calibration tokens for the `energy` mode: sampled from the dense model itself (`self`, no data),
or cut from the user's text (`--calibration=PATH_OR_GLOB`).

Self-generation: N sequences of T tokens at temperature 1 from one start token (the model's BOS,
special_tokens.py; where it has none, the first token of its chat template; else a seeded uniform
token), all N in one batched KV-cache decode (models/decode.py, `sample_rows`). The decode does
not stop at EOS: after an end-of-turn token the model starts its next turn, which is text it would
write too, and every row is T long.

The tokens are saved in the run folder (`calibration.npz`, with what made them), so a rerun or a
`--resume` reuses them instead of sampling again.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import os
import zipfile
from typing import Optional

import jax
import numpy as np

from prunenet_jax import progress, rng, special_tokens
from prunenet_jax.errors import UserError
from prunenet_jax.formats import texts
from prunenet_jax.models import decoder, decode
from prunenet_jax.files import atomic, json_files
from prunenet_jax.weights import ModelWeights

SELF = "self"
FILE = "calibration.npz"


# (sequences, seq_len) when --mode includes compensated: measured at 30% on the default model,
# its held-out-chosen fit gained 10.8 ppl over energy from 64 x 256 self-generated tokens and 2.7
# from the 16 x 128 default (bench/results/compensation_pool_*.json)
COMPENSATED_POOL = (64, 256)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Where the calibration tokens come from and how many: `sequences` x `seq_len` tokens."""
    source: str = SELF  # "self" or text files (comma list / globs, as --eval_text)
    sequences: int = 16
    seq_len: int = 128
    seed: int = 42

    def check(self, held_out: bool = False) -> None:
        """Refuses bad values and unreadable or empty texts, before anything is loaded.
        `held_out`: a mode holds rows out (compensated), so at least 2 are needed."""
        if self.sequences < 1:
            raise UserError(f"--calibration_sequences={self.sequences} must be at least 1")
        if held_out and self.sequences < 2:
            raise UserError(f"--calibration_sequences={self.sequences}: --mode=compensated holds "
                            "calibration rows out to choose its fit; pass 2 or more")
        if self.seq_len < 2:
            raise UserError(f"--calibration_seq_len={self.seq_len} must be at least 2")
        if self.source != SELF:
            self.read_text()

    def read_text(self) -> str:
        found = texts.read_texts(self.source, what="calibration text", flag="--calibration")
        return "".join(found.values())

    def describe(self) -> dict:
        """What the tokens depend on (recorded with them, with the scores and in the manifest)."""
        return {"source": self.source, "sequences": self.sequences, "seq_len": self.seq_len,
                **({"seed": self.seed} if self.source == SELF else {})}


def start_token(weights: ModelWeights, tokenizer_fn, seed: int) -> int:
    """BOS (special_tokens.bos_id: generation_config.json, config.json, else the tokenizer's);
    else the chat template's first token; else a seeded uniform token. `tokenizer_fn()` loads the
    tokenizer (only called when needed, at most once)."""
    tokenizer_fn = functools.cache(tokenizer_fn)
    bos = special_tokens.bos_id(weights, tokenizer_fn)
    if bos is not None:
        return bos
    tokenizer = tokenizer_fn()
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            return int(ids[0])
    key = rng.key(seed, rng.CALIBRATION)
    return int(jax.random.randint(key, (), 0, weights.config.vocab_size))


def self_generated(weights: ModelWeights, cal: Calibration, tokenizer_fn=lambda: None,
                   model: Optional[decoder.CausalLM] = None) -> np.ndarray:
    """(sequences, seq_len) int32: the start token then seq_len - 1 tokens sampled at temperature 1."""
    start = start_token(weights, tokenizer_fn, cal.seed)
    if model is None:
        model = decoder.from_named_arrays(weights.config, weights.named_arrays())
    seed = int(jax.random.randint(rng.key(cal.seed, rng.CALIBRATION), (), 0, 2**31 - 1))
    tokens, _ = decode.sample_rows(model, start, cal.sequences, cal.seq_len,
                                   seed_of_batch=lambda _: seed, eos_ids=(),
                                   desc="sampling calibration text")
    return tokens


def from_text(tokenizer, cal: Calibration) -> np.ndarray:
    """The first sequences x seq_len tokens of the user's text, as (n, seq_len) windows (fewer
    rows when the text is shorter; the last partial window is dropped unless it is the only one)."""
    ids = texts.tokenize(tokenizer, cal.read_text(), cal.sequences * cal.seq_len)
    if len(ids) < 2:
        raise UserError(f"--calibration={cal.source} has {len(ids)} token(s); pass a longer text")
    if len(ids) < cal.seq_len:
        return ids[None]
    return texts.windows(ids, cal.seq_len, full_only=True)[0]


def _saved(path: str, meta: dict) -> Optional[np.ndarray]:
    """The tokens saved at `path` when made by the same recipe `meta`, else None; a file that
    cannot be read gets a warning naming it (the tokens are made again)."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:  # tokens and a JSON string: no objects
            saved = json_files.loads(str(f["meta"]), source=f"{path} (its 'meta')",
                                     fix="the tokens are made again")
            return np.asarray(f["tokens"]) if saved == meta else None
    except UserError as e:
        reason = str(e)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        # it is written atomically: a foreign or damaged file
        reason = f"{path} is not a calibration file ({type(e).__name__}); the tokens are made again"
    progress.warning(f"the saved calibration tokens are not used: {reason}")
    return None


def _save(path: str, tokens: np.ndarray, meta: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, tokens=tokens, meta=json_files.dumps(meta))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic.atomic_write(path, lambda f: f.write(buffer.getvalue()))


def tokens_for(weights: ModelWeights, cal: Calibration, tokenizer_fn, folder: Optional[str] = None,
               model: Optional[decoder.CausalLM] = None) -> tuple[np.ndarray, bool]:
    """(tokens, reused): the calibration tokens of `weights`; with `folder`, those saved there by an
    earlier run of the same calibration and model are reused, and new ones are saved there."""
    meta = {**cal.describe(), "model": weights.source,
            "shape": [weights.config.num_hidden_layers, weights.config.intermediate_size,
                      weights.config.hidden_size]}
    path = os.path.join(folder, FILE) if folder else None
    if path and (saved := _saved(path, meta)) is not None:
        return saved, True
    if cal.source == SELF:
        tokens = self_generated(weights, cal, tokenizer_fn, model)
    else:
        tokens = from_text(tokenizer_fn(), cal)
    if path:
        _save(path, tokens, meta)
    return tokens, False
