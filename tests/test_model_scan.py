"""The scanned forward (layers stacked) against the unrolled one, compile-once properties, and the
MLP channel statistics against transformers with the down_proj input captured explicitly."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from prunenet_jax import sources
from prunenet_jax import perplexity as evaluate
from prunenet_jax.models import decoder
from tests import tiny_models


def _load(tmp_path, name, **overrides):
    hf = tiny_models.make_hf_model(name, **overrides)
    return hf, sources.load_model(tiny_models.save_hf_model(hf, tmp_path / name))


def _padded_batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 97, (3, 12))
    mask = np.ones_like(tokens)
    mask[1, 8:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    return tokens, mask


@pytest.mark.parametrize("name", sorted(tiny_models.CONFIGS))
def test_scanned_logits_equal_unrolled(tmp_path, name):
    _, weights = _load(tmp_path, name)
    scanned = decoder.from_named_arrays(weights.config, weights.named_arrays())
    unrolled = decoder.from_named_arrays(weights.config, weights.named_arrays(), scan=False)
    assert isinstance(unrolled.model.layers, nnx.List)
    up = weights.layers["mlp.up_proj.weight"]  # every family has it (fc1 of a plain MLP)
    assert scanned.model.layers.mlp.up_proj.weight.shape == up.shape
    np.testing.assert_array_equal(scanned.model.layers.mlp.up_proj.weight[1], up[1])
    tokens, mask = _padded_batch()
    a = np.asarray(scanned(jnp.asarray(tokens), jnp.asarray(mask)))
    b = np.asarray(unrolled(jnp.asarray(tokens), jnp.asarray(mask)))
    assert np.abs(a - b).max() < 3e-5 * max(1.0, np.abs(a).max() / 5) and np.abs(a).max() > 0.1


def _config(layers):
    return decoder.ModelConfig(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=24,
                             num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                             head_dim=8, norm_eps=1e-5)


def test_traced_program_does_not_grow_with_depth():
    """The scanned forward is one program whatever the depth (so compile time is flat); the
    unrolled one grows with every layer."""
    tokens = jnp.zeros((1, 8), jnp.int32)

    def size(layers, scan):
        graphdef, state = nnx.split(decoder.CausalLM(_config(layers), scan=scan))
        return len(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens))(state).eqns)

    assert size(2, None) == size(12, None)
    assert size(12, False) > size(2, False)


def test_equal_shapes_share_one_compilation():
    """Perplexity of two different models of the same shapes compiles once."""
    tokens, mask = (np.ones((2, 8), np.int32),) * 2
    evaluate.Scorer(decoder.CausalLM(_config(3), rngs=nnx.Rngs(1))).nll(tokens, mask, 2)
    before = evaluate._window_nll._cache_size()
    evaluate.Scorer(decoder.CausalLM(_config(3), rngs=nnx.Rngs(2))).nll(tokens, mask, 2)
    assert evaluate._window_nll._cache_size() == before


def _reference_stats(hf, tokens, mask):
    """sum h^2, peak |h| and the token count, with h captured at every down_proj's input."""
    captured = []
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].numpy()))
             for layer in hf.model.layers]
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        hf(torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
    for h in hooks:
        h.remove()
    valid = mask.astype(bool)
    h = np.stack(captured).astype(np.float64)[:, valid]  # (L, tokens, I)
    return (h ** 2).sum(axis=1), np.abs(h).max(axis=1), int(valid.sum())


@pytest.mark.parametrize("name", ["llama3_rope_bias", "qwen2"])
def test_channel_stats_equal_a_reference(tmp_path, name):
    hf, weights = _load(tmp_path, name)
    model = decoder.from_named_arrays(weights.config, weights.named_arrays())
    tokens, mask = _padded_batch()
    want_sq, want_peak, want_count = _reference_stats(hf, tokens, mask)
    got = decoder.channel_stats(model, tokens, mask)
    assert got.sum_sq.shape == got.peak.shape == (3, 48)
    assert int(got.tokens) == want_count == 12 + 8 + 7
    np.testing.assert_allclose(np.asarray(got.sum_sq), want_sq, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(got.peak), want_peak, rtol=1e-4)
    # Streaming over two batches gives the statistics of the whole.
    parts = decoder.channel_stats(model, tokens[:1], mask[:1]).merge(
        decoder.channel_stats(model, tokens[1:], mask[1:]))
    np.testing.assert_allclose(np.asarray(parts.sum_sq), want_sq, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(parts.peak), want_peak, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(parts.mean_sq()), want_sq / want_count, rtol=1e-4)
    # The unrolled forward gives the same statistics, per layer.
    unrolled = decoder.channel_stats(
        decoder.from_named_arrays(weights.config, weights.named_arrays(), scan=False), tokens, mask)
    np.testing.assert_allclose(np.stack(unrolled.sum_sq), want_sq, rtol=1e-4)


def test_channel_stats_with_per_layer_widths(tmp_path):
    """A model pruned to different widths per layer gets one (width,) array per layer."""
    _, weights = _load(tmp_path, "llama_gqa_untied")
    widths, named = (48, 31, 17), dict(weights.named_arrays())
    for i, w in enumerate(widths):
        p = f"model.layers.{i}.mlp."
        named[p + "gate_proj.weight"] = named[p + "gate_proj.weight"][:w]
        named[p + "up_proj.weight"] = named[p + "up_proj.weight"][:w]
        named[p + "down_proj.weight"] = named[p + "down_proj.weight"][:, :w]
    model = decoder.from_named_arrays(dataclasses.replace(weights.config, intermediate_sizes=widths),
                                    named.items())
    tokens, mask = _padded_batch()
    got = decoder.channel_stats(model, tokens, mask)
    assert [s.shape for s in got.sum_sq] == [(48,), (31,), (17,)]
    dense = decoder.channel_stats(decoder.from_named_arrays(weights.config, weights.named_arrays()),
                                tokens, mask)
    np.testing.assert_allclose(got.sum_sq[0], dense.sum_sq[0], rtol=1e-5)  # layer 0 is unchanged
