"""The least-squares down_proj refit (prunenet_jax/recovery/refit.py) on tiny random models: each
layer's fit equals numpy's least squares on that layer's inputs, layer after layer along the
refit model's own path; padded tokens are ignored; the refit model is closer to the dense one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunenet_jax import prune, sources
from prunenet_jax.models import decoder, registry
from prunenet_jax.recovery import refit
from tests import tiny_models


def _models(tmp_path, name, keep, seed=0):
    folder = tiny_models.save_hf_model(tiny_models.make_hf_model(name), tmp_path / name)
    dense = sources.load_model(folder)
    L, I = dense.config.num_hidden_layers, dense.config.intermediate_size
    rng = np.random.default_rng(seed)
    kept = np.sort(np.stack([rng.choice(I, int(I * keep), replace=False) for _ in range(L)]), axis=1)
    return dense, prune.slice_weights(dense, kept)


def _tokens(vocab, rows=8, T=40, seed=1):
    tokens = np.random.default_rng(seed).integers(0, vocab, (rows, T)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[2, 25:] = 0  # rows that end early
    mask[5, 10:] = 0
    return tokens, mask


def _dense_model(w):
    return decoder.from_named_arrays(w.config, w.named_arrays())


@pytest.mark.parametrize("name,keep", [("llama_gqa_untied", 0.75), ("llama3_rope_bias", 0.5),
                                       ("llama_tied", 1.0)])
def test_each_layer_is_numpys_least_squares_on_its_own_inputs(tmp_path, name, keep):
    dense, pruned = _models(tmp_path, name, keep)
    tokens, mask = _tokens(dense.config.vocab_size)
    fitted, info = refit.refit_down(pruned, _dense_model(dense), tokens, mask, ridge=0.0)
    bias = registry.DOWN_BIAS in pruned.layers
    # The reference walks the refit model layer by layer with its own DecoderLayer forward (each
    # layer with its refit weights); the target at each layer is the dense MLP at the same input.
    d = decoder.from_named_arrays(dense.config, dense.named_arrays(), scan=False)
    r = decoder.from_named_arrays(fitted.config, fitted.named_arrays(), scan=False)
    valid = jnp.asarray(mask).astype(bool)
    positions, attend = decoder.padded_positions(valid)
    cos, sin = d.rope(positions)
    x = d.model.embed_tokens(jnp.asarray(tokens))
    on = np.asarray(mask).reshape(-1).astype(bool)
    for l in range(dense.config.num_hidden_layers):
        layer = r.model.layers[l]
        mid = x + layer.self_attn(layer.input_layernorm(x), cos, sin, attend)[0]
        normed = layer.post_attention_layernorm(mid)
        h = np.asarray(layer.mlp.hidden(normed), np.float64)
        h = h.reshape(-1, h.shape[-1])[on]
        if bias:
            h = np.hstack([h, np.ones((len(h), 1))])
        y = np.asarray(d.model.layers[l].mlp(normed), np.float64).reshape(-1, mid.shape[-1])[on]
        want, *_ = np.linalg.lstsq(h, y, rcond=None)
        got = np.asarray(fitted.layers[registry.DOWN][l], np.float64).T
        if bias:
            got = np.vstack([got, np.asarray(fitted.layers[registry.DOWN_BIAS][l])[None]])
        np.testing.assert_allclose(h @ got, h @ want, rtol=0, atol=1e-4 * np.abs(h @ want).max())
        resid = np.sum((y - h @ want) ** 2) / np.sum(y ** 2)
        assert info["layer_error_after"][l] == pytest.approx(resid, rel=1e-3, abs=1e-6)
        assert info["layer_error_after"][l] <= info["layer_error_before"][l] + 1e-9
        x = layer(x, cos, sin, attend)[0]
    if keep == 1.0:  # nothing pruned: the dense down_proj is the exact fit
        np.testing.assert_allclose(fitted.layers[registry.DOWN], dense.layers[registry.DOWN],
                                   rtol=0, atol=1e-3)
        assert max(info["layer_error_before"]) < 1e-9
    else:
        assert info["layer_error_after"][0] < info["layer_error_before"][0]
    untouched = [n for n in pruned.layers if n not in (registry.DOWN, registry.DOWN_BIAS)]
    for n in untouched:
        assert np.array_equal(fitted.layers[n], pruned.layers[n]), n
    assert info["tokens"] == int(mask.sum()) and info["rows"] == len(tokens)


def test_padded_tokens_are_ignored(tmp_path):
    dense, pruned = _models(tmp_path, "llama_gqa_untied", 0.75)
    tokens, mask = _tokens(dense.config.vocab_size)
    other = np.where(mask == 1, tokens, (tokens + 7) % dense.config.vocab_size)
    a, _ = refit.refit_down(pruned, _dense_model(dense), tokens, mask)
    b, _ = refit.refit_down(pruned, _dense_model(dense), other, mask)
    np.testing.assert_allclose(a.layers[registry.DOWN], b.layers[registry.DOWN], rtol=1e-5, atol=1e-6)


def test_refit_model_is_closer_to_dense_on_unseen_tokens(tmp_path):
    dense, pruned = _models(tmp_path, "llama_gqa_untied", 0.5)
    tokens, mask = _tokens(dense.config.vocab_size, rows=32, T=48)
    fitted, _ = refit.refit_down(pruned, _dense_model(dense), tokens, mask)
    held_out = _tokens(dense.config.vocab_size, rows=8, T=48, seed=9)[0]

    def kl(w):
        p = jax.nn.log_softmax(_dense_model(dense)(jnp.asarray(held_out)), -1)
        q = jax.nn.log_softmax(_dense_model(w)(jnp.asarray(held_out)), -1)
        return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))

    assert kl(fitted) < 0.9 * kl(pruned)  # measured 0.84x


def test_rows_longer_than_a_sliding_window_are_refit(tmp_path):
    """Rows longer than the window run through the windowed layers (no refusal), and the refit
    lowers every layer's fit error there too."""
    folder = tiny_models.save_hf_model(tiny_models.make_hf_model("mistral", sliding_window=16),
                                       tmp_path / "m")
    dense = sources.load_model(folder)
    tokens, mask = _tokens(dense.config.vocab_size, T=40)
    pruned = prune.slice_weights(dense, np.tile(np.arange(0, 48, 2), (3, 1)))
    _, info = refit.refit_down(pruned, _dense_model(dense), tokens, mask)
    before, after = np.array(info["layer_error_before"]), np.array(info["layer_error_after"])
    assert np.isfinite(after).all() and (after < before).all()
