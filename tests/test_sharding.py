import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from prunenet_jax.method import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _RecordingArray:
    """A host array that records which layer ranges were read from it."""

    def __init__(self, a):
        self.a, self.shape, self.dtype, self.reads = a, a.shape, a.dtype, []

    def __getitem__(self, item):
        self.reads.append(item)
        return self.a[item]


def test_padding_helpers():
    assert sharding.padded_num_layers(30, 8) == 32
    assert sharding.padded_num_layers(32, 8) == 32
    assert sharding.padded_num_layers(30, 1) == 30
    x = np.arange(6.0).reshape(3, 2)
    p = sharding.pad_layers(x, 5)
    np.testing.assert_array_equal(p, [[0, 1], [2, 3], [4, 5], [0, 0], [0, 0]])
    assert sharding.pad_layers(x, 3) is x
    np.testing.assert_array_equal(sharding.valid_mask(3, 5), [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(sharding.unpad({"a": p}, 3)["a"], x)
    with pytest.raises(ValueError):
        sharding.pad_layers(x, 2)


def test_place_stacked_single_device():
    mesh = sharding.make_mesh(1)
    x = np.random.default_rng(0).standard_normal((3, 4, 2)).astype(np.float32)
    arr = sharding.place_stacked(x, mesh)
    assert arr.shape == x.shape and arr.sharding == sharding.layer_sharding(mesh)
    np.testing.assert_array_equal(arr, x)
    arr = sharding.place_stacked(x, mesh, num_padded=5)
    np.testing.assert_array_equal(arr, sharding.pad_layers(x, 5))


_MULTI_DEVICE_SCRIPT = textwrap.dedent(r"""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, sys.argv[1])
    import jax, jax.numpy as jnp, numpy as np
    from prunenet_jax.method import sharding
    from prunenet_jax.method import episode, trainer
    from tests.test_sharding import _RecordingArray
    assert jax.device_count() == 8, jax.devices()

    # place_stacked: 30 layers -> 32 on 8 devices; each device gets (and reads) only its 4 layers.
    x = np.random.default_rng(0).standard_normal((30, 5, 3)).astype(np.float32)
    rec = _RecordingArray(x)
    mesh8 = sharding.make_mesh(8)
    arr = sharding.place_stacked(rec, mesh8)
    assert arr.shape == (32, 5, 3)
    padded = sharding.pad_layers(x, 32)
    assert len(arr.addressable_shards) == 8
    for shard in arr.addressable_shards:
        assert shard.data.shape == (4, 5, 3)
        np.testing.assert_array_equal(np.asarray(shard.data), padded[shard.index])
    assert rec.reads and all(r.stop - r.start <= 4 for r in rec.reads), rec.reads

    # Training: same seed -> same actions on no mesh, a 1-device mesh and an 8-device mesh.
    L, I, H = 30, 40, 12
    W = np.random.default_rng(1).standard_normal((L, I, H)).astype(np.float32)
    sv0 = episode.reference_singular_values(jnp.asarray(W))
    sv8 = episode.reference_singular_values(sharding.place_stacked(W, mesh8), mesh=mesh8)
    np.testing.assert_allclose(np.asarray(sv8)[:L], sv0, rtol=1e-6)
    for schedule in ("layer", "episode"):
        cfg = episode.TrainConfig(ratio=0.3, schedule=schedule)
        runs = {name: trainer.train(W, cfg, seed=42, num_episodes=3, mesh=mesh)
                for name, mesh in (("none", None), ("1", sharding.make_mesh(1)), ("8", mesh8))}
        base = runs["none"]
        for name, res in runs.items():
            assert len(res.history) == 3
            for e, (a, b) in enumerate(zip(base.history, res.history)):
                assert a.indices.shape == (L, 28)
                np.testing.assert_array_equal(a.indices, b.indices, err_msg=f"{schedule} {name} {e}")
                np.testing.assert_allclose(a.rewards, b.rewards, rtol=1e-5)
                np.testing.assert_allclose(a.total_reward, b.total_reward, rtol=1e-5)
            assert int(res.state.best_episode) == int(base.state.best_episode)
            for k in base.state.params:
                np.testing.assert_allclose(res.state.params[k], base.state.params[k], atol=1e-5)
        assert runs["8"].state.params["P"].sharding.is_fully_replicated
        # the episodes differ from each other (the comparison above is not vacuous)
        assert not np.array_equal(base.history[0].indices, base.history[1].indices)
    print("OK")
""")


def test_one_vs_eight_devices_same_actions():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", _MULTI_DEVICE_SCRIPT, ROOT], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr
