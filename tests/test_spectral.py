import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from prunenet_jax.method import spectral


def _ks_cases():
    rng = np.random.default_rng(0)
    cases = []
    for n, m in [(5, 7), (50, 30), (1, 9), (64, 64), (200, 33)]:
        cases.append((rng.normal(size=n), rng.normal(0.3, 1.2, size=m)))  # continuous
        cases.append((rng.integers(0, 4, n).astype(float), rng.integers(0, 6, m).astype(float)))
        a = rng.normal(size=n).round(1)  # ties within and across samples
        cases.append((a, np.concatenate([a[: max(1, n // 2)], rng.normal(size=m).round(1)])[:m]))
    cases.append((np.ones(6), np.ones(4)))  # KS == 0
    cases.append((np.zeros(3), np.ones(5)))  # KS == 1
    return cases


def test_ks_statistic_equals_scipy_ks_2samp():
    ks = jax.jit(spectral.ks_statistic)
    for a, b in _ks_cases():
        ref = stats.ks_2samp(a, b).statistic
        got = float(ks(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
        # float32 inputs: compare with scipy on the same float32 values
        ref32 = stats.ks_2samp(a.astype(np.float32), b.astype(np.float32)).statistic
        assert abs(got - ref32) <= 1e-6, (a, b, got, ref32)
        assert abs(got - ref) <= 1e-6 or len(np.unique(a.astype(np.float32))) != len(np.unique(a))


def test_ks_statistic_vmapped():
    rng = np.random.default_rng(1)
    A = rng.integers(0, 10, (6, 40)).astype(np.float32)
    B = rng.normal(5, 3, (6, 25)).round().astype(np.float32)
    got = np.asarray(jax.jit(jax.vmap(spectral.ks_statistic))(A, B))
    ref = [stats.ks_2samp(a, b).statistic for a, b in zip(A, B)]
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_reward_from_ks():
    ks = jnp.array([0.0, 0.5, 0.01, 1.0])
    np.testing.assert_allclose(spectral.reward_from_ks(ks), [99999.0, 2.0, 100.0, 1.0], rtol=1e-6)
    g = jax.grad(lambda k: jnp.sum(spectral.reward_from_ks(k)))(ks)
    assert np.isfinite(g).all()


@pytest.mark.parametrize("method", spectral.SV_METHODS)
@pytest.mark.parametrize("shape", [(3, 60, 20), (2, 20, 45), (1, 33, 33)])
def test_singular_values_equal_numpy(method, shape):
    if method == "gram" and shape[1] == shape[2]:
        pytest.skip("gram loses the smallest singular values of square matrices; 'auto' avoids it")
    rng = np.random.default_rng(sum(shape))
    W = rng.standard_normal(shape).astype(np.float32)
    got = np.asarray(jax.jit(lambda w: spectral.singular_values(w, method))(W))
    ref = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    assert got.shape == ref.shape == shape[:1] + (min(shape[1:]),)
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    assert (np.diff(got, axis=-1) <= 0).all()  # descending


@pytest.mark.parametrize("method", spectral.SV_METHODS)
def test_sliced_singular_values_and_layer_rewards(method):
    rng = np.random.default_rng(3)
    L, I, H = 3, 40, 12
    W = rng.standard_normal((L, I, H)).astype(np.float32)
    for k in (25, 8):  # k >= H and k < H (unequal sample sizes in KS)
        idx = np.sort(np.stack([rng.choice(I, k, replace=False) for _ in range(L)]), axis=1)
        sv = np.asarray(spectral.sliced_singular_values(jnp.asarray(W), jnp.asarray(idx), method))
        ref = np.linalg.svd(np.take_along_axis(W, idx[:, :, None], 1).astype(np.float64),
                            compute_uv=False)
        np.testing.assert_allclose(sv, ref, rtol=1e-4)
        ref_full = np.linalg.svd(W.astype(np.float64), compute_uv=False)
        ks, rewards = spectral.layer_rewards(jnp.asarray(W), jnp.asarray(ref_full, jnp.float32),
                                             jnp.asarray(idx), method)
        ks_ref = np.array([stats.ks_2samp(a, b).statistic for a, b in zip(ref_full, ref)])
        np.testing.assert_allclose(ks, ks_ref, atol=1e-6)
        np.testing.assert_allclose(rewards, 1 / ks_ref, rtol=1e-5)


def test_half_precision_weights_use_float32_spectra():
    W = np.random.default_rng(4).standard_normal((2, 30, 10)).astype(np.float16)
    sv = spectral.singular_values(jnp.asarray(W))
    assert sv.dtype == jnp.float32
    np.testing.assert_allclose(sv, np.linalg.svd(W.astype(np.float64), compute_uv=False),
                               rtol=1e-4)


def _sliced(W, idx):
    return np.take_along_axis(W, idx[:, :, None], 1)


@pytest.mark.parametrize("I,H,k", [(20, 12, 8), (20, 12, 12), (20, 12, 16), (60, 12, 40)])
def test_downdated_gram_spectra_equal_direct(I, H, k):
    """k < H (the k x k Gram is used, no downdate), k = H and k > H (W^T W - W_R^T W_R)."""
    rng = np.random.default_rng(I + H + k)
    L = 3
    W = rng.standard_normal((L, I, H)).astype(np.float32)
    idx = np.sort(np.stack([rng.choice(I, k, replace=False) for _ in range(L)]), axis=1)
    assert spectral.uses_downdate(I, H, k, "gram") == (k >= H and I - k < k)
    G = spectral.layer_grams(jnp.asarray(W))
    for l in range(L):  # the Gram's eigenvalues themselves, downdated vs direct vs fp64
        R = np.asarray(spectral.dropped_rows(jnp.asarray(idx[l]), I))
        assert sorted(set(R.tolist()) | set(idx[l].tolist())) == list(range(I)) and len(R) == I - k
        rest = W[l][R]
        down = np.asarray(spectral.eigvalsh(G[l] - jnp.asarray(rest.T @ rest)))
        ws = _sliced(W, idx)[l].astype(np.float64)
        exact = np.linalg.eigvalsh(ws.T @ ws)
        scale = exact.max()
        np.testing.assert_allclose(down, exact, atol=2e-6 * scale)
    got = jax.jit(lambda w, i, g: spectral.sliced_singular_values(w, i, "gram", g))(
        jnp.asarray(W), jnp.asarray(idx), G)
    direct = spectral.sliced_singular_values(jnp.asarray(W), jnp.asarray(idx), "gram")
    ref = np.linalg.svd(_sliced(W, idx).astype(np.float64), compute_uv=False)
    m = min(k, H)
    # Gram-based values: absolute error ~ eps * s_max^2 / s, so compare relative to s_max.
    np.testing.assert_allclose(got, ref, atol=1e-5 * ref.max(), rtol=0)
    np.testing.assert_allclose(got, direct, atol=1e-5 * ref.max(), rtol=0)
    assert got.shape == (L, m)
    if not spectral.uses_downdate(I, H, k, "gram"):  # grams unused: the very same computation
        np.testing.assert_array_equal(got, direct)


def test_dropped_rows_complement():
    idx = jnp.asarray([1, 4, 5], jnp.int32)
    np.testing.assert_array_equal(spectral.dropped_rows(idx, 7), [0, 2, 3, 6])


def test_bf16_weights_fp32_gram_and_spectra():
    """bf16 weights stay bf16; Grams accumulate in fp32 (a bf16 product is exact in fp32), so the
    spectra match fp64 SVD of the same bf16 values to rtol 1e-4 (fp32 Gram + eigensolver)."""
    rng = np.random.default_rng(5)
    L, I, H, k = 2, 64, 16, 48
    Wb = jnp.asarray(rng.standard_normal((L, I, H)), jnp.bfloat16)
    W64 = np.asarray(Wb.astype(jnp.float32)).astype(np.float64)
    G = spectral.layer_grams(Wb)
    assert G.dtype == jnp.float32
    np.testing.assert_allclose(G, np.einsum("lij,lik->ljk", W64, W64), rtol=0,
                               atol=1e-6 * np.abs(G).max())
    idx = np.sort(np.stack([rng.choice(I, k, replace=False) for _ in range(L)]), axis=1)
    sv = spectral.sliced_singular_values(Wb, jnp.asarray(idx), grams=G)
    assert sv.dtype == jnp.float32
    np.testing.assert_allclose(sv, np.linalg.svd(_sliced(W64, idx), compute_uv=False), rtol=1e-4)
    np.testing.assert_allclose(spectral.singular_values(Wb),
                               np.linalg.svd(W64, compute_uv=False), rtol=1e-4)


def test_eigvalsh_lapack_values_only_under_jit_and_vmap():
    rng = np.random.default_rng(6)
    A = rng.standard_normal((4, 3, 9, 9)).astype(np.float32)
    S = A @ np.swapaxes(A, -1, -2)
    want = np.linalg.eigvalsh(S.astype(np.float64))
    np.testing.assert_allclose(jax.jit(spectral.eigvalsh)(S), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jax.vmap(jax.jit(spectral.eigvalsh))(S), want, rtol=1e-4, atol=1e-4)
