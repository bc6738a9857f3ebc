"""The PruneNet policy: one small network shared by all layers, mapping a layer's gate matrix to
one logit per intermediate channel (row).

    z_l = (W_l P^T + b) r = W_l (P^T r) + (b . r)          W_l: (I, H), P: (I, H), b: (I,), r: (I, 1)

The right-hand form is what we compute: O(I*H) per layer and no I x I intermediate. The gradient
w.r.t. P, b, r is the same as the reference's left-hand form (it is the same function).

Two forms of the parameters:
- `Policy`, a Flax NNX module (what users build, checkpoint and inspect);
- a plain pytree `{"P": (I, H), "b": (I,), "r": (I, 1)}` (what the pure training functions and optax
  work on). `to_params` / `from_params` convert between them.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

Params = dict[str, jax.Array]
PARAM_NAMES = ("P", "b", "r")

# Matrix-vector products in full fp32 on every backend (TPU/GPU default matmuls may round the
# inputs to bf16/tf32); they are O(I*H), so the cost is negligible.
_HIGHEST = lax.Precision.HIGHEST


def init_params(key: jax.Array, intermediate_size: int, hidden_size: int,
                dtype=jnp.float32) -> Params:
    """The reference's initialisation, as a plain pytree.

    P, b: PyTorch `nn.Linear(H, I)` default (kaiming_uniform(a=sqrt(5)) for the weight, which is
    U(-1/sqrt(H), 1/sqrt(H)); the same bound for the bias). r: U[0, 1), shape (I, 1).
    """
    I, H = int(intermediate_size), int(hidden_size)
    if I <= 0 or H <= 0:
        raise ValueError(f"policy sizes must be positive, got intermediate_size={I}, "
                         f"hidden_size={H}")
    kp, kb, kr = jax.random.split(key, 3)
    bound = 1.0 / math.sqrt(H)
    return {
        "P": jax.random.uniform(kp, (I, H), dtype, -bound, bound),
        "b": jax.random.uniform(kb, (I,), dtype, -bound, bound),
        "r": jax.random.uniform(kr, (I, 1), dtype, 0.0, 1.0),
    }


def projection(params: Params) -> tuple[jax.Array, jax.Array]:
    """(v, c) = (P^T r, b . r): the only two quantities of the policy that the logits need.

    v has shape (H,), c is a scalar; z = W v + c.
    """
    r = params["r"][:, 0]
    v = jnp.matmul(r, params["P"], precision=_HIGHEST)  # r^T P = (P^T r)^T, shape (H,)
    c = jnp.dot(params["b"], r, precision=_HIGHEST)
    return v, c


def logits_from_projection(W: jax.Array, v: jax.Array, c: jax.Array) -> jax.Array:
    """z = W v + c for W of shape (..., I, H): (..., I)."""
    return jnp.matmul(W, v, precision=_HIGHEST) + c


def policy_logits(params: Params, W: jax.Array) -> jax.Array:
    """Per-row logits z for one layer `W: (I, H)` -> `(I,)`, or stacked layers `(L, I, H)` -> `(L, I)`.

    `z = W (P^T r) + b.r`; never forms the I x I matrix `W P^T`.
    """
    if W.shape[-2:] != params["P"].shape:
        raise ValueError(f"gate matrix shape {W.shape[-2:]} does not match the policy's "
                         f"(intermediate_size, hidden_size) = {params['P'].shape}")
    v, c = projection(params)
    return logits_from_projection(W.astype(v.dtype), v, c)


def policy_logits_naive(params: Params, W: jax.Array) -> jax.Array:
    """The reference's form `(W P^T + b) r`, O(I*I*H): for tests only."""
    proj = jnp.matmul(W, params["P"].T, precision=_HIGHEST) + params["b"]
    return jnp.matmul(proj, params["r"], precision=_HIGHEST)[..., 0]


class Policy(nnx.Module):
    """The shared policy as a Flax NNX module (parameters `P`, `b`, `r`; see `init_params`)."""

    def __init__(self, intermediate_size: int, hidden_size: int, *, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        p = init_params(rngs.params(), intermediate_size, hidden_size, dtype)
        self.intermediate_size = int(intermediate_size)
        self.hidden_size = int(hidden_size)
        self.P = nnx.Param(p["P"])
        self.b = nnx.Param(p["b"])
        self.r = nnx.Param(p["r"])

    def __call__(self, W: jax.Array) -> jax.Array:
        return policy_logits(to_params(self), W)


def to_params(module: Policy) -> Params:
    """The module's parameters as a plain dict {"P", "b", "r"} of arrays (no copy)."""
    return {name: getattr(module, name).get_value() for name in PARAM_NAMES}


def from_params(params: Params) -> Policy:
    """A `Policy` module holding the given parameters (shapes checked)."""
    params = check_params(params)
    I, H = params["P"].shape
    module = nnx.eval_shape(lambda: Policy(I, H, rngs=nnx.Rngs(0), dtype=params["P"].dtype))
    for name in PARAM_NAMES:
        getattr(module, name).set_value(jnp.asarray(params[name]))
    return module


def load_into(module: Policy, params: Params) -> None:
    """Overwrites a module's parameters in place with `params`."""
    params = check_params(params)
    for name in PARAM_NAMES:
        old = getattr(module, name).get_value()
        if tuple(old.shape) != tuple(params[name].shape):
            raise ValueError(f"policy parameter {name!r}: shape {tuple(params[name].shape)} "
                             f"does not match the module's {tuple(old.shape)}")
        getattr(module, name).set_value(jnp.asarray(params[name], old.dtype))


def fingerprint(params: Params) -> str:
    """First 16 hex digits of a sha256 over the sorted names, dtypes, shapes and bytes of the
    params (numpy or jax arrays): names a policy in manifests and model cards."""
    h = hashlib.sha256()
    for name in sorted(params):
        a = np.ascontiguousarray(np.asarray(params[name]))
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()[:16]


def check_params(params: Any) -> Params:
    """Validates the plain form: keys P, b, r with shapes (I, H), (I,), (I, 1)."""
    if not isinstance(params, dict) or set(params) != set(PARAM_NAMES):
        raise ValueError(f"policy params must be a dict with keys {PARAM_NAMES}, got "
                         f"{sorted(params) if isinstance(params, dict) else type(params)}")
    I, H = params["P"].shape
    if tuple(params["b"].shape) != (I,) or tuple(params["r"].shape) != (I, 1):
        raise ValueError(f"policy params: P {tuple(params['P'].shape)}, b "
                         f"{tuple(params['b'].shape)}, r {tuple(params['r'].shape)}; expected "
                         f"({I}, {H}), ({I},), ({I}, 1)")
    return params
