"""The reward: how well a layer's kept rows preserve its spectrum.

    s_l  = singular values of W_l            (once per model)
    s'_l = singular values of W_l[S_l, :]    (per action)
    KS_l = two-sample Kolmogorov-Smirnov statistic of s_l and s'_l (= scipy.stats.ks_2samp's)
    R_l  = 1 / KS_l, or 99999 where KS_l == 0 (the reference's cap)

Singular values (values only) are computed one of three ways, chosen by `method`:
- "gram": eigenvalues of the smaller Gram matrix (W^T W or W W^T, full-fp32 matmul), clipped at 0,
  square-rooted, sorted descending. About 1.5-2x faster than "svd" on a 2-core CPU at the real
  shapes (30 layers of 1075 x 576: 0.65 s vs 0.96 s). Its relative error grows like
  eps * (s_max / s)^2: measured 1e-5..2e-5 on SmolLM2-135M's gate matrices (1536 x 576 and
  1075-row slices, condition number 20-30), but it loses the smallest singular values of
  near-square matrices (condition number in the hundreds or more).
- "svd": `jnp.linalg.svd(compute_uv=False)`; accurate for any matrix, slow on CPU.
- "auto" (default): "gram" for clearly rectangular matrices (short side <= GRAM_MAX_ASPECT x the
  long side), "svd" otherwise. Decided from the static shape, so it is free under jit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

SV_METHODS = ("auto", "gram", "svd")
DEFAULT_SV_METHOD = "auto"
GRAM_MAX_ASPECT = 0.7  # "auto" uses "gram" when min(m, n) <= 0.7 max(m, n)
REWARD_CAP = 99999.0  # the reference's reward when KS == 0


def _check_method(method: str) -> None:
    if method not in SV_METHODS:
        raise ValueError(f"singular value method {method!r} is not one of {SV_METHODS}")


def singular_values(W: jax.Array, method: str = DEFAULT_SV_METHOD) -> jax.Array:
    """Singular values of W: (..., m, n) -> (..., min(m, n)), descending, in W's float dtype.

    Batched over leading axes (one matrix per layer).
    """
    _check_method(method)
    W = jnp.asarray(W)
    if not jnp.issubdtype(W.dtype, jnp.floating) or W.dtype.itemsize < 4:
        W = W.astype(jnp.float32)  # fp16/bf16 weights: spectra in fp32 as the reference
    m, n = W.shape[-2:]
    if method == "auto":
        method = "gram" if min(m, n) <= GRAM_MAX_ASPECT * max(m, n) else "svd"
    if method == "svd":
        return jnp.linalg.svd(W, compute_uv=False)
    if m >= n:  # (n, n) = W^T W
        g = jnp.einsum("...ij,...ik->...jk", W, W, precision=lax.Precision.HIGHEST)
    else:  # (m, m) = W W^T
        g = jnp.einsum("...ij,...kj->...ik", W, W, precision=lax.Precision.HIGHEST)
    ev = jnp.linalg.eigvalsh(g)  # ascending
    return jnp.sqrt(jnp.maximum(ev, 0.0))[..., ::-1]


def take_rows(W: jax.Array, indices: jax.Array) -> jax.Array:
    """W[l, indices[l], :] for stacked W (L, I, H) and indices (L, k) -> (L, k, H)."""
    return jnp.take_along_axis(W, indices[..., :, None].astype(jnp.int32), axis=-2)


def sliced_singular_values(W: jax.Array, indices: jax.Array,
                           method: str = DEFAULT_SV_METHOD) -> jax.Array:
    """Singular values of each layer's kept rows: (L, I, H), (L, k) -> (L, min(k, H))."""
    return singular_values(take_rows(W, indices), method)


def ks_statistic(a: jax.Array, b: jax.Array) -> jax.Array:
    """Two-sample KS statistic sup_x |F_a(x) - F_b(x)| of 1-D samples a (n,) and b (m,).

    Equals `scipy.stats.ks_2samp(a, b).statistic` (ties and n != m included): both empirical CDFs
    are evaluated (side='right') at every point of the pooled sample. Vmappable.
    """
    a = jnp.sort(jnp.asarray(a))
    b = jnp.sort(jnp.asarray(b))
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"ks_statistic takes 1-D samples; vmap it for batches (got {a.shape}, "
                         f"{b.shape})")
    n, m = a.shape[0], b.shape[0]
    pooled = jnp.concatenate([a, b.astype(a.dtype)])
    ca = jnp.searchsorted(a, pooled, side="right")
    cb = jnp.searchsorted(b, pooled, side="right")
    # |ca/n - cb/m| = |ca*m - cb*n| / (n*m): the difference in integers is exactly 0 for equal
    # samples and exactly symmetric (XLA would fuse the float form into an FMA that is not).
    # int32 holds (n + m) * max(n, m) for spectra up to 16384 long (H of the largest LLaMAs).
    diff = jnp.max(jnp.abs(ca.astype(jnp.int32) * m - cb.astype(jnp.int32) * n))
    dtype = jnp.result_type(a.dtype, jnp.float32)
    return diff.astype(dtype) / jnp.asarray(n * m, dtype)


def reward_from_ks(ks: jax.Array, cap: float = REWARD_CAP) -> jax.Array:
    """R = 1 / KS, or `cap` where KS == 0."""
    safe = jnp.where(ks == 0, 1.0, ks)
    return jnp.where(ks == 0, jnp.asarray(cap, safe.dtype), 1.0 / safe)


def spectra_ks(ref_sv: jax.Array, sv: jax.Array) -> jax.Array:
    """KS statistic per layer between two stacks of spectra (L, m) and (L, m')."""
    return jax.vmap(ks_statistic)(ref_sv, sv)


def layer_ks(W: jax.Array, ref_sv: jax.Array, indices: jax.Array,
             method: str = DEFAULT_SV_METHOD) -> jax.Array:
    """KS statistic per layer between the reference spectra (L, m) and the sliced spectra."""
    return spectra_ks(ref_sv, sliced_singular_values(W, indices, method))


def layer_rewards(W: jax.Array, ref_sv: jax.Array, indices: jax.Array,
                  method: str = DEFAULT_SV_METHOD) -> tuple[jax.Array, jax.Array]:
    """(KS, reward) per layer, each (L,)."""
    ks = layer_ks(W, ref_sv, indices, method)
    return ks, reward_from_ks(ks)
