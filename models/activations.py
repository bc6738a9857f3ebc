"""The MLP activations transformers' checkpoints name (`hidden_act`, `activation_function`,
`activation`), each computed as transformers' `ACT2FN` computes it."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from prunenet_jax.errors import UserError


def _gelu_tanh(x):
    # gelu_new / gelu_pytorch_tanh / gelu_fast: the tanh approximation, one formula.
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # erf, as torch's nn.GELU()
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def check(name: str, source: str, key: str) -> str:
    """`name` if we compute it, else a UserError naming the field and the supported ones."""
    if name not in ACTIVATIONS:
        raise UserError(f"{source}: activation {key}={name!r} is not supported (supported: "
                        f"{', '.join(sorted(ACTIVATIONS))}); use a checkpoint with one of those")
    return name


def apply(name: str, x):
    return ACTIVATIONS[name](x)
