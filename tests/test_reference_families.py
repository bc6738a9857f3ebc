"""OPT, Phi (phi-2 style) and Falcon (7B style) against the authors' reference (`efficient-pruners`
0.1.0), on the fixtures `bench/reference/export_family_fixtures.py` exported from its own code
path: tiny random HF folders (tests/data/reference/families/tiny-<family>/), one episode of its
fit() and its compress(0.3) (tests/data/reference/families/<family>.{npz,json}).

The reference scores the FIRST FFN matrix of each family (OPT fc1, Phi mlp.fc1, Falcon
mlp.dense_h_to_4h), slices its rows (and its bias) and the columns of the second one (fc2,
dense_4h_to_h; that bias kept). We load the same folder, score `registry.scored(config)` (the
canonical `mlp.up_proj.weight` for these plain fc1/fc2 MLPs), drive our episode exactly as
tests/test_reference_equivalence.py does on the reference's noise and actions, and slice with the
reference's kept indices.

Tests whose name holds `fixture_matrix` need only the fixture; the rest load the folder with our
loader.
"""
import functools
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from prunenet_jax.method import episode, policy
from tests.test_reference_equivalence import _episode as _equivalence_episode

DATA = os.path.join(os.path.dirname(__file__), "data", "reference", "families")
FAMILIES = ("opt", "phi", "falcon")
# The reference's first/second FFN module per family (efficient_pruners/utils/model_utils.py).
FIRST_FFN = {"opt": "fc1", "phi": "mlp.fc1", "falcon": "mlp.dense_h_to_4h"}
SECOND_FFN = {"opt": "fc2", "phi": "mlp.fc2", "falcon": "mlp.dense_4h_to_h"}
HAS_MLP_BIAS = {"opt": True, "phi": True, "falcon": False}


@functools.lru_cache(maxsize=None)
def _fixture(family):
    with open(os.path.join(DATA, f"{family}.json")) as fh:
        settings = json.load(fh)
    return dict(np.load(os.path.join(DATA, f"{family}.npz"))), settings


def _folder(family):
    return os.path.join(DATA, f"tiny-{family}")


@functools.lru_cache(maxsize=None)
def _file_tensors(family):
    """The folder's tensors by HF name, read straight from its safetensors file."""
    return load_file(os.path.join(_folder(family), "model.safetensors"))


def _stacked(family, template):
    """A per-layer HF tensor stacked over layers, from the folder's file."""
    _, s = _fixture(family)
    st = _file_tensors(family)
    return np.stack([st[template.format(l)] for l in range(s["L"])])


@functools.lru_cache(maxsize=None)
def _loaded(family):
    from prunenet_jax import sources

    return sources.load_model(_folder(family))


def _scored(w):
    from prunenet_jax.models import registry

    return w.layers[registry.scored(w.config)]


def _as_equivalence_fixture(ref, W):
    """The keys tests/test_reference_equivalence.py's `_episode` reads (its fixture has a leading
    episode axis; ours holds one episode)."""
    return {"gate_w": np.asarray(W), "init_P": ref["init_P"], "init_b": ref["init_b"],
            "init_r": ref["init_r"], "idx": ref["idx"][None], "loss_u": ref["loss_u"][None]}


def _matrix(family, source):
    ref, _ = _fixture(family)
    return ref["scored_w"] if source == "fixture_matrix" else _scored(_loaded(family))


SOURCES = ("fixture_matrix", "loaded_matrix")


# ----------------------------------------------------------------------------- the fixture itself

@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_matrix_is_the_first_ffn_matrix_of_the_folder(family):
    """What the reference scored is the folder's first FFN weight (not the second one transposed),
    and its compress() sliced the first FFN's rows, the second's columns and only the first's bias."""
    ref, s = _fixture(family)
    lay = s["reference_modules"]["layers"]
    assert s["reference_modules"]["scored"] == FIRST_FFN[family] + ".weight"
    first = _stacked(family, lay + FIRST_FFN[family] + ".weight")
    second = _stacked(family, lay + SECOND_FFN[family] + ".weight")
    np.testing.assert_array_equal(ref["scored_w"], first)
    assert ref["scored_w"].shape == (s["L"], s["I"], s["H"]) and s["I"] > s["H"]
    assert not np.allclose(ref["scored_w"], second.transpose(0, 2, 1), atol=1e-2)
    idx = ref["compress_idx"]
    assert idx.shape == (s["L"], s["k"]) and s["k"] == int((1 - s["ratio"]) * s["I"])
    assert s["ffn_width_after"] == s["k"] < s["I"] == s["ffn_width_before"]
    assert s["config_width_after"] == s["I"]  # the reference leaves the config's width stale
    rows = idx[:, :, None]
    np.testing.assert_array_equal(ref["sliced_up_w"], np.take_along_axis(first, rows, 1))
    np.testing.assert_array_equal(ref["sliced_down_w"], np.take_along_axis(second, idx[:, None, :], 2))
    assert ("sliced_up_b" in ref) == ("sliced_down_b" in ref) == HAS_MLP_BIAS[family]
    if HAS_MLP_BIAS[family]:
        b1 = _stacked(family, lay + FIRST_FFN[family] + ".bias")
        np.testing.assert_array_equal(ref["sliced_up_b"], np.take_along_axis(b1, idx, 1))
        np.testing.assert_array_equal(ref["sliced_down_b"],
                                      _stacked(family, lay + SECOND_FFN[family] + ".bias"))


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_matrix_spectrum_is_not_the_second_ffn_matrix(family):
    """A wrong role mapping (scoring fc2 / dense_4h_to_h) gives other singular values and logits
    than the reference's, so the comparisons below can tell the roles apart."""
    ref, s = _fixture(family)
    second = _stacked(family, s["reference_modules"]["layers"] + SECOND_FFN[family] + ".weight")
    wrong = jnp.asarray(second.transpose(0, 2, 1))
    sv_wrong = np.asarray(episode.reference_singular_values(wrong))
    assert np.abs(sv_wrong - ref["sv_ref"]).max() > 100 * 1e-4 * ref["sv_ref"].max()
    params = {n: jnp.asarray(ref[f"init_{n}"]) for n in "Pbr"}
    z_wrong = np.asarray(policy.policy_logits(params, wrong))
    assert np.abs(z_wrong - ref["fp32_sample_z"]).max() > 1e-2


# ----------------------------------------------------------------------------- our loader

@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_scored_matrix_equals_references(family):
    from prunenet_jax.models import registry

    ref, s = _fixture(family)
    w = _loaded(family)
    assert w.config.model_type == family
    assert (w.config.num_hidden_layers, w.config.intermediate_size, w.config.hidden_size) == (
        s["L"], s["I"], s["H"])
    assert registry.scored(w.config) == registry.UP  # plain fc1/fc2 MLP: no gate
    assert registry.GATE not in w.layers
    np.testing.assert_array_equal(_scored(w), ref["scored_w"])


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_ffn_roles_are_the_references(family):
    """Every canonical FFN tensor is the HF tensor the reference gives that role: up = first FFN
    (+ bias), down = second FFN (+ bias); Falcon (bias=False) has no MLP biases."""
    from prunenet_jax.models import registry

    _, s = _fixture(family)
    w = _loaded(family)
    lay = s["reference_modules"]["layers"]
    np.testing.assert_array_equal(w.layers[registry.UP], _stacked(family, lay + FIRST_FFN[family] + ".weight"))
    np.testing.assert_array_equal(w.layers[registry.DOWN], _stacked(family, lay + SECOND_FFN[family] + ".weight"))
    assert (registry.UP_BIAS in w.layers) == (registry.DOWN_BIAS in w.layers) == HAS_MLP_BIAS[family]
    if HAS_MLP_BIAS[family]:
        np.testing.assert_array_equal(w.layers[registry.UP_BIAS], _stacked(family, lay + FIRST_FFN[family] + ".bias"))
        np.testing.assert_array_equal(w.layers[registry.DOWN_BIAS], _stacked(family, lay + SECOND_FFN[family] + ".bias"))


# ----------------------------------------------------------------------------- the episode

@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("family", FAMILIES)
def test_singular_values_equal_references(family, source):
    ref, _ = _fixture(family)
    sv = episode.reference_singular_values(jnp.asarray(_matrix(family, source)))
    np.testing.assert_allclose(np.asarray(sv), ref["sv_ref"], rtol=1e-4)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_reference_fp32(family, source):
    ref, _ = _fixture(family)
    params = {n: jnp.asarray(ref[f"init_{n}"]) for n in "Pbr"}
    z = policy.policy_logits(params, jnp.asarray(_matrix(family, source)))
    np.testing.assert_allclose(np.asarray(z), ref["fp32_sample_z"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("family", FAMILIES)
def test_episode_equals_references(family, source):
    """Rewards per layer, losses and the one episode-schedule AdamW step, on the reference's
    sampled rows and loss-pass noise (its real step was skipped by GradScaler: fp16 overflow at
    scale 65536, so the targets are its fp32 replays, as in test_reference_equivalence)."""
    ref, s = _fixture(family)
    assert not s["step_called"] and s["found_inf"] == 1.0
    params, _, metrics = _equivalence_episode(_as_equivalence_fixture(ref, _matrix(family, source)),
                                              "episode")
    np.testing.assert_array_equal(np.asarray(metrics.indices), ref["idx"])
    np.testing.assert_allclose(np.asarray(metrics.ks), ref["ks"], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics.rewards), ref["reward"], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(metrics.discounted_rewards), ref["discounted"], rtol=1e-5)
    np.testing.assert_allclose(float(metrics.total_reward), s["history_episode_rewards"][0], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(metrics.losses), ref["fp32_loss"], rtol=1e-4)
    np.testing.assert_allclose(np.asarray(metrics.losses), ref["loss"], rtol=5e-3)  # its fp16 pass
    assert np.abs(np.asarray(params["P"]) - ref["init_P"]).max() > 1e-4  # a real step
    for n in "Pbr":
        np.testing.assert_allclose(np.asarray(params[n]), ref[f"fp32_episode_after_{n}"],
                                   atol=5e-7, err_msg=n)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("family", FAMILIES)
def test_layer_schedule_equals_references_module(family, source):
    ref, _ = _fixture(family)
    params, _, metrics = _equivalence_episode(_as_equivalence_fixture(ref, _matrix(family, source)),
                                              "layer")
    np.testing.assert_allclose(np.asarray(metrics.losses), ref["fp32_layer_loss"], rtol=1e-4)
    for n in "Pbr":
        np.testing.assert_allclose(np.asarray(params[n]), ref[f"fp32_layer_after_{n}"],
                                   atol=5e-7, err_msg=n)


# ----------------------------------------------------------------------------- slicing, export

def _sliced(family):
    from prunenet_jax import prune

    ref, _ = _fixture(family)
    return prune.slice_weights(_loaded(family), ref["compress_idx"])


@pytest.mark.parametrize("family", FAMILIES)
def test_slice_weights_equals_references_compress(family):
    from prunenet_jax.models import registry

    ref, s = _fixture(family)
    w = _loaded(family)
    sliced = _sliced(family)
    assert sliced.config.intermediate_size == s["ffn_width_after"] == s["k"] < w.config.intermediate_size
    np.testing.assert_array_equal(sliced.layers[registry.UP], ref["sliced_up_w"])
    np.testing.assert_array_equal(sliced.layers[registry.DOWN], ref["sliced_down_w"])
    if HAS_MLP_BIAS[family]:
        np.testing.assert_array_equal(sliced.layers[registry.UP_BIAS], ref["sliced_up_b"])
        np.testing.assert_array_equal(sliced.layers[registry.DOWN_BIAS], ref["sliced_down_b"])
    ffn = {registry.UP, registry.DOWN, registry.UP_BIAS, registry.DOWN_BIAS}
    assert set(sliced.layers) == set(w.layers)
    for name in set(w.layers) - ffn:  # everything else untouched, as in the reference
        np.testing.assert_array_equal(sliced.layers[name], w.layers[name], err_msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_hf_writes_references_sliced_tensors_by_hf_name(family, tmp_path):
    """Exported with HF names: the reference's compressed FFN tensors under its own names, every
    other tensor of the source folder unchanged, and the family's width key set to k (the
    reference leaves it stale)."""
    from prunenet_jax.formats.hf_export import export_hf

    ref, s = _fixture(family)
    out = export_hf(_sliced(family), str(tmp_path / f"pruned-{family}"))
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    got = {}
    for f in shards:
        got.update(load_file(os.path.join(out, f)))
    source = _file_tensors(family)
    assert set(got) == set(source)
    sliced_names = set()
    for role, template in s["sliced_names"].items():
        names = [template.format(l) for l in range(s["L"])]
        sliced_names.update(names)
        np.testing.assert_array_equal(np.stack([got[n] for n in names]), ref[f"sliced_{role}"],
                                      err_msg=template)
    for name in set(source) - sliced_names:
        np.testing.assert_array_equal(got[name], source[name], err_msg=name)
    with open(os.path.join(out, "config.json")) as fh:
        config = json.load(fh)
    assert config["model_type"] == family
    assert config[s["width_key"]] == s["k"]


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_equals_references_model_and_compressed_model(family):
    """Our forward of the loaded model and of slice_weights(reference's kept rows) give the
    logits of the reference's model and of its compress() output (torch, fp32)."""
    from prunenet_jax.models import decoder

    ref, _ = _fixture(family)
    tokens = jnp.asarray(ref["tokens"])
    for weights, want in ((_loaded(family), ref["full_logits"]), (_sliced(family), ref["compressed_logits"])):
        model = decoder.from_named_arrays(weights.config, weights.named_arrays())
        got = np.asarray(model(tokens, jnp.ones_like(tokens)))
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(ref["compressed_logits"] - ref["full_logits"]).max() > 1e-3  # slicing mattered
