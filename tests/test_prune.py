"""Slicing with kept channels, and choosing the channels from a policy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunenet_jax import prune
from prunenet_jax import sources
from prunenet_jax.method import policy
from prunenet_jax.errors import UserError
from prunenet_jax.models import decoder, registry
from tests import tiny_models


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    hf = tiny_models.make_hf_model("llama3_rope_bias")  # mlp biases too
    return sources.load_model(tiny_models.save_hf_model(hf, tmp_path_factory.mktemp("m") / "tiny"))


def test_sliced_model_equals_dense_with_dropped_channels_zeroed(weights):
    L, I = weights.config.num_hidden_layers, weights.config.intermediate_size
    rng = np.random.default_rng(0)
    keep = np.sort(np.stack([rng.choice(I, 30, replace=False) for _ in range(L)]), axis=1)
    sliced = prune.slice_weights(weights, keep)
    assert sliced.config.intermediate_size == 30 and sliced.hf_config["intermediate_size"] == 30
    assert sliced.layers[registry.GATE].shape == (L, 30, weights.config.hidden_size)
    assert weights.layers[registry.GATE].shape[1] == I  # the input is untouched
    zeroed = {n: np.array(a) for n, a in weights.named_arrays()}
    for l in range(L):
        drop = np.setdiff1d(np.arange(I), keep[l])
        p = f"model.layers.{l}.mlp."
        zeroed[p + "down_proj.weight"][:, drop] = 0.0
        zeroed[p + "gate_proj.bias"][drop] = 0.0  # silu(0 + 0) * up = 0: no contribution
        zeroed[p + "gate_proj.weight"][drop] = 0.0
    tokens = jnp.asarray(rng.integers(0, 97, (2, 9)))
    got = decoder.from_named_arrays(sliced.config, sliced.named_arrays())(tokens)
    want = decoder.from_named_arrays(weights.config, zeroed.items())(tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    assert sliced.num_params() < weights.num_params()


def test_slice_rejects_bad_indices(weights):
    with pytest.raises(UserError):
        prune.slice_weights(weights, np.zeros((1, 5), np.int64))
    with pytest.raises(UserError):
        prune.slice_weights(weights, np.full((weights.config.num_hidden_layers, 5), 999))


def test_select_channels_modes(weights):
    W = jnp.asarray(weights.layers[registry.GATE])
    L, I, H = W.shape
    params = policy.init_params(jax.random.key(0), I, H)
    key = jax.random.key(3)
    scores = np.random.default_rng(0).random((L, I))
    for mode in set(prune.MODES) - {"compensated"}:  # compensated: tests/test_compensated.py
        idx = prune.select_channels(params, W, 20, mode, key, scores=scores)
        assert idx.shape == (L, 20) and (np.diff(idx, axis=1) > 0).all()
        np.testing.assert_array_equal(idx, prune.select_channels(params, W, 20, mode, key, scores=scores))
    z = np.asarray(policy.policy_logits(params, W))
    want = np.sort(np.argsort(-z, axis=1)[:, :20], axis=1)
    np.testing.assert_array_equal(prune.select_channels(params, W, 20, "topk", key), want)
    other = policy.init_params(jax.random.key(1), I, H)  # random mode ignores the policy
    np.testing.assert_array_equal(prune.select_channels(params, W, 20, "random", key),
                                  prune.select_channels(other, W, 20, "random", key))
    assert not np.array_equal(prune.select_channels(params, W, 20, "sample", key),
                              prune.select_channels(params, W, 20, "sample", jax.random.key(4)))
    with pytest.raises(UserError, match="best"):
        prune.select_channels(params, W, 20, "best", key)
    with pytest.raises(ValueError, match="compensated.select"):
        prune.select_channels(params, W, 20, "compensated", key, scores=scores)
