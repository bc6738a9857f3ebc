"""LoRA factors on the attention and MLP projections, and merging them back into the weights.

`add_lora` replaces each target `Linear` of a model by a `LoraLinear` that computes
x W^T + (alpha / rank) (x A^T) B^T with A (rank, in) and B (out, rank) held as `LoraParam`, so
training can take the factors alone (`nnx.split(model, LoraParam, ...)`). In a scanned model the
factors are stacked on the layer axis like every other parameter. `merge_lora` folds
W + (alpha / rank) B A into plain `Linear`s: the result is again a plain model of its family.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from prunenet_jax.errors import UserError
from prunenet_jax.models import decoder

# Every family's projections under their canonical names (fc1/fc2 are up_proj/down_proj).
TARGETS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
           ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


class LoraParam(nnx.Param):
    """A trainable low-rank factor (the base weights stay plain nnx.Param, frozen under LoRA)."""


class LoraLinear(nnx.Module):
    def __init__(self, base: decoder.Linear, rank: int, alpha: float, key: jax.Array):
        *lead, out, inp = base.weight.shape  # lead: (L,) in a scanned model
        self.base = base
        # A as in the LoRA paper (random, ~1/sqrt(in)); B zero, so training starts at the model.
        a = jax.random.normal(key, (*lead, rank, inp), jnp.float32) / math.sqrt(inp)
        self.lora_a = LoraParam(a.astype(base.weight.dtype))
        self.lora_b = LoraParam(jnp.zeros((*lead, out, rank), base.weight.dtype))
        self.scale = alpha / rank

    def __call__(self, x):
        low = jnp.einsum("...i,ri->...r", x, self.lora_a[...])
        return self.base(x) + self.scale * jnp.einsum("...r,or->...o", low, self.lora_b[...])

    def merged_weight(self):
        delta = jnp.einsum("...or,...ri->...oi", self.lora_b[...].astype(jnp.float32),
                           self.lora_a[...].astype(jnp.float32))
        w = self.base.weight[...]
        return (w.astype(jnp.float32) + self.scale * delta).astype(w.dtype)


def _layers(model: decoder.CausalLM) -> list:
    layers = model.model.layers
    return list(layers) if isinstance(layers, nnx.List) else [layers]


def max_rank(cfg) -> int:
    """The largest useful rank: the smallest dimension of any target matrix."""
    widths = [cfg.mlp_width(i) for i in range(cfg.num_hidden_layers)]
    return min([cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, *widths])


def check_rank(rank: int, cfg) -> None:
    top = max_rank(cfg)
    if not 1 <= rank <= top:
        raise UserError(f"--lora_rank={rank} must be between 1 and {top}, the smallest dimension "
                        "of the adapted matrices; use a smaller rank (8 to 64 is typical)")


def add_lora(model: decoder.CausalLM, rank: int, alpha: float, seed: int) -> None:
    """Wraps every target projection of `model` (in place) in a LoraLinear."""
    check_rank(rank, model.config)
    key = jax.random.key(seed)
    for i, layer in enumerate(_layers(model)):
        for j, (block, name) in enumerate(TARGETS):
            parent = getattr(layer, block)
            if getattr(parent, name) is None:  # a plain MLP has no gate_proj
                continue
            sub = jax.random.fold_in(key, i * len(TARGETS) + j)
            setattr(parent, name, LoraLinear(getattr(parent, name), rank, alpha, sub))


def merge_lora(model: decoder.CausalLM) -> None:
    """Folds every LoraLinear of `model` (in place) back into a plain Linear."""
    for layer in _layers(model):
        for block, name in TARGETS:
            parent = getattr(layer, block)
            lora = getattr(parent, name)
            if isinstance(lora, LoraLinear):
                lora.base.weight.set_value(lora.merged_weight())
                setattr(parent, name, lora.base)
