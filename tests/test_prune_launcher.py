"""launch.prune end to end on a tiny checkpoint: 1 device, 8 simulated devices, 2 processes x 4."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import tiny_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # 11 layers: not a multiple of 8 or 4, so the layer axis needs padding on every mesh.
    hf = tiny_models.make_hf_model("llama_gqa_untied", num_hidden_layers=11, intermediate_size=40)
    return tiny_models.save_hf_model(hf, tmp_path_factory.mktemp("ckpt") / "tiny-llama")


def _env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _args(checkpoint, out_dir, *extra):
    return [sys.executable, "-m", "launch.prune", f"--model={checkpoint}", "--ratios=0.1,0.5",
            "--episodes=3", f"--out_dir={out_dir}", *extra]


def _run(checkpoint, out_dir, devices, *extra):
    proc = subprocess.run(_args(checkpoint, out_dir, *extra), cwd=ROOT, env=_env(devices),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _load(out_dir):
    summary = json.load(open(os.path.join(out_dir, "results.json")))
    kept = dict(np.load(os.path.join(out_dir, "kept_channels.npz")))
    history = dict(np.load(os.path.join(out_dir, "history.npz")))
    return summary, kept, history


def _assert_same_run(a, b):
    (sa, ka, ha), (sb, kb, hb) = a, b
    assert ka.keys() == kb.keys()
    for name in ka:
        np.testing.assert_array_equal(ka[name], kb[name])  # bitwise-identical kept indices
    np.testing.assert_array_equal(ha["indices"], hb["indices"])
    np.testing.assert_allclose(ha["rewards"], hb["rewards"], rtol=1e-5)
    assert sa["best_episode"] == sb["best_episode"]


@pytest.fixture(scope="module")
def single(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    proc = _run(checkpoint, out, 1)
    return proc, _load(out)


def test_single_device_outputs(single):
    proc, (summary, kept, history) = single
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["results"] == summary["results"]
    assert [r["kept"] for r in summary["results"]] == [36, 20]  # int((1 - r) * 40)
    assert kept["ratio_0.5"].shape == (11, 20)
    assert all((np.diff(k, axis=1) > 0).all() for k in kept.values())  # sorted, no repeats
    assert history["rewards"].shape == (3, 11) and (history["rewards"] > 0).all()
    assert len(summary["episode_seconds"]) == 3
    assert summary["results"][1]["params"] < summary["results"][0]["params"] < summary["dense_params"]


def test_eight_devices_match_one(single, checkpoint, tmp_path):
    _run(checkpoint, tmp_path, 8)
    _assert_same_run(single[1], _load(tmp_path))


def test_two_processes_match_one(single, checkpoint, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(
        _args(checkpoint, tmp_path, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
              f"--process_id={i}"), cwd=ROOT, env=_env(4), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert "mesh: 8 devices over 2 processes" in outs[0][1]
    _assert_same_run(single[1], _load(tmp_path))


@pytest.mark.parametrize("extra,fragment", [
    (["--ratios=0.1,abc"], "--ratios"),
    (["--ratios=1.0"], "ratio 1.0"),
    (["--ratios=-0.1"], "ratio -0.1"),
    (["--ratios=0.99"], "keeps no channel"),  # int(0.01 * 40) == 0
    (["--episodes=0"], "--episodes=0"),
    (["--mode=best"], "mode"),
    (["--update_schedule=daily"], "update_schedule"),
    (["--mesh=64"], "--mesh=64"),
    (["--eval_text=/no/such.txt"], "/no/such.txt"),
])
def test_user_errors(checkpoint, tmp_path, extra, fragment):
    out = tmp_path / "out"
    proc = subprocess.run(_args(checkpoint, out, *extra), cwd=ROOT, env=_env(1),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, last
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # validated before anything was written


def test_out_dir_inside_input_checkpoint_is_refused(checkpoint):
    before = sorted(os.listdir(checkpoint))
    proc = subprocess.run(_args(checkpoint, os.path.join(checkpoint, "out")), cwd=ROOT, env=_env(1),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "inside the input checkpoint" in proc.stderr
    assert sorted(os.listdir(checkpoint)) == before
