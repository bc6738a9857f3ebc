"""Training losses on next-token distributions, summed over the valid target positions (the
step, step.py, divides by their count once a whole step, all micro-batches, is done)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

OBJECTIVES = ("distill", "lm")


def target_mask(mask):
    """(B, T-1): position t predicts token t+1, and both must be real tokens."""
    return (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)


def distill_sum(student_logits, teacher_logits, mask):
    """Summed KL(teacher || student) of the next-token distributions; logits (B, T, V)."""
    log_p = jax.nn.log_softmax(teacher_logits[:, :-1].astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(student_logits[:, :-1].astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return jnp.sum(kl * target_mask(mask))


def teacher_topk(teacher_logits, k: int):
    """The teacher's k most likely next tokens per position: (log-probabilities in bf16, ids),
    each (B, T, k): what `distill_topk_sum` needs, at k/V of the logits' memory."""
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    values, ids = jax.lax.top_k(log_p, k)
    return values.astype(jnp.bfloat16), ids.astype(jnp.int32)


def distill_topk_sum(student_logits, topk_log_p, topk_ids, mask):
    """`distill_sum` from the teacher's cached top-k (teacher_topk): the KL terms of those k
    tokens (the teacher's remaining mass, small for a peaked model, is left out). Equal to
    `distill_sum` up to bf16 rounding when k is the vocabulary size."""
    log_q = jax.nn.log_softmax(student_logits[:, :-1].astype(jnp.float32), axis=-1)
    log_p = topk_log_p[:, :-1].astype(jnp.float32)
    log_q = jnp.take_along_axis(log_q, topk_ids[:, :-1], axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return jnp.sum(kl * target_mask(mask))


def lm_sum(student_logits, tokens, mask):
    """Summed next-token cross-entropy of the text itself."""
    log_q = jax.nn.log_softmax(student_logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_q, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * target_mask(mask))
