import itertools
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunenet_jax.method import sampling
from prunenet_jax.errors import UserError


def _exact_subset_probs(w, k):
    """P(subset) for k sequential draws without replacement, each proportional to w."""
    w = np.asarray(w, np.float64)
    probs = Counter()
    for seq in itertools.permutations(range(len(w)), k):
        p, left = 1.0, w.sum()
        for i in seq:
            p *= w[i] / left
            left -= w[i]
        probs[tuple(sorted(seq))] += p
    return probs


def test_gumbel_top_k_matches_sequential_sampling_without_replacement():
    w = np.array([0.05, 0.1, 0.2, 0.4, 0.8, 1.6], np.float32)
    k, n = 3, 40_000
    # One "layer" per draw: every layer gets its own key (fold_in of its index).
    keep = jnp.broadcast_to(jnp.asarray(w), (n, w.size))
    idx = np.asarray(jax.jit(lambda kk, p: sampling.sample_indices(kk, p, k))(
        jax.random.key(42), keep))
    assert idx.shape == (n, k)
    exact = _exact_subset_probs(w, k)
    counts = Counter(map(tuple, idx))
    assert set(counts) <= set(exact)
    for subset, p in exact.items():
        assert abs(counts[subset] / n - p) < 0.01, (subset, counts[subset] / n, p)
    # Per-row inclusion frequencies too (these differ a lot from k * w / sum(w)).
    incl = np.zeros(w.size)
    for subset, p in exact.items():
        incl[list(subset)] += p
    freq = np.bincount(idx.ravel(), minlength=w.size) / n
    np.testing.assert_allclose(freq, incl, atol=0.01)
    assert np.abs(incl - np.minimum(1, k * w / w.sum())).max() > 0.05


def test_sample_indices_from_logits_same_distribution_and_draw():
    z = jnp.array([[-3.0, -1.0, 0.0, 0.5, 2.0, 30.0, -200.0]])
    key = jax.random.key(0)
    a = sampling.sample_indices_from_logits(key, z, 3)
    b = sampling.sample_indices(key, jax.nn.sigmoid(z), 3)
    np.testing.assert_array_equal(a, b)  # same Gumbel noise, log(sigmoid) == log_sigmoid here
    assert 5 in np.asarray(a)  # keep ~ 1 row


def test_indices_sorted_unique_and_layer_keys_independent_of_layer_count():
    L, I, k = 8, 50, 20
    keep = jax.random.uniform(jax.random.key(1), (L, I))
    key = jax.random.key(5)
    idx = np.asarray(sampling.sample_indices(key, keep, k))
    assert idx.dtype == np.int32 and idx.shape == (L, k)
    assert (np.diff(idx, axis=1) > 0).all() and idx.min() >= 0 and idx.max() < I
    # A layer's draw depends only on (key, its global index): a subset of layers, with their
    # global indices, gives the same rows (this is what makes sharding over devices exact).
    sub = np.asarray(sampling.sample_indices(key, keep[3:7], k, layer_ids=jnp.arange(3, 7)))
    np.testing.assert_array_equal(sub, idx[3:7])
    np.testing.assert_array_equal(sampling.sample_indices(key, keep[2], k, layer_ids=[2])[None],
                                  idx[2:3])
    # ...and different layers get different noise.
    same = np.asarray(sampling.sample_indices(key, jnp.broadcast_to(keep[0], (L, I)), k))
    assert len({tuple(r) for r in same}) > 1
    u = sampling.uniform_noise(key, L, I)
    np.testing.assert_array_equal(sampling.uniform_noise(key, 2, I, layer_ids=[4, 5]), u[4:6])


def test_keep_probs_and_log_keep_are_stable():
    u = jnp.array([1e-30, 1e-7, 0.3, 0.5, 0.9, 1 - 2 ** -23, 0.7], jnp.float32)
    z = jnp.array([0.0, 1.5, -2.0, 0.0, 3.0, -1.0, 1e4], jnp.float32)
    keep = sampling.keep_probs(z, u)
    u64, z64 = np.asarray(u, np.float64), np.asarray(z, np.float64)
    ref = 1 / (1 + np.exp(-(np.log(u64) - np.log1p(-u64) + z64)))
    np.testing.assert_allclose(keep, ref, rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(np.exp(sampling.log_keep(z, u)), ref, rtol=1e-5, atol=1e-30)
    # Saturated logits: log keep stays finite (log(sigmoid(-200)) would be -inf in float32).
    lk = sampling.log_keep(jnp.array([-200.0, 200.0, -1e5]), jnp.array([0.5, 0.5, 0.5]))
    assert np.isfinite(lk).all()
    np.testing.assert_allclose(lk, [-200.0, 0.0, -1e5], rtol=1e-6)
    noise = sampling.uniform_noise(jax.random.key(0), 4, 1000)
    assert noise.dtype == jnp.float32 and float(noise.min()) > 0 and float(noise.max()) < 1


def test_topk_indices():
    z = jax.random.normal(jax.random.key(3), (4, 30))
    idx = np.asarray(sampling.topk_indices(z, 7))
    ref = np.sort(np.argsort(-np.asarray(z), axis=1)[:, :7], axis=1)
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_array_equal(sampling.topk_indices(z[0], 7), ref[0])


def test_num_kept():
    assert sampling.num_kept(1536, 0.3) == 1075  # int(0.7 * 1536) = int(1075.19...)
    assert sampling.num_kept(11008, 0.2) == 8806
    assert sampling.num_kept(100, 0.0) == 100
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(UserError):
            sampling.num_kept(100, bad)
    with pytest.raises(UserError):
        sampling.num_kept(3, 0.9)


def _composition_problem():
    """A policy whose logits are exactly z on every layer (H = 1, P = 1, r = 1/I, b = 0, so
    z = W v + c = W[:, :, 0]) over 100000 identical layers: each layer is one independent draw of
    k = 1 channel of I = 4."""
    from prunenet_jax.method import policy

    z = np.array([-6.0, -2.0, 2.0, 6.0], np.float32)
    I, L = len(z), 100000
    params = {"P": jnp.ones((I, 1)), "b": jnp.zeros((I,)), "r": jnp.full((I, 1), 1.0 / I)}
    W = jnp.broadcast_to(jnp.asarray(z)[None, :, None], (L, I, 1))
    np.testing.assert_allclose(np.asarray(policy.policy_logits(params, W))[0], z, atol=1e-6)
    return z, params, W


def _expected_frequencies(z):
    """P(channel i is the one kept) for k = 1 under each candidate rule, by independent numpy
    Monte Carlo: the composed rule keep = sigmoid(logit(u) + z) with fresh u, and wrong ones."""
    rng = np.random.default_rng(0)
    u = rng.uniform(size=(1000000, len(z)))
    keep = 1.0 / (1.0 + np.exp(-(np.log(u) - np.log1p(-u) + z)))
    composed = (keep / keep.sum(1, keepdims=True)).mean(0)
    sig = 1.0 / (1.0 + np.exp(-z))
    wrong = {"z alone (sigmoid z)": sig / sig.sum(), "Gumbel on z (softmax z)": np.exp(z) / np.exp(z).sum(),
             "top-k of z": np.eye(len(z))[np.argmax(z)]}
    return composed, wrong


def _check_frequencies(indices, z):
    freq = np.bincount(np.asarray(indices).reshape(-1), minlength=len(z)) / np.asarray(indices).size
    composed, wrong = _expected_frequencies(z)
    np.testing.assert_allclose(freq, composed, atol=0.008)  # 5 standard errors at 100000 draws
    for name, p in wrong.items():  # each wrong rule is well outside that tolerance
        assert np.abs(p - composed).max() > 0.04, name
        assert np.abs(freq - p).max() > 0.025, f"the sampler looks like {name}: {freq} vs {p}"


def test_training_samples_from_keep_with_fresh_noise():
    """The assembled training sampler (train's sampling pass) keeps channels with the frequencies
    of keep = sigmoid(logit(u) + z), not of z alone or of Gumbel noise on z."""
    from prunenet_jax.method import episode

    z, params, W = _composition_problem()
    cfg = episode.TrainConfig(ratio=0.75)  # k = int(0.25 * 4) = 1
    S, _ = episode.sample_local(cfg, None, params, W, jax.random.key(5))
    assert S.shape == (W.shape[0], 1)
    _check_frequencies(S, z)


def test_pruning_samples_from_keep_with_fresh_noise():
    """The same for pruning's `sample` mode (prune.select_kept)."""
    from prunenet_jax import prune

    z, params, W = _composition_problem()
    kept = prune.select_kept(params, W, 0.75, "sample", seed=5)
    assert kept.shape == (W.shape[0], 1)
    _check_frequencies(kept, z)
