"""A fine-tune in progress (`Recovery`): the student (the pruned model, LoRA-wrapped or not) and
its teacher split into the step's arguments and placed on the data mesh (placement.py), advanced
one step (step.py) at a time; its state is what a checkpoint holds, and at the end the trained
student is a plain model again (LoRA factors merged)."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from prunenet_jax.errors import UserError
from prunenet_jax.models import decoder
from prunenet_jax.recovery import lora, placement
from prunenet_jax.recovery.config import RecoverConfig
from prunenet_jax.recovery.step import cast, make_step, optimizer


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
        params = cast(nnx.to_pure_dict(params), jnp.float32)
        frozen = nnx.to_pure_dict(frozen)
        if cfg.objective == "distill" and teacher is not None:
            self.teacher_graphdef, teacher_state = nnx.split(teacher)
            teacher = cast(nnx.to_pure_dict(teacher_state), cfg.dtype())
        else:
            self.teacher_graphdef, teacher = None, None
        self.sharded = placement.should_shard(shard_params, mesh, params, frozen, teacher)
        self.params, self.frozen, self.teacher = (self.place(t) for t in (params, frozen, teacher))
        self.opt_state = self.place(optimizer(cfg).init(self.params))
        self._step = make_step(self.graphdef, self.teacher_graphdef, cfg)

    def place(self, tree):
        """Onto the mesh: replicated, or split FSDP-style when `self.sharded`."""
        return placement.place(tree, self.mesh, self.sharded)

    def batch(self, *arrays: np.ndarray) -> tuple:
        """(rows, T, ...) host arrays -> (grad_accum, batch, T, ...) device arrays, batch axis
        sharded."""
        lead = (self.cfg.grad_accum, self.cfg.batch_size)
        return placement.place_batch(tuple(a.reshape(lead + a.shape[1:]) for a in arrays), self.mesh)

    def step(self, tokens: np.ndarray, mask: np.ndarray, cached: tuple = ()) -> dict:
        """One step on these rows; `cached`: their teacher top-k (log-probs, ids) when the
        teacher is cached instead of run."""
        if self.cfg.objective == "distill" and self.teacher is None and not cached:
            raise ValueError("distillation needs the dense model or its cached top-k")
        self.params, self.opt_state, loss, gnorm, targets = self._step(
            self.params, self.opt_state, self.frozen, self.teacher,
            self.batch(tokens, mask, *cached))
        return {"loss": loss, "grad_norm": gnorm, "targets": targets}

    def params_finite(self) -> bool:
        """Whether every trainable parameter is finite (a diverged state is never saved)."""
        return bool(_all_finite(self.params))

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


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
