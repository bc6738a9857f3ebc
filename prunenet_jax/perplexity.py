"""Perplexity and top-1 next-token accuracy in JAX: non-overlapping windows (formats/texts.py),
jitted, batched with a padding mask."""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prunenet_jax import progress
from prunenet_jax.errors import UserError
from prunenet_jax.formats.texts import tokenize, windows
from prunenet_jax.models import decoder


# Upper bounds of the eval flags: beyond them an array shape overflows or memory runs out.
MAX_SEQ_LEN, MAX_BATCH, MAX_TOKENS = 2**20, 2**16, 2**40


@functools.partial(jax.jit, static_argnums=0)
def _window_nll(graphdef, state, tokens, mask):
    """Summed next-token negative log-likelihood, the number of scored targets, and how many of
    them are the model's top-1 prediction."""
    logits = nnx.merge(graphdef, state)(tokens, mask)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    valid = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    hits = (jnp.argmax(logits, axis=-1) == tokens[:, 1:]).astype(jnp.float32)
    return jnp.sum(nll * valid), jnp.sum(valid), jnp.sum(hits * valid)


class Scorer:
    """Scores windows; one compilation per model structure and (batch, seq_len) shape, shared by
    every Scorer (models of equal shapes, e.g. a batch of checkpoints, do not recompile)."""

    def __init__(self, model: nnx.Module):
        self.graphdef, self.state = nnx.split(model)

    def nll(self, tokens: np.ndarray, mask: np.ndarray, batch_size: int) -> tuple[float, int]:
        """(summed NLL, scored targets)."""
        total, count, _ = self.score(tokens, mask, batch_size)
        return total, count

    def score(self, tokens: np.ndarray, mask: np.ndarray, batch_size: int) -> tuple[float, int, int]:
        """(summed NLL, scored targets, top-1 hits)."""
        total, count, hits = 0.0, 0, 0
        for start in progress.over(range(0, len(tokens), batch_size), "perplexity", "batch"):
            t, m = tokens[start:start + batch_size], mask[start:start + batch_size]
            pad = batch_size - len(t)  # keep one shape, so one compilation
            if pad:
                t = np.concatenate([t, np.zeros((pad, t.shape[1]), t.dtype)])
                m = np.concatenate([m, np.zeros((pad, m.shape[1]), m.dtype)])
            s, c, h = _window_nll(self.graphdef, self.state, jnp.asarray(t), jnp.asarray(m))
            total += float(s)
            count += int(c)
            hits += int(h)
        return total, count, hits


def perplexity(model: nnx.Module, tokenizer, texts: dict[str, str], seq_len: int = 512,
               batch_size: int = 4, max_tokens: Optional[int] = None) -> dict:
    """{"ppl": over all texts, "tokens": scored targets, "accuracy": top-1 next-token accuracy,
    "files": {name: {"ppl", "tokens", "accuracy"}}}."""
    if batch_size < 1:
        raise UserError(f"--batch_size={batch_size} must be at least 1")
    scorer = Scorer(model)
    files, total_nll, total_count, total_hits = {}, 0.0, 0, 0
    for name, text in texts.items():
        tokens, mask = windows(tokenize(tokenizer, text, max_tokens), seq_len)
        if len(tokens) == 0:
            raise UserError(f"eval text {name} has fewer than 2 tokens; pass a longer text")
        nll, count, hits = scorer.score(tokens, mask, batch_size)
        files[name] = {"ppl": _ppl(nll, count), "tokens": count, "accuracy": hits / count}
        total_nll += nll
        total_count += count
        total_hits += hits
    return {"ppl": _ppl(total_nll, total_count), "tokens": total_count,
            "accuracy": total_hits / total_count, "files": files}


def _ppl(nll: float, count: int) -> float:
    """exp(mean NLL); inf past float range (a broken model's, which math.exp would raise on) and
    nan for a NaN loss: reports and JSON writers show both as not measurable."""
    mean = nll / count
    return math.exp(mean) if mean < 709.0 else (math.inf if mean == mean else math.nan)


def accuracy_retention(accuracy: Optional[float], dense_accuracy: Optional[float]) -> Optional[float]:
    """The share of the dense model's top-1 accuracy a pruned model keeps (accuracy / dense);
    None when either is missing or the dense accuracy is 0 (nothing to keep a share of)."""
    if accuracy is None or not dense_accuracy:
        return None
    return accuracy / dense_accuracy


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How perplexity is measured: the texts (already read, see texts.read_texts), windows."""
    texts: dict  # name -> text
    name: str = ""  # what the texts were named by (--eval_text), for reports
    seq_len: int = 512
    batch_size: int = 4
    max_tokens: int = 0  # tokens per text; 0: all
    dtype: object = jnp.float32  # compute dtype

    def setting(self) -> dict:
        """What a ppl measured with this config is comparable by: the texts and the windows."""
        return {"text": self.name or ",".join(self.texts), "max_tokens": self.max_tokens,
                "seq_len": self.seq_len}

    def check(self) -> None:
        """Refuses bad values before anything heavy runs (the messages name the flags)."""
        if not 0 <= self.max_tokens <= MAX_TOKENS:
            raise UserError(f"--max_tokens={self.max_tokens} must be in [0, {MAX_TOKENS}] (0 "
                            "means all)")
        if not 2 <= self.seq_len <= MAX_SEQ_LEN:
            raise UserError(f"--seq_len={self.seq_len} must be in [2, {MAX_SEQ_LEN}] (512 is "
                            "typical)")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise UserError(f"--batch_size={self.batch_size} must be in [1, {MAX_BATCH}]")

    def check_model(self, config, source: str) -> None:
        """Refuses windows the model cannot take, from its config alone (before loading)."""
        table = config.max_position_embeddings
        if config.positions == "learned" and self.seq_len > table:  # OPT: a position table
            raise UserError(f"--seq_len={self.seq_len} exceeds the {table} learned positions "
                            f"(max_position_embeddings) of {source}; use --seq_len <= {table}")


def perplexity_fn(tokenizer, cfg: EvalConfig) -> Callable:
    """`weights -> perplexity result` (see `perplexity`) of a model built from ModelWeights, scored
    with `tokenizer` (the dense model's: pruning keeps the vocabulary)."""

    def measure(weights) -> dict:
        model = decoder.from_named_arrays(weights.config, weights.named_arrays(), dtype=cfg.dtype)
        return perplexity(model, tokenizer, cfg.texts, seq_len=cfg.seq_len,
                          batch_size=cfg.batch_size, max_tokens=cfg.max_tokens or None)

    return measure
