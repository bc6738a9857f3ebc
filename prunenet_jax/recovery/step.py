"""Recovery's training step: one jitted function (micro-batches accumulated in a `lax.scan`, the
loss's gradient averaged over every target token of the step, clipped, AdamW with linear warm-up
then cosine decay).

Trainable parameters (the LoRA factors, or every weight) are kept in fp32 (master weights) and
cast to the compute dtype inside the step (bf16 on accelerators), as are the frozen weights and
the teacher.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from prunenet_jax.recovery import objectives
from prunenet_jax.recovery.config import RecoverConfig


def lr_schedule(cfg: RecoverConfig) -> Callable:
    """Linear warm-up to cfg.lr over `warmup` steps (step 0 already trains), then a cosine decay
    to lr * final_lr_fraction at the last step."""
    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        warm = cfg.lr * (t + 1) / max(cfg.warmup, 1)
        span = max(cfg.steps - 1 - cfg.warmup, 1)
        progress_ = jnp.clip((t - cfg.warmup) / span, 0.0, 1.0)
        f = cfg.final_lr_fraction
        cosine = cfg.lr * (f + (1 - f) * 0.5 * (1 + jnp.cos(jnp.pi * progress_)))
        return jnp.where(t < cfg.warmup, warm, cosine)
    return schedule


def optimizer(cfg: RecoverConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                       optax.adamw(lr_schedule(cfg), b1=0.9, b2=0.999, eps=1e-8,
                                   weight_decay=cfg.weight_decay))


def cast(tree, dtype):
    """Every floating leaf of `tree` in `dtype` (integer leaves unchanged)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_step(graphdef, teacher_graphdef, cfg: RecoverConfig) -> Callable:
    """step(params, opt_state, frozen, teacher, batch) -> (params, opt_state, loss, grad_norm,
    targets); batch: (tokens, mask), or (tokens, mask, top-k log-probs, top-k ids) with the
    teacher cached (teacher None), each with leading axes (grad_accum, batch). One jitted
    function."""
    opt, dtype = optimizer(cfg), cfg.dtype()

    def micro_loss(params, frozen, teacher, batch):
        tokens, mask = batch[:2]
        student = nnx.merge(graphdef, cast(params, dtype), cast(frozen, dtype))
        logits = student(tokens, mask)
        if cfg.objective == "lm":
            return objectives.lm_sum(logits, tokens, mask)
        if len(batch) == 4:
            return objectives.distill_topk_sum(logits, batch[2], batch[3], mask)
        t_logits = jax.lax.stop_gradient(nnx.merge(teacher_graphdef, teacher)(tokens, mask))
        return objectives.distill_sum(logits, t_logits, mask)

    def step(params, opt_state, frozen, teacher, batch):
        grad_fn = jax.value_and_grad(micro_loss)

        def accumulate(carry, micro):
            total, grads = carry
            loss, g = grad_fn(params, frozen, teacher, micro)
            return (total + loss, jax.tree.map(jnp.add, grads, g)), None

        zero = jax.tree.map(jnp.zeros_like, params)
        (total, grads), _ = jax.lax.scan(accumulate, (jnp.float32(0), zero), batch)
        targets = jnp.sum(jax.vmap(objectives.target_mask)(batch[1]))
        scale = 1.0 / jnp.maximum(targets, 1.0)  # the mean over every target token of the step
        grads = jax.tree.map(lambda g: g * scale, grads)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, total * scale,
                optax.tree.norm(grads), targets)

    return jax.jit(step, donate_argnums=(0, 1))
