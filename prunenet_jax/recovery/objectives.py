"""Training losses on next-token distributions, summed over the valid target positions (the
trainer divides by their count once a whole step, all micro-batches, is done)."""
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


def lm_sum(student_logits, tokens, mask):
    """Summed next-token cross-entropy of the text itself."""
    log_q = jax.nn.log_softmax(student_logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_q, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * target_mask(mask))
