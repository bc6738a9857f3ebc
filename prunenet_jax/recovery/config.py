"""How a pruned model is fine-tuned: `RecoverConfig` (what the manifest records and a resumed run
compares), and its rules: each value's (`check`), against the model (`check_model`: the LoRA
rank), against the text trained on (`check_text`) and against the machine's memory
(`check_pool`)."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp

from prunenet_jax.errors import UserError
from prunenet_jax.formats import texts
from prunenet_jax.recovery import lora, objectives

METHODS = ("lora", "full")
TEACHER_CACHE = ("auto", "on", "off")
MAX_STEPS = 2**31 - 1  # optax counts steps in int32 (and the schedule's spans must fit it)
MAX_SEED = 2**63 - 1  # numpy's default_rng takes no negative seed; jax.random.key a C long
POOL_MEMORY_FRACTION = 0.5  # of host memory: the most a sampled pool may take


def _finite(x, low: float, low_open: bool = True) -> bool:
    """`x` is a finite number above `low` (or at least `low` when not `low_open`)."""
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return ok and (x > low if low_open else x >= low)


def host_memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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
    teacher_cache: str = "auto"  # distill: the teacher's top-k log-probs cached (teacher_cache.py)
    teacher_topk: int = 64
    refit: bool = True  # down_proj refit by least squares before training (refit.py)
    refit_rows: int = 64  # pool rows the refit fits on (0: all)

    def check(self) -> None:
        """Refuses a value no run can use: NaN, Inf, out of range, or too large for the type it
        feeds (optax's int32 step count, numpy's seed)."""
        checks = [
            (self.refit and self.steps < 0, f"--recover_steps={self.steps} must be >= 0 (0: the refit alone)"),
            (not self.refit and self.steps < 1,
             f"--recover_steps={self.steps} must be at least 1 (0 steps, the refit alone, needs --refit)"),
            (self.steps > MAX_STEPS, f"--recover_steps={self.steps} is too many: optax counts steps "
                                     f"in int32; use at most {MAX_STEPS}"),
            (not 0 <= self.warmup <= MAX_STEPS,
             f"--warmup={self.warmup} must be in [0, {MAX_STEPS}] (optax counts steps in int32)"),
            (self.refit_rows < 0, f"--refit_rows={self.refit_rows} must be >= 0 (0: every pool row)"),
            (self.method not in METHODS, f"--method={self.method} is unknown; use one of {', '.join(METHODS)}"),
            (self.objective not in objectives.OBJECTIVES,
             f"--objective={self.objective} is unknown; use one of {', '.join(objectives.OBJECTIVES)}"),
            (not _finite(self.lr, 0), f"--recover_lr={self.lr} must be a finite number > 0, e.g. 1e-3"),
            (not _finite(self.weight_decay, 0, low_open=False),
             f"--weight_decay={self.weight_decay} must be a finite number >= 0, e.g. 0"),
            (not _finite(self.clip_norm, 0),
             f"--clip_norm={self.clip_norm} must be a finite number > 0, e.g. 1.0"),
            (not _finite(self.lora_alpha, 0),
             f"--lora_alpha={self.lora_alpha} must be a finite number > 0, e.g. 32"),
            (not 0 <= self.seed <= MAX_SEED, f"--recover_seed={self.seed} must be in [0, 2**63 - 1], e.g. 0"),
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

    def check_model(self, config) -> None:
        """Refuses a LoRA rank above the smallest dimension of a model of `config` (its pruned
        width included), before any weights load."""
        if self.method == "lora":
            lora.check_rank(self.lora_rank, config)

    def check_text(self, train_text: Optional[str]) -> None:
        """--objective=lm needs --train_text; a given one must be readable and not empty (read
        now, before any weights load)."""
        if self.objective == "lm" and not train_text:
            raise UserError("--objective=lm trains on text: pass --train_text (a path or glob)")
        if train_text:
            texts.read_texts(train_text, flag="--train_text")

    def check_pool(self, train_text: Optional[str]) -> None:
        """Refuses text to sample (distillation without --train_text) that could not fit in host
        memory: its tokens and mask, rows x seq_len int32 each, above POOL_MEMORY_FRACTION of it."""
        if train_text:
            return  # the pool is the text's windows, no larger than the text already read
        rows = self.generated_rows()
        need, memory = 2 * 4 * rows * self.seq_len, host_memory_bytes()
        if need <= POOL_MEMORY_FRACTION * memory:
            return
        fix = ("lower --pool_rows or --train_seq_len" if self.pool_rows else
               "lower --recover_steps, --train_batch or --grad_accum (one sequence is sampled per "
               "row trained), or set --pool_rows to sample fewer sequences and reuse them")
        raise UserError(f"the distillation text would be {rows} sampled sequences of "
                        f"{self.seq_len} tokens ({need / 2**30:.1f} GiB as tokens and mask), more "
                        f"than half of this machine's {memory / 2**30:.1f} GiB of memory; {fix}")

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
