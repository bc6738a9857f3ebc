"""Our Flax LLaMA against transformers' PyTorch models on tiny random configs."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from prunenet_jax.models import decoder
from prunenet_jax import sources
from tests import tiny_models


def _ours(folder):
    weights = sources.load_model(folder)
    return weights, decoder.from_named_arrays(weights.config, weights.named_arrays())


def _masks():
    mask = np.ones((3, 12), np.int64)
    mask[1, 8:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    return mask


@pytest.mark.parametrize("name", sorted(tiny_models.CONFIGS))
@pytest.mark.parametrize("padded", [False, True])
def test_logits_match_transformers(tmp_path, name, padded):
    hf = tiny_models.make_hf_model(name)
    folder = tiny_models.save_hf_model(hf, tmp_path / name)
    _, model = _ours(folder)
    tokens = np.random.default_rng(1).integers(0, hf.config.vocab_size, (3, 12))
    mask = _masks() if padded else np.ones_like(tokens)
    with torch.no_grad():
        want = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert got.shape == want.shape
    diff = np.abs(got - want)[valid].max()
    assert diff < 1e-4, diff
    assert np.abs(want).max() > 0.1  # the comparison is not between near-zero logits


def test_per_layer_widths_run_and_equal_zeroed_channels(tmp_path):
    """A model with a different MLP width per layer equals the dense one with dropped channels zeroed."""
    hf = tiny_models.make_hf_model("llama_gqa_untied")
    weights, dense = _ours(tiny_models.save_hf_model(hf, tmp_path / "m"))
    rng = np.random.default_rng(0)
    widths = (48, 31, 17)
    kept = [np.sort(rng.choice(48, w, replace=False)) for w in widths]
    named, zeroed = {}, {}
    for name, arr in weights.named_arrays():
        named[name] = arr
        zeroed[name] = np.array(arr)
    for i, keep in enumerate(kept):
        p = f"model.layers.{i}.mlp."
        named[p + "gate_proj.weight"] = named[p + "gate_proj.weight"][keep]
        named[p + "up_proj.weight"] = named[p + "up_proj.weight"][keep]
        named[p + "down_proj.weight"] = named[p + "down_proj.weight"][:, keep]
        drop = np.setdiff1d(np.arange(48), keep)
        zeroed[p + "down_proj.weight"][:, drop] = 0.0
    import dataclasses
    cfg = dataclasses.replace(weights.config, intermediate_sizes=widths)
    sliced = decoder.from_named_arrays(cfg, named.items())
    reference = decoder.from_named_arrays(weights.config, zeroed.items())
    tokens = jnp.asarray(rng.integers(0, 97, (2, 10)))
    np.testing.assert_allclose(np.asarray(sliced(tokens)), np.asarray(reference(tokens)), atol=1e-5)
    assert not np.allclose(np.asarray(sliced(tokens)), np.asarray(dense(tokens)), atol=1e-3)


WINDOWED = {  # sequences several times the window: every layer windowed, or only some
    "mistral": dict(sliding_window=5),
    "qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
}


@pytest.mark.parametrize("name", sorted(WINDOWED))
def test_sliding_window_masks_match_transformers_past_the_window(tmp_path, name):
    hf = tiny_models.make_hf_model(name, **WINDOWED[name])
    _, model = _ours(tiny_models.save_hf_model(hf, tmp_path / name))
    assert model.config.windowed() == ((True,) * 3 if name == "mistral" else (False, True, True))
    tokens = np.random.default_rng(2).integers(0, hf.config.vocab_size, (2, 40))
    mask = np.ones_like(tokens)
    mask[1, :9] = 0  # left padding
    with torch.no_grad():
        want = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
        full = hf(torch.tensor(tokens[:1])).logits.numpy()
    got = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
    diff = np.abs(got - want)[mask.astype(bool)].max()
    assert diff < 1e-4, diff
    # The window matters here: the same weights without it give other logits.
    plain = tiny_models.make_hf_model(name, sliding_window=None)
    with torch.no_grad():
        unwindowed = plain(torch.tensor(tokens[:1])).logits.numpy()
    assert np.abs(unwindowed[:, :5] - full[:, :5]).max() < 1e-5  # within the window: equal
    assert np.abs(unwindowed - full).max() > 1e-2
