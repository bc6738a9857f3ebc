"""The recovery training loop: one jitted step (micro-batches accumulated in a `lax.scan`, the
loss's gradient averaged over every target token of the step, clipped, AdamW with linear warm-up
then cosine decay), data parallel over a 1-D device mesh, checkpointed every N steps so a killed
run resumes bit for bit.

Trainable parameters are the LoRA factors (`method="lora"`) or every weight (`"full"`), kept in
fp32 (master weights) and cast to the compute dtype inside the step (bf16 on accelerators).
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prunenet_jax import progress
from prunenet_jax.errors import UserError
from prunenet_jax.models import llama
from prunenet_jax.recovery import data, lora, objectives

METHODS = ("lora", "full")
DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class RecoverConfig:
    """How a pruned model is fine-tuned (what the manifest and a resumed run compare)."""
    steps: int = 60
    method: str = "lora"
    objective: str = "distill"
    lr: float = 1e-3
    warmup: int = 5
    final_lr_fraction: float = 0.1  # the cosine decays to lr * this at the last step
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    batch_size: int = 2  # sequences per micro-batch (split over the data mesh)
    grad_accum: int = 1  # micro-batches per step
    seq_len: int = 256
    lora_rank: int = 16
    lora_alpha: float = 32.0
    pool_rows: int = 0  # distill: sequences sampled from the dense model (0: a fresh one per row trained)
    seed: int = 0
    compute_dtype: str = "auto"  # auto: bfloat16 on accelerators, float32 on CPU
    remat: bool = True

    def check(self) -> None:
        checks = [
            (self.steps < 1, f"--recover_steps={self.steps} must be at least 1"),
            (self.method not in METHODS, f"--method={self.method} is unknown; use one of {', '.join(METHODS)}"),
            (self.objective not in objectives.OBJECTIVES,
             f"--objective={self.objective} is unknown; use one of {', '.join(objectives.OBJECTIVES)}"),
            (not self.lr > 0, f"--recover_lr={self.lr} must be > 0"),
            (self.warmup < 0, f"--warmup={self.warmup} must be >= 0"),
            (self.batch_size < 1, f"--train_batch={self.batch_size} must be at least 1"),
            (self.grad_accum < 1, f"--grad_accum={self.grad_accum} must be at least 1"),
            (self.seq_len < 2, f"--train_seq_len={self.seq_len} must be at least 2"),
            (self.lora_rank < 1, f"--lora_rank={self.lora_rank} must be at least 1"),
            (self.pool_rows < 0, f"--pool_rows={self.pool_rows} must be >= 0 (0: fresh text every step)"),
            (self.compute_dtype not in ("auto", "float32", "bfloat16"),
             f"--compute_dtype={self.compute_dtype} is unknown; use auto, float32 or bfloat16"),
        ]
        for bad, message in checks:
            if bad:
                raise UserError(message)

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def dtype(self):
        if self.compute_dtype == "auto":
            return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
        return jnp.dtype(self.compute_dtype)


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


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_step(graphdef, teacher_graphdef, cfg: RecoverConfig) -> Callable:
    """step(params, opt_state, frozen, teacher, tokens, mask) -> (params, opt_state, loss,
    grad_norm, targets); tokens/mask (grad_accum, batch, T). One jitted function."""
    opt, dtype = optimizer(cfg), cfg.dtype()

    def micro_loss(params, frozen, teacher, tokens, mask):
        student = nnx.merge(graphdef, _cast(params, dtype), _cast(frozen, dtype))
        logits = student(tokens, mask)
        if cfg.objective == "distill":
            t_logits = jax.lax.stop_gradient(nnx.merge(teacher_graphdef, teacher)(tokens, mask))
            return objectives.distill_sum(logits, t_logits, mask)
        return objectives.lm_sum(logits, tokens, mask)

    def step(params, opt_state, frozen, teacher, tokens, mask):
        grad_fn = jax.value_and_grad(micro_loss)

        def accumulate(carry, batch):
            total, grads = carry
            loss, g = grad_fn(params, frozen, teacher, *batch)
            return (total + loss, jax.tree.map(jnp.add, grads, g)), None

        zero = jax.tree.map(jnp.zeros_like, params)
        (total, grads), _ = jax.lax.scan(accumulate, (jnp.float32(0), zero), (tokens, mask))
        targets = jnp.sum(jax.vmap(objectives.target_mask)(mask))
        scale = 1.0 / jnp.maximum(targets, 1.0)  # the mean over every target token of the step
        grads = jax.tree.map(lambda g: g * scale, grads)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, total * scale,
                optax.tree.norm(grads), targets)

    return jax.jit(step, donate_argnums=(0, 1))


def data_mesh(devices: Optional[int] = None) -> Optional[Mesh]:
    """The 1-D data-parallel mesh over `devices` (default all); None for one device."""
    n = devices or jax.device_count()
    return None if n == 1 else Mesh(np.asarray(jax.devices()[:n]), (DATA_AXIS,))


class Recovery:
    """A student (the pruned model, LoRA-wrapped or not) and its teacher split into the step's
    arguments. `params` are trainable (fp32), `frozen` the rest, `teacher` the dense model in the
    compute dtype (distill only)."""

    def __init__(self, student: llama.LlamaForCausalLM, teacher: Optional[llama.LlamaForCausalLM],
                 cfg: RecoverConfig, mesh: Optional[Mesh] = None):
        cfg.check()
        if cfg.method == "lora":
            lora.add_lora(student, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
        student.model.remat = cfg.remat
        trainable = lora.LoraParam if cfg.method == "lora" else nnx.Param
        self.graphdef, params, frozen = nnx.split(student, trainable, ...)
        self.cfg, self.mesh = cfg, mesh
        if mesh is not None and cfg.batch_size % mesh.devices.size:
            raise UserError(f"--train_batch={cfg.batch_size} must be a multiple of the "
                            f"{mesh.devices.size} devices of the data mesh")
        replicated = (lambda t: t) if mesh is None else (
            lambda t: jax.device_put(t, NamedSharding(mesh, P())))
        self.params = replicated(_cast(nnx.to_pure_dict(params), jnp.float32))
        self.frozen = replicated(nnx.to_pure_dict(frozen))
        if cfg.objective == "distill":
            if teacher is None:
                raise ValueError("distillation needs the dense model")
            self.teacher_graphdef, teacher_state = nnx.split(teacher)
            self.teacher = replicated(_cast(nnx.to_pure_dict(teacher_state), cfg.dtype()))
        else:
            self.teacher_graphdef, self.teacher = None, None
        self.opt_state = optimizer(cfg).init(self.params)
        self._step = make_step(self.graphdef, self.teacher_graphdef, cfg)

    def batch(self, tokens: np.ndarray, mask: np.ndarray):
        """(rows, T) host arrays -> (grad_accum, batch, T) device arrays, batch axis sharded."""
        shape = (self.cfg.grad_accum, self.cfg.batch_size, tokens.shape[-1])
        tokens, mask = tokens.reshape(shape), mask.reshape(shape)
        if self.mesh is None:
            return jnp.asarray(tokens), jnp.asarray(mask)
        sharding = NamedSharding(self.mesh, P(None, DATA_AXIS))
        return jax.device_put(tokens, sharding), jax.device_put(mask, sharding)

    def step(self, tokens: np.ndarray, mask: np.ndarray) -> dict:
        tokens, mask = self.batch(tokens, mask)
        self.params, self.opt_state, loss, gnorm, targets = self._step(
            self.params, self.opt_state, self.frozen, self.teacher, tokens, mask)
        return {"loss": loss, "grad_norm": gnorm, "targets": targets}

    def state(self) -> dict:
        return {"params": self.params, "opt_state": self.opt_state}

    def set_state(self, state: dict) -> None:
        put = jnp.asarray if self.mesh is None else (
            lambda a: jax.device_put(a, NamedSharding(self.mesh, P())))
        self.params = jax.tree.map(put, state["params"])
        self.opt_state = jax.tree.map(put, state["opt_state"])

    def merged_model(self) -> llama.LlamaForCausalLM:
        """The trained student as a plain fp32 model (LoRA factors merged into the weights)."""
        model = nnx.merge(self.graphdef, self.params, self.frozen)
        model.model.remat = False
        lora.merge_lora(model)
        return model
