"""Actions: which rows (intermediate channels) each layer keeps.

Binary-concrete keep probabilities (temperature 1, as the reference):

    u ~ U(0, 1)^I,   keep = sigmoid(log u - log(1 - u) + z)

and k rows drawn WITHOUT replacement, each draw proportional to `keep` (the reference's
`torch.multinomial(keep, k, replacement=False)`), here with the Gumbel-top-k trick:
`top_k(log keep + Gumbel, k)` has exactly that distribution. Indices are returned sorted.

Everything works on stacked layers (leading axis L). Randomness is per layer: layer l's noise comes
from `fold_in(key, l)` with l the GLOBAL layer index, so a layer's draw does not depend on how
many layers there are, how they are padded, or how the layer axis is split over devices.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from prunenet_jax.errors import UserError


def num_kept(intermediate_size: int, ratio: float) -> int:
    """k = int((1 - ratio) * I), the reference's rounding; raises UserError when it is unusable."""
    ratio = float(ratio)
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"compression ratio {ratio} is out of range; use a ratio in [0, 1), "
                        "e.g. 0.3 to remove 30% of every layer's FFN channels")
    k = int((1.0 - ratio) * int(intermediate_size))
    if k < 1:
        raise UserError(f"compression ratio {ratio} keeps no channel of the {intermediate_size} "
                        "intermediate channels; use a smaller ratio")
    return k


def layer_keys(key: jax.Array, layer_ids: jax.Array) -> jax.Array:
    """One key per layer: `fold_in(key, layer_id)`, shape `layer_ids.shape`."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.asarray(layer_ids, jnp.uint32))


def _ids(layer_ids: Optional[jax.Array], num_layers: int) -> jax.Array:
    return jnp.arange(num_layers) if layer_ids is None else jnp.asarray(layer_ids)


def uniform_noise(key: jax.Array, num_layers: int, size: int, layer_ids: Optional[jax.Array] = None,
                  dtype=jnp.float32) -> jax.Array:
    """u ~ U(0, 1) of shape (L, size), per-layer keys; never exactly 0 (so log u is finite).

    `jax.random.uniform` draws from [0, 1) on a 2^-23 grid: an exact 0 (log u = -inf, then an
    infinite loss if that row is kept) would occur about once in 10^7 draws, i.e. in a few
    percent of episodes of a 7B model. The lower bound is the smallest normal float instead.
    """
    keys = layer_keys(key, _ids(layer_ids, num_layers))
    tiny = jnp.finfo(dtype).tiny
    return jax.vmap(lambda k: jax.random.uniform(k, (size,), dtype, minval=tiny, maxval=1.0))(keys)


def logistic_from_uniform(u: jax.Array) -> jax.Array:
    """log u - log(1 - u)."""
    return jnp.log(u) - jnp.log1p(-u)


def keep_logits(z: jax.Array, u: jax.Array) -> jax.Array:
    """The logit of `keep`: log u - log(1 - u) + z."""
    return logistic_from_uniform(u) + z


def keep_probs(z: jax.Array, u: jax.Array) -> jax.Array:
    """keep = sigmoid(log u - log(1 - u) + z)."""
    return jax.nn.sigmoid(keep_logits(z, u))


def log_keep(z: jax.Array, u: jax.Array) -> jax.Array:
    """log keep, computed stably as log_sigmoid of the keep logit (finite for finite inputs)."""
    return jax.nn.log_sigmoid(keep_logits(z, u))


def _as_stacked(x: jax.Array) -> tuple[jax.Array, bool]:
    x = jnp.asarray(x)
    if x.ndim == 1:
        return x[None], True
    if x.ndim != 2:
        raise ValueError(f"expected (I,) or (L, I), got shape {x.shape}")
    return x, False


def gumbel_top_k(key: jax.Array, log_weights: jax.Array, k: int,
                 layer_ids: Optional[jax.Array] = None) -> jax.Array:
    """k indices per layer without replacement, P proportional to exp(log_weights); sorted.

    log_weights: (L, I) or (I,). Layer l's Gumbel noise uses `fold_in(key, layer_ids[l])`.
    """
    lw, single = _as_stacked(log_weights)
    L, I = lw.shape
    if not 1 <= k <= I:
        raise ValueError(f"cannot keep k={k} of {I} rows")
    keys = layer_keys(key, _ids(layer_ids, L))
    g = jax.vmap(lambda kk: jax.random.gumbel(kk, (I,), lw.dtype))(keys)
    _, idx = jax.lax.top_k(lw + g, k)
    idx = jnp.sort(idx, axis=-1).astype(jnp.int32)
    return idx[0] if single else idx


def sample_indices(key: jax.Array, keep: jax.Array, k: int,
                   layer_ids: Optional[jax.Array] = None) -> jax.Array:
    """k row indices per layer, drawn without replacement proportionally to `keep`; sorted.

    keep: (L, I) (or (I,)) non-negative weights. Same distribution as
    `torch.multinomial(keep, k, replacement=False)`; rows with keep == 0 are drawn only when fewer
    than k rows have positive weight (torch raises in that case).
    """
    return gumbel_top_k(key, jnp.log(keep), k, layer_ids)


def sample_indices_from_logits(key: jax.Array, keep_logit: jax.Array, k: int,
                               layer_ids: Optional[jax.Array] = None) -> jax.Array:
    """`sample_indices(key, sigmoid(keep_logit), k)` without leaving the log domain (no underflow
    of keep to 0 for very negative logits)."""
    return gumbel_top_k(key, jax.nn.log_sigmoid(keep_logit), k, layer_ids)


def topk_indices(z: jax.Array, k: int) -> jax.Array:
    """Deterministic action: the k rows with the largest logits per layer, sorted. (L, I) -> (L, k)."""
    zz, single = _as_stacked(z)
    if not 1 <= k <= zz.shape[-1]:
        raise ValueError(f"cannot keep k={k} of {zz.shape[-1]} rows")
    _, idx = jax.lax.top_k(zz, k)
    idx = jnp.sort(idx, axis=-1).astype(jnp.int32)
    return idx[0] if single else idx
