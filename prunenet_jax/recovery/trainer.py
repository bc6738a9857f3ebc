"""The recovery training loop: one jitted step (micro-batches accumulated in a `lax.scan`, the
loss's gradient averaged over every target token of the step, clipped, AdamW with linear warm-up
then cosine decay), data parallel over a 1-D device mesh, checkpointed every N steps so a killed
run resumes bit for bit. With `shard_params` the parameters, the optimiser state and the teacher
are also split over that mesh (FSDP-style: each array along its largest axis the mesh size
divides); XLA gathers them for the forward pass and reduce-scatters the gradients.

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
from prunenet_jax.models import decoder
from prunenet_jax.recovery import data, lora, objectives

METHODS = ("lora", "full")
DATA_AXIS = "data"
SHARD_PARAMS = ("auto", "on", "off")
TEACHER_CACHE = ("auto", "on", "off")


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
    teacher_cache: str = "auto"  # distill: the teacher's top-k log-probs cached (should_cache_teacher)
    teacher_topk: int = 64
    refit: bool = True  # down_proj refit by least squares before training (refit.py)
    refit_rows: int = 64  # pool rows the refit fits on (0: all)

    def check(self) -> None:
        checks = [
            (self.refit and self.steps < 0, f"--recover_steps={self.steps} must be >= 0 (0: the refit alone)"),
            (not self.refit and self.steps < 1,
             f"--recover_steps={self.steps} must be at least 1 (0 steps, the refit alone, needs --refit)"),
            (self.refit_rows < 0, f"--refit_rows={self.refit_rows} must be >= 0 (0: every pool row)"),
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
            (self.teacher_cache not in TEACHER_CACHE,
             f"--teacher_cache={self.teacher_cache} is unknown; use one of {', '.join(TEACHER_CACHE)}"),
            (self.teacher_topk < 1, f"--teacher_topk={self.teacher_topk} must be at least 1"),
            (self.compute_dtype not in ("auto", "float32", "bfloat16"),
             f"--compute_dtype={self.compute_dtype} is unknown; use auto, float32 or bfloat16"),
        ]
        for bad, message in checks:
            if bad:
                raise UserError(message)

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def generated_rows(self) -> int:
        """Sequences sampled for distillation: --pool_rows, else one per row trained (and at
        least the refit's rows)."""
        return self.pool_rows or max(self.steps * self.rows_per_step,
                                     self.refit_rows if self.refit else 0, 1)

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
    """step(params, opt_state, frozen, teacher, batch) -> (params, opt_state, loss, grad_norm,
    targets); batch: (tokens, mask), or (tokens, mask, top-k log-probs, top-k ids) with the
    teacher cached (teacher None), each with leading axes (grad_accum, batch). One jitted
    function."""
    opt, dtype = optimizer(cfg), cfg.dtype()

    def micro_loss(params, frozen, teacher, batch):
        tokens, mask = batch[:2]
        student = nnx.merge(graphdef, _cast(params, dtype), _cast(frozen, dtype))
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


def fsdp_sharding(mesh: Mesh, shape: tuple) -> NamedSharding:
    """Split `shape` along its largest axis the mesh size divides; replicate what none fits."""
    n = mesh.devices.size
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] >= n and shape[axis] % n == 0:
            return NamedSharding(mesh, P(*[DATA_AXIS if a == axis else None
                                          for a in range(len(shape))]))
    return NamedSharding(mesh, P())


def _tree_bytes(*trees) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for t in trees for x in jax.tree.leaves(t))


def _device_limit() -> Optional[int]:
    """One device's memory in bytes; None where the backend reports none (CPU)."""
    return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")


def should_cache_teacher(cfg: RecoverConfig, student_bytes: int, teacher_bytes: int) -> bool:
    """--teacher_cache: on, off, or auto: cache the teacher's top-k (and free it) for distillation
    when the student's training state (fp32 parameters, gradient, two moments) and the teacher
    together would take more than 70% of one device's memory (never on CPU)."""
    if cfg.objective != "distill" or cfg.teacher_cache == "off":
        return False
    if cfg.teacher_cache == "on":
        return True
    limit = _device_limit()
    return bool(limit) and 4 * student_bytes + teacher_bytes > 0.7 * limit


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


def should_shard(mode: str, mesh: Optional[Mesh], params, frozen, teacher) -> bool:
    """`--shard_params`: on, off, or auto: shard when the replicated training state (parameters,
    their gradient and two AdamW moments in fp32, the frozen weights and the teacher) would take
    more than 70% of one device's memory (never on CPU, which reports no limit)."""
    if mode not in SHARD_PARAMS:
        raise UserError(f"--shard_params={mode} is unknown; use one of {', '.join(SHARD_PARAMS)}")
    if mesh is None or mode == "off":
        return False
    if mode == "on":
        return True
    limit = _device_limit()
    need = 4 * _tree_bytes(params) + _tree_bytes(frozen, teacher)
    return bool(limit) and need > 0.7 * limit


def data_mesh(devices: Optional[int] = None) -> Optional[Mesh]:
    """The 1-D data-parallel mesh over `devices` (default all); None for one device."""
    n = devices or jax.device_count()
    return None if n == 1 else Mesh(np.asarray(jax.devices()[:n]), (DATA_AXIS,))


class Recovery:
    """A student (the pruned model, LoRA-wrapped or not) and its teacher split into the step's
    arguments. `params` are trainable (fp32), `frozen` the rest, `teacher` the dense model in the
    compute dtype (distill only; None when its top-k is cached and passed with each batch)."""

    def __init__(self, student: decoder.CausalLM, teacher: Optional[decoder.CausalLM],
                 cfg: RecoverConfig, mesh: Optional[Mesh] = None, shard_params: str = "off"):
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
        params = _cast(nnx.to_pure_dict(params), jnp.float32)
        frozen = nnx.to_pure_dict(frozen)
        if cfg.objective == "distill" and teacher is not None:
            self.teacher_graphdef, teacher_state = nnx.split(teacher)
            teacher = _cast(nnx.to_pure_dict(teacher_state), cfg.dtype())
        else:
            self.teacher_graphdef, teacher = None, None
        self.sharded = should_shard(shard_params, mesh, params, frozen, teacher)
        self.params, self.frozen, self.teacher = (self.place(t) for t in (params, frozen, teacher))
        self.opt_state = self.place(optimizer(cfg).init(self.params))
        self._step = make_step(self.graphdef, self.teacher_graphdef, cfg)

    def place(self, tree):
        """Onto the mesh: replicated, or split FSDP-style when `self.sharded`."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        rule = ((lambda a: fsdp_sharding(self.mesh, np.shape(a))) if self.sharded
                else (lambda a: NamedSharding(self.mesh, P())))
        return jax.tree.map(lambda a: jax.device_put(a, rule(a)), tree)

    def batch(self, *arrays: np.ndarray) -> tuple:
        """(rows, T, ...) host arrays -> (grad_accum, batch, T, ...) device arrays, batch axis
        sharded."""
        lead = (self.cfg.grad_accum, self.cfg.batch_size)
        arrays = tuple(a.reshape(lead + a.shape[1:]) for a in arrays)
        if self.mesh is None:
            return tuple(jnp.asarray(a) for a in arrays)
        sharding = NamedSharding(self.mesh, P(None, DATA_AXIS))
        return tuple(jax.device_put(a, sharding) for a in arrays)

    def step(self, tokens: np.ndarray, mask: np.ndarray, cached: tuple = ()) -> dict:
        """One step on these rows; `cached`: their teacher top-k (log-probs, ids) when the
        teacher is cached instead of run."""
        if self.cfg.objective == "distill" and self.teacher is None and not cached:
            raise ValueError("distillation needs the dense model or its cached top-k")
        self.params, self.opt_state, loss, gnorm, targets = self._step(
            self.params, self.opt_state, self.frozen, self.teacher,
            self.batch(tokens, mask, *cached))
        return {"loss": loss, "grad_norm": gnorm, "targets": targets}

    def state(self) -> dict:
        return {"params": self.params, "opt_state": self.opt_state}

    def set_state(self, state: dict) -> None:
        self.params = self.place(state["params"])
        self.opt_state = self.place(state["opt_state"])

    def merged_model(self) -> decoder.CausalLM:
        """The trained student as a plain fp32 model (LoRA factors merged into the weights)."""
        model = nnx.merge(self.graphdef, self.params, self.frozen)
        model.model.remat = False
        lora.merge_lora(model)
        return model
