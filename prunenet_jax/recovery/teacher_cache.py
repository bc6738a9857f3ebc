"""The teacher's top-k cache: for a dense model too big to keep beside the student, its top-k
next-token log-probs (bf16) over the whole pool are computed once, and the teacher is freed;
distillation then reads them with each batch instead of running the teacher."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from prunenet_jax import progress
from prunenet_jax.method import sharding
from prunenet_jax.models import decoder
from prunenet_jax.recovery import objectives
from prunenet_jax.recovery.config import RecoverConfig


def should_cache_teacher(cfg: RecoverConfig, student_bytes: int, teacher_bytes: int) -> bool:
    """--teacher_cache: on, off, or auto: cache the teacher's top-k (and free it) for distillation
    when the student's training state (fp32 parameters, gradient, two moments) and the teacher
    together would not fit the device budget (sharding.device_budget_bytes: 70% of one device's
    memory; never on CPU)."""
    if cfg.objective != "distill" or cfg.teacher_cache == "off":
        return False
    if cfg.teacher_cache == "on":
        return True
    budget = sharding.device_budget_bytes()
    return bool(budget) and 4 * student_bytes + teacher_bytes > budget


def pool_teacher_topk(teacher: decoder.CausalLM, tokens: np.ndarray, mask: np.ndarray, k: int,
                      batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-k next-token log-probs (bf16) and ids of every pool row, on the host."""
    graphdef, state = nnx.split(teacher)
    k = min(k, teacher.config.vocab_size)

    @jax.jit
    def run(state, tokens, mask):
        return objectives.teacher_topk(nnx.merge(graphdef, state)(tokens, mask), k)

    values, ids = [], []
    for start in progress.over(range(0, len(tokens), batch), "caching the teacher's top-k", "batch"):
        rows = slice(start, start + batch)
        pad = batch - len(tokens[rows])  # one batch shape: one compilation
        t = np.pad(tokens[rows], ((0, pad), (0, 0)))
        m = np.pad(mask[rows], ((0, pad), (0, 0)))
        v, i = run(state, t, m)
        values.append(np.asarray(v)[:batch - pad])
        ids.append(np.asarray(i)[:batch - pad])
    return np.concatenate(values), np.concatenate(ids)
