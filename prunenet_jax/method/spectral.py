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

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax import lax

SV_METHODS = ("auto", "gram", "svd")
DEFAULT_SV_METHOD = "auto"
GRAM_MAX_ASPECT = 0.7  # "auto" uses "gram" when min(m, n) <= 0.7 max(m, n)
REWARD_CAP = 99999.0  # the reference's reward when KS == 0


def _check_method(method: str) -> None:
    if method not in SV_METHODS:
        raise ValueError(f"singular value method {method!r} is not one of {SV_METHODS}")


def resolve_method(m: int, n: int, method: str = DEFAULT_SV_METHOD) -> str:
    """"gram" or "svd" for an (m, n) matrix ("auto" decides from the static shape)."""
    _check_method(method)
    if method == "auto":
        return "gram" if min(m, n) <= GRAM_MAX_ASPECT * max(m, n) else "svd"
    return method


def _spectral_dtype(dtype) -> jnp.dtype:
    """fp32 for half-precision (and integer) weights, as the reference; float64 stays."""
    dtype = jnp.dtype(dtype)
    return dtype if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def _dot(a: jax.Array, b: jax.Array, spec: str) -> jax.Array:
    """einsum in full precision, accumulated in fp32 (or fp64) whatever the stored dtype: a bf16
    product is exact in fp32, so bf16 weights never need an fp32 copy."""
    out = _spectral_dtype(jnp.result_type(a.dtype, b.dtype))
    return jnp.einsum(spec, a, b, precision=lax.Precision.HIGHEST, preferred_element_type=out)


def gram(W: jax.Array) -> jax.Array:
    """The smaller Gram matrix of W (..., m, n): W^T W (n, n) when m >= n, else W W^T (m, m)."""
    m, n = W.shape[-2:]
    if m >= n:
        return _dot(W, W, "...ij,...ik->...jk")
    return _dot(W, W, "...ij,...kj->...ik")


def _lapack_eigvalsh(g: np.ndarray) -> np.ndarray:
    """Eigenvalues only (LAPACK ?syevr, jobz='N': tridiagonal reduction + ?sterf), ascending, for
    (..., n, n) host arrays."""
    g = np.asarray(g)
    flat = g.reshape((-1,) + g.shape[-2:])
    out = np.empty(flat.shape[:-1], g.dtype)
    for i, a in enumerate(flat):
        if not np.isfinite(a).all():  # LAPACK fails on Inf/NaN; NaN values let the caller refuse them
            out[i] = np.nan
            continue
        out[i] = scipy.linalg.eigh(a, lower=True, eigvals_only=True, driver="evr",
                                   overwrite_a=True, check_finite=False)
    return out.reshape(g.shape[:-1])


def eigvalsh(g: jax.Array) -> jax.Array:
    """Ascending eigenvalues of symmetric matrices (..., n, n) (lower triangle read).

    On CPU, XLA's eigh always computes eigenvectors too; LAPACK's values-only path (called on the
    host through `jax.pure_callback`, jit- and vmap-compatible) skips them: 30 matrices of
    576 x 576 in 1.8 s instead of 4.1 s on a loaded 2-core CPU (bench/bench_episode.py times all
    candidates). Other backends (the default backend decides) use XLA's solver.
    """
    def on_host(x):
        shape = jax.ShapeDtypeStruct(x.shape[:-1], x.dtype)
        return jax.pure_callback(_lapack_eigvalsh, shape, x, vmap_method="expand_dims")

    # Decided at trace time from the default backend (lax.platform_dependent would lower a cond
    # whose branches shard_map types differently).
    return on_host(g) if jax.default_backend() == "cpu" else jnp.linalg.eigvalsh(g)


def sv_from_gram(g: jax.Array) -> jax.Array:
    """Singular values from a Gram matrix (..., n, n): sqrt of its eigenvalues (clipped at 0),
    descending."""
    return jnp.sqrt(jnp.maximum(eigvalsh(g), 0.0))[..., ::-1]


def singular_values(W: jax.Array, method: str = DEFAULT_SV_METHOD) -> jax.Array:
    """Singular values of W: (..., m, n) -> (..., min(m, n)), descending, in fp32 (fp64 for fp64
    input). Batched over leading axes (one matrix per layer)."""
    W = jnp.asarray(W)
    if not jnp.issubdtype(W.dtype, jnp.floating):
        W = W.astype(jnp.float32)
    if resolve_method(*W.shape[-2:], method) == "svd":
        return jnp.linalg.svd(W.astype(_spectral_dtype(W.dtype)), compute_uv=False)
    return sv_from_gram(gram(W))


def take_rows(W: jax.Array, indices: jax.Array) -> jax.Array:
    """W[l, indices[l], :] for stacked W (L, I, H) and indices (L, k) -> (L, k, H)."""
    return jnp.take_along_axis(W, indices[..., :, None].astype(jnp.int32), axis=-2)


def uses_downdate(num_rows: int, num_cols: int, num_kept: int,
                  method: str = DEFAULT_SV_METHOD) -> bool:
    """Whether the kept rows' Gram is computed as W^T W - W_R^T W_R (R: the dropped rows): when
    their spectrum comes from the (H, H) Gram (k >= H, method "gram") and fewer rows are dropped
    than kept, so the downdate multiplies fewer rows. Static (shapes only)."""
    k, H = int(num_kept), int(num_cols)
    return (resolve_method(k, H, method) == "gram" and k >= H
            and int(num_rows) - k < k)


def layer_grams(W: jax.Array) -> jax.Array:
    """W_l^T W_l of every layer, (L, I, H) -> (L, H, H) fp32, one layer at a time (a bf16 stack is
    never upcast whole)."""
    return lax.map(lambda w: _dot(w, w, "ij,ik->jk"), W)


def dropped_rows(indices: jax.Array, num_rows: int) -> jax.Array:
    """The rows not in `indices` (k,), ascending: (num_rows - k,) int32."""
    kept = jnp.zeros((num_rows,), bool).at[indices].set(True)
    return jnp.nonzero(~kept, size=num_rows - indices.shape[-1])[0].astype(jnp.int32)


def _layer_sliced_sv(w, idx, full_gram, method):
    """Singular values of w[idx] for one layer: (I, H), (k,), (H, H) or None -> (min(k, H),)."""
    I, H = w.shape
    if full_gram is not None and uses_downdate(I, H, idx.shape[0], method):
        rest = jnp.take(w, dropped_rows(idx, I), axis=0)
        return sv_from_gram(full_gram - _dot(rest, rest, "ij,ik->jk"))
    return singular_values(jnp.take(w, idx, axis=0), method)


def sliced_singular_values(W: jax.Array, indices: jax.Array, method: str = DEFAULT_SV_METHOD,
                           grams: Optional[jax.Array] = None) -> jax.Array:
    """Singular values of each layer's kept rows: (L, I, H), (L, k) -> (L, min(k, H)).

    Layer by layer (`lax.map`): one layer's rows are gathered at a time, never an (L, k, H) array.
    With `grams` (L, H, H) = `layer_grams(W)` the kept rows' Gram is downdated from the full one
    where `uses_downdate` says it is less work.
    """
    indices = jnp.asarray(indices).astype(jnp.int32)
    if grams is None:
        return lax.map(lambda a: _layer_sliced_sv(a[0], a[1], None, method), (W, indices))
    return lax.map(lambda a: _layer_sliced_sv(*a, method), (W, indices, grams))


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
             method: str = DEFAULT_SV_METHOD, grams: Optional[jax.Array] = None) -> jax.Array:
    """KS statistic per layer between the reference spectra (L, m) and the sliced spectra."""
    return spectra_ks(ref_sv, sliced_singular_values(W, indices, method, grams))


def layer_rewards(W: jax.Array, ref_sv: jax.Array, indices: jax.Array,
                  method: str = DEFAULT_SV_METHOD,
                  grams: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """(KS, reward) per layer, each (L,)."""
    ks = layer_ks(W, ref_sv, indices, method, grams)
    return ks, reward_from_ks(ks)
