"""Property tests (hypothesis): the KS statistic of the reward, and slicing FFN channels.

Shapes are drawn from small fixed sets so that jit compiles stay few and the file runs in seconds.
"""
import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from prunenet_jax import prune
from prunenet_jax import sources
from prunenet_jax.method import spectral
from prunenet_jax.models import decoder, registry
from tests import tiny_models

_SETTINGS = dict(deadline=None, database=None)  # no .hypothesis/ example database in the checkout

# ---------------------------------------------------------------------------------------------
# KS statistic
# ---------------------------------------------------------------------------------------------

_ks = jax.jit(spectral.ks_statistic)  # one compile per (n, m) pair
SIZES = (1, 2, 5, 13)  # sample lengths: few, so few compiles; n != m included


def _floats(lo=-100.0, hi=100.0):
    return st.floats(lo, hi, width=32, allow_nan=False, allow_infinity=False,
                     allow_subnormal=False)


# Elements from a tiny pool (many ties within and across samples) or any float32.
_tied = st.sampled_from([-1.5, 0.0, 0.25, 1.0, 2.0, 3.0])
_element = st.one_of(_tied, _floats())


@st.composite
def _sample(draw, elements=_element):
    n = draw(st.sampled_from(SIZES))
    return draw(hnp.arrays(np.float32, n, elements=elements))


@st.composite
def _sample_pair(draw):
    a = draw(_sample())
    if draw(st.booleans()):  # b reuses some of a's values: ties across the two samples
        m = draw(st.sampled_from(SIZES))
        picks = draw(st.lists(st.integers(0, a.size - 1), min_size=m, max_size=m))
        fresh = draw(hnp.arrays(np.float32, m, elements=_element))
        use = draw(hnp.arrays(bool, m))
        b = np.where(use, a[picks], fresh).astype(np.float32)
    else:
        b = draw(_sample())
    return a, b


def ks(a, b) -> float:
    return float(_ks(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))


def scipy_ks(a, b) -> float:
    # the float32 values exactly, in float64, so both sides see the same ties
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with warnings.catch_warnings(), np.errstate(all="ignore"):  # p-value warnings; unused
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ks_2samp(a, b).statistic)


# Agreement with scipy (float64) is to float32 rounding (1e-6); 0 for equal samples and symmetry
# are exact (ks_statistic takes the ECDF difference in integers: |ca*m - cb*n| / (n*m)).
@settings(max_examples=100, **_SETTINGS)
@given(_sample_pair())
def test_ks_equals_scipy_ks_2samp_symmetric_and_bounded(pair):
    a, b = pair
    d = ks(a, b)
    assert 0.0 <= d <= 1.0
    assert d == ks(b, a)  # exactly symmetric
    assert abs(d - scipy_ks(a, b)) <= 1e-6, (a, b, d, scipy_ks(a, b))


@settings(max_examples=50, **_SETTINGS)
@given(_sample(), st.randoms(use_true_random=False))
def test_ks_is_zero_for_equal_samples(a, rnd):
    perm = a.copy()
    rnd.shuffle(perm)
    assert ks(a, a) == 0.0
    assert ks(a, perm) == 0.0 and ks(perm, a) == 0.0
    assert ks(a, np.concatenate([a, perm])) == 0.0  # the same empirical CDF, twice as long


@settings(max_examples=50, **_SETTINGS)
@given(_sample(_floats(-50.0, -2.0**-10)), _sample(_floats(0.0, 50.0)), st.booleans())
def test_ks_is_one_for_fully_separated_samples(low, high, swap):
    a, b = (high, low) if swap else (low, high)
    assert ks(a, b) == 1.0
    assert scipy_ks(a, b) == 1.0


def test_jitted_ks_is_exactly_zero_for_equal_samples_and_reward_is_capped():
    a = np.full(5, 1.5, np.float32)
    assert float(jax.jit(spectral.ks_statistic)(a, a.copy())) == 0.0
    W = jnp.asarray(np.random.default_rng(0).standard_normal((2, 40, 12)), jnp.float32)
    ref_sv = spectral.singular_values(W)
    every_row = jnp.tile(jnp.arange(40), (2, 1))
    ks_l, rewards = jax.jit(spectral.layer_rewards)(W, ref_sv, every_row)
    np.testing.assert_array_equal(ks_l, 0.0)
    np.testing.assert_array_equal(rewards, spectral.REWARD_CAP)


# The way training calls it: the dense spectrum (length min(I, H)) against the spectrum of the
# kept rows (length min(k, H)), vmapped over layers. k < H gives samples of different lengths.
# (L, I, H) -> kept counts k: I > H ("gram"; k < H, k == H, k == I) and I < H ("svd"; k < I, k == I)
KS_SHAPES = {(1, 24, 8): (5, 8, 24), (2, 12, 16): (5, 12)}


@st.composite
def _spectral_case(draw):
    L, I, H = draw(st.sampled_from(sorted(KS_SHAPES)))
    k = draw(st.sampled_from(KS_SHAPES[L, I, H]))
    idx = np.stack([np.sort(draw(st.permutations(range(I)))[:k]) for _ in range(L)])
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    W = rng.standard_normal((L, I, H)).astype(np.float32)
    if draw(st.booleans()):  # rows repeated from a pool of 3: rank <= 3, many (near-)zero and
        W = W[:, rng.integers(0, 3, I), :]  # clipped-to-zero singular values, i.e. ties
    return W, idx


@settings(max_examples=30, **_SETTINGS)
@given(_spectral_case())
def test_layer_ks_equals_scipy_on_dense_vs_sliced_spectra(case):
    W, idx = case
    L, I, H = W.shape
    k = idx.shape[1]
    ref_sv = spectral.singular_values(jnp.asarray(W))
    sv = spectral.sliced_singular_values(jnp.asarray(W), jnp.asarray(idx))
    assert ref_sv.shape == (L, min(I, H)) and sv.shape == (L, min(k, H))
    got = np.asarray(spectral.layer_ks(jnp.asarray(W), ref_sv, jnp.asarray(idx)))
    want = [scipy_ks(r, s) for r, s in zip(np.asarray(ref_sv), np.asarray(sv))]
    np.testing.assert_allclose(got, want, atol=1e-6)
    swapped = np.asarray(jax.vmap(spectral.ks_statistic)(sv, ref_sv))
    np.testing.assert_array_equal(swapped, got)
    assert ((got >= 0) & (got <= 1)).all()
    if k == I:  # every row kept (sorted): the same matrix, the same spectrum
        np.testing.assert_array_equal(got, 0.0)


# ---------------------------------------------------------------------------------------------
# Slicing
# ---------------------------------------------------------------------------------------------

SLICE_CONFIGS = ("llama3_rope_bias", "llama_tied")  # mlp/attention biases + llama3 rope; tied


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    out = {}
    for name in SLICE_CONFIGS:
        hf = tiny_models.make_hf_model(name, seed=1)
        out[name] = sources.load_model(tiny_models.save_hf_model(hf, tmp_path_factory.mktemp(name)))
    return out


def logits(weights, tokens) -> np.ndarray:
    return np.asarray(decoder.from_named_arrays(weights.config, weights.named_arrays())(tokens))


def _dense_with_dropped_zeroed(weights, keep):
    """The dense weights with down_proj[:, :, dropped] = 0 in every layer."""
    L, I = weights.config.num_hidden_layers, weights.config.intermediate_size
    down = np.array(weights.layers[registry.DOWN])
    for l in range(L):
        drop = np.setdiff1d(np.arange(I), keep[l])
        down[l][:, drop] = 0.0
    return dataclasses.replace(weights, layers={**weights.layers, registry.DOWN: down})


@st.composite
def _kept(draw, L, I):
    """(L, k): per layer a sorted subset of k distinct channels, one k (1..I) for all layers."""
    k = draw(st.integers(1, I))
    return np.stack([np.sort(draw(st.permutations(range(I)))[:k]) for _ in range(L)])


_tokens = hnp.arrays(np.int32, (2, 7), elements=st.integers(0, tiny_models.BASE["vocab_size"] - 1))
_fixture_ok = dict(suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings(max_examples=12, **_SETTINGS, **_fixture_ok)
@given(st.sampled_from(SLICE_CONFIGS), st.data(), _tokens)
def test_sliced_model_equals_dense_with_dropped_down_columns_zeroed(tiny_weights, name, data,
                                                                     tokens):
    weights = tiny_weights[name]
    L, I = weights.config.num_hidden_layers, weights.config.intermediate_size
    keep = data.draw(_kept(L, I), label="keep")
    sliced = prune.slice_weights(weights, keep)
    k = keep.shape[1]
    assert sliced.config.intermediate_size == k and sliced.hf_config["intermediate_size"] == k
    sliced.check_shapes()
    got = logits(sliced, jnp.asarray(tokens))
    want = logits(_dense_with_dropped_zeroed(weights, keep), jnp.asarray(tokens))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@settings(max_examples=5, **_SETTINGS, **_fixture_ok)
@given(st.sampled_from(SLICE_CONFIGS), _tokens, st.randoms(use_true_random=False))
def test_keeping_every_channel_is_the_dense_model(tiny_weights, name, tokens, rnd):
    weights = tiny_weights[name]
    L, I = weights.config.num_hidden_layers, weights.config.intermediate_size
    sliced = prune.slice_weights(weights, np.tile(np.arange(I), (L, 1)))
    assert sliced.config == weights.config
    for n, a in weights.layers.items():
        np.testing.assert_array_equal(sliced.layers[n], a)
    dense = logits(weights, jnp.asarray(tokens))
    np.testing.assert_array_equal(logits(sliced, jnp.asarray(tokens)), dense)  # exactly
    # every channel kept in a shuffled order: the same function (sums reordered)
    perm = np.stack([rnd.sample(range(I), I) for _ in range(L)])
    np.testing.assert_allclose(logits(prune.slice_weights(weights, perm), jnp.asarray(tokens)),
                               dense, atol=1e-5, rtol=0)
