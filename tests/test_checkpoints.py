"""orbax checkpoints: policy, training state (resume), sliced models (incl. restore on 8 devices)."""
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

from prunenet_jax import prune
from prunenet_jax.formats import orbax as orbax_format
from prunenet_jax import sources
from prunenet_jax.method import episode, trainer
from prunenet_jax.errors import UserError
from tests import tiny_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sliced(tmp_path_factory):
    """A tiny model sliced to 7 of 40 channels per layer, and its kept indices."""
    folder = tiny_models.save_hf_model(
        tiny_models.make_hf_model("llama3_rope_bias", num_hidden_layers=5, intermediate_size=40),
        tmp_path_factory.mktemp("src") / "tiny")
    weights = sources.load_model(str(folder))
    rng = np.random.default_rng(0)
    kept = np.sort(np.stack([rng.permutation(40)[:7] for _ in range(5)]), axis=1)
    return prune.slice_weights(weights, kept), kept


def _assert_same_weights(a, b):
    assert a.config == b.config and a.hf_config == b.hf_config
    na, nb = dict(a.named_arrays()), dict(b.named_arrays())
    assert na.keys() == nb.keys()
    for name in na:
        assert na[name].dtype == nb[name].dtype, name
        np.testing.assert_array_equal(na[name], nb[name], err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_sliced_model_round_trip(sliced, tmp_path, dtype):
    weights, kept = sliced
    weights = weights.astype(dtype)
    path = tmp_path / "m"
    orbax_format.save_model(str(path), weights, {"ratio": 0.825, "seed": 3}, kept=kept)
    back = orbax_format.load_model(str(path), dtype=None)
    _assert_same_weights(weights, back)
    np.testing.assert_array_equal(orbax_format.load_kept(str(path)), kept)
    assert orbax_format.read_meta(str(path))["ratio"] == 0.825
    # sources.load_model recognises the folder, so every --model flag accepts it.
    _assert_same_weights(weights, sources.load_model(str(path), dtype=None))


def test_a_relative_path_reads_as_its_absolute_one(sliced, tmp_path, monkeypatch):
    """orbax restores absolute paths only; a user's relative --model/--input must work too."""
    weights = sliced[0]
    orbax_format.save_model(str(tmp_path / "run" / "m"), weights, {"ratio": 0.5})
    monkeypatch.chdir(tmp_path)
    assert orbax_format.read_meta(os.path.join("run", "m"))["ratio"] == 0.5
    _assert_same_weights(weights, orbax_format.load_model(os.path.join("run", "m"), dtype=None))


def test_policy_round_trip_and_kind_checks(sliced, tmp_path):
    params = jax.tree.map(np.asarray, trainer.initial_params(5, 40, 32))
    orbax_format.save_policy(str(tmp_path / "policy"), params, {"seed": 5})
    back, meta = orbax_format.load_policy(str(tmp_path / "policy"))
    for name in params:
        np.testing.assert_array_equal(back[name], params[name])
    assert (meta["intermediate_size"], meta["hidden_size"], meta["seed"]) == (40, 32, 5)
    orbax_format.save_model(str(tmp_path / "model"), sliced[0], {})
    with pytest.raises(UserError, match="another kind of checkpoint"):
        orbax_format.load_policy(str(tmp_path / "model"))
    with pytest.raises(UserError, match="another kind of checkpoint"):
        orbax_format.load_model(str(tmp_path / "policy"))
    with pytest.raises(UserError, match="no such folder"):
        orbax_format.load_policy(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="trained for"):
        orbax_format.check_policy_fits(meta, sliced[0].config, "tiny", "policy")


def test_overwrite_swaps_and_refuses_without_flag(sliced, tmp_path):
    weights, kept = sliced
    path = tmp_path / "m"
    orbax_format.save_model(str(path), weights, {"ratio": 0.1})
    with pytest.raises(UserError, match="--overwrite"):
        orbax_format.save_model(str(path), weights, {"ratio": 0.2})
    assert orbax_format.read_meta(str(path))["ratio"] == 0.1
    orbax_format.save_model(str(path), weights, {"ratio": 0.2}, overwrite=True)
    assert orbax_format.read_meta(str(path))["ratio"] == 0.2
    assert os.listdir(tmp_path) == ["m"]  # no temporary or old folders left behind


def test_interrupted_save_leaves_nothing(sliced, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.Checkpointer, "save", fail)
    with pytest.raises(OSError):
        orbax_format.save_model(str(tmp_path / "m"), sliced[0], {})
    assert os.listdir(tmp_path) == []


def test_training_resumes_to_the_uninterrupted_result(tmp_path):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((3, 24, 16)).astype(np.float32)
    cfg = episode.TrainConfig(ratio=0.5)
    full = trainer.train(W, cfg, seed=7, num_episodes=5)

    run_meta = {"seed": 7, "train_config": {"ratio": 0.5}}
    ckpts = orbax_format.TrainCheckpoints(str(tmp_path / "state"), run_meta)
    saver = lambda done, state, history: ckpts.save(done, state, trainer.history_arrays(history))
    trainer.train(W, cfg, seed=7, num_episodes=2, on_state=saver)
    ckpts.wait()
    assert ckpts.latest_episode() == 2

    reopened = orbax_format.TrainCheckpoints(str(tmp_path / "state"), run_meta)
    template = episode.init_state(trainer.initial_params(7, 24, 16), cfg)
    state, history, done = reopened.restore(template, lambda e: trainer.history_template(e, 3, 12))
    assert done == 2
    resumed = trainer.train(W, cfg, seed=7, num_episodes=5,
                          resume_from=(state, trainer.history_from_arrays(history)))
    for name in full.state.best_params:
        np.testing.assert_array_equal(np.asarray(resumed.state.best_params[name]),
                                      np.asarray(full.state.best_params[name]))
        np.testing.assert_array_equal(np.asarray(resumed.state.params[name]),
                                      np.asarray(full.state.params[name]))
    assert [float(m.total_reward) for m in resumed.history] == \
        [float(m.total_reward) for m in full.history]

    other = orbax_format.TrainCheckpoints(str(tmp_path / "state"), {**run_meta, "seed": 8})
    with pytest.raises(UserError, match="seed: saved 7 vs now 8"):
        other.restore(template, lambda e: trainer.history_template(e, 3, 12))


_RESTORE_ON_8 = """
import sys, numpy as np, jax
from prunenet_jax.formats import orbax as orbax_format
from prunenet_jax.method import sharding
mesh = sharding.make_mesh(8)
arrays, meta = orbax_format.restore_model_arrays(sys.argv[1], mesh)
expected = np.load(sys.argv[2])
split = 0
for group in ("globals", "layers"):
    for name, a in arrays[group].items():
        assert len(a.sharding.device_set) == 8, name
        split += not a.sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(a), expected[group + "/" + name], err_msg=name)
assert split > 0, "nothing was split over the mesh"
print("ok", split)
"""


def test_sliced_params_restore_on_eight_devices_equal_saved_from_one(sliced, tmp_path):
    weights, kept = sliced
    assert jax.device_count() == 1
    orbax_format.save_model(str(tmp_path / "m"), weights, {}, kept=kept)
    expected = {f"globals/{n}": a for n, a in weights.globals.items()}
    expected.update({f"layers/{n}": a for n, a in weights.layers.items()})
    np.savez(tmp_path / "expected.npz", **expected)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", _RESTORE_ON_8, str(tmp_path / "m"),
                           str(tmp_path / "expected.npz")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")
