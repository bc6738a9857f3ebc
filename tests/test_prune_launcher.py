"""launch.prune end to end on a tiny checkpoint: 1 device, 8 simulated devices, 2 processes x 4."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from prunenet_jax.formats import orbax as orbax_format
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
            "--episodes=3", f"--out_dir={out_dir}", "--export_hf", *extra]


def _run(checkpoint, out_dir, devices, *extra):
    proc = subprocess.run(_args(checkpoint, out_dir, *extra), cwd=ROOT, env=_env(devices),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _export_bytes(out_dir, entry):
    """Every file of an HF export; the model card without its command line (paths differ)."""
    folder = os.path.join(out_dir, entry["hf_dir"])
    files = {}
    for name in sorted(os.listdir(folder)):
        data = open(os.path.join(folder, name), "rb").read()
        if name == "README.md":
            data = b"\n".join(l for l in data.split(b"\n") if b"launch.prune" not in l)
        files[name] = data
    return files


def _load(out_dir):
    """(manifest, kept channels per ratio, policy params, HF export bytes per ratio) of a run."""
    manifest = json.load(open(os.path.join(out_dir, "manifest.json")))
    kept = {e["ratio"]: orbax_format.load_kept(os.path.join(out_dir, e["orbax_dir"]))
            for e in manifest["outputs"]}
    policy, _ = orbax_format.load_policy(os.path.join(out_dir, "policy"))
    exports = {e["ratio"]: _export_bytes(out_dir, e) for e in manifest["outputs"] if e["hf_dir"]}
    return manifest, kept, policy, exports


def _without_fingerprint(exports):
    return {r: {n: b"\n".join(l for l in d.split(b"\n") if b"fingerprint" not in l) if n == "README.md"
                else d for n, d in files.items()} for r, files in exports.items()}


def _assert_same_run(a, b, same_devices=False):
    """Same kept channels and byte-identical HF exports. Across device counts the policy may
    differ in the last float bit (XLA sums in another order), so its fingerprint in the model card
    may too; with the same devices everything is identical."""
    (ma, ka, pa, ea), (mb, kb, pb, eb) = a, b
    assert ea.keys() == ka.keys()
    assert (ea == eb) if same_devices else (_without_fingerprint(ea) == _without_fingerprint(eb))
    assert ka.keys() == kb.keys()
    for ratio in ka:
        np.testing.assert_array_equal(ka[ratio], kb[ratio])  # bitwise-identical kept indices
    for name in pa:  # gradient sums over devices may round differently in the last bit
        np.testing.assert_allclose(pa[name], pb[name], rtol=1e-5, atol=1e-7)
    assert ma["training"]["best_episode"] == mb["training"]["best_episode"]


@pytest.fixture(scope="module")
def single(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    proc = _run(checkpoint, out, 1)
    return proc, _load(out)


def test_single_device_outputs(single):
    proc, (manifest, kept, policy, exports) = single
    assert set(exports[0.5]) >= {"config.json", "model.safetensors", "README.md"}
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["outputs"] == manifest["outputs"]
    assert [e["kept"] for e in manifest["outputs"]] == [36, 20]  # int((1 - r) * 40)
    assert [e["status"] for e in manifest["outputs"]] == ["done", "done"]
    assert [e["orbax_dir"] for e in manifest["outputs"]] == ["ratio_0.1/orbax", "ratio_0.5/orbax"]
    assert [e["hf_dir"] for e in manifest["outputs"]] == ["ratio_0.1/hf", "ratio_0.5/hf"]
    assert kept[0.5].shape == (11, 20)
    assert all((np.diff(k, axis=1) > 0).all() for k in kept.values())  # sorted, no repeats
    assert policy["P"].shape == (40, 32)
    rewards = manifest["training"]["episode_total_rewards"]
    assert len(rewards) == 3 and min(rewards) > 0
    assert len(manifest["training"]["episode_seconds"]) == 3
    params = [e["params"] for e in manifest["outputs"]]
    assert params[1] < params[0] < manifest["dense_params"]


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
    assert proc.returncode == 2 and "inside the input" in proc.stderr
    assert sorted(os.listdir(checkpoint)) == before


def _latest_episode_dir(out_dir):
    folder = os.path.join(out_dir, "train_state")
    steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
    return max(steps, default=0)


def test_sigkill_during_training_then_resume_gives_the_uninterrupted_policy(checkpoint, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    _run(checkpoint, full, 1, "--episodes=60")
    proc = subprocess.Popen(_args(checkpoint, killed, "--episodes=60"), cwd=ROOT, env=_env(1),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _latest_episode_dir(killed) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists()  # killed during training
    stopped_at = _latest_episode_dir(killed)
    assert 3 <= stopped_at < 60
    _run(checkpoint, killed, 1, "--episodes=60", "--resume")
    resumed = _load(killed)
    assert stopped_at <= resumed[0]["training"]["resumed_after"] < 60
    expected = _load(full)
    for ratio in expected[1]:
        np.testing.assert_array_equal(resumed[1][ratio], expected[1][ratio])
    for name in expected[2]:  # bit for bit: same device count, same episodes
        np.testing.assert_array_equal(resumed[2][name], expected[2][name])
    assert resumed[0]["training"]["episode_total_rewards"] == expected[0]["training"]["episode_total_rewards"]


def test_saved_policy_is_reused_without_training(single, checkpoint, tmp_path):
    first_out = tmp_path / "first"
    _run(checkpoint, first_out, 1)
    out = tmp_path / "reuse"
    proc = _run(checkpoint, out, 1, f"--policy={first_out / 'policy'}", "--ratios=0.5,0.25")
    manifest, kept, _ = _load_outputs_only(out)
    assert manifest["training"] == {"policy": str(first_out / "policy")}
    assert "episodes:" not in proc.stderr  # no training progress bar
    assert "warning: --episodes is ignored: --policy is given" in proc.stderr
    assert not (out / "train_state").exists() and not (out / "policy").exists()
    # Same policy, seed and ratio: the same channels as the run that trained it.
    np.testing.assert_array_equal(kept[0.5], single[1][1][0.5])
    assert kept[0.25].shape == (11, 30)


def _load_outputs_only(out_dir):
    manifest = json.load(open(os.path.join(out_dir, "manifest.json")))
    kept = {e["ratio"]: orbax_format.load_kept(os.path.join(out_dir, e["orbax_dir"]))
            for e in manifest["outputs"]}
    return manifest, kept, None


def test_existing_out_dir_needs_overwrite_or_resume(single, checkpoint, tmp_path):
    out = tmp_path / "out"
    _run(checkpoint, out, 1, "--episodes=1")
    before = {p: os.path.getmtime(os.path.join(out, p)) for p in os.listdir(out)}
    for extra, fragment in [([], "--overwrite"), (["--resume", "--overwrite"], "only one")]:
        proc = subprocess.run(_args(checkpoint, out, *extra), cwd=ROOT, env=_env(1),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and fragment in proc.stderr.strip().splitlines()[-1]
        assert {p: os.path.getmtime(os.path.join(out, p)) for p in os.listdir(out)} == before
    _run(checkpoint, out, 1, "--overwrite")  # 3 episodes now, replacing the 1-episode run
    _assert_same_run(single[1], _load(out), same_devices=True)  # two runs, same bytes
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temporary folders left


def test_policy_for_other_shapes_is_refused(single, checkpoint, tmp_path):
    other = tiny_models.save_hf_model(
        tiny_models.make_hf_model("llama_gqa_untied", num_hidden_layers=2, intermediate_size=24),
        tmp_path / "other")
    first_out = tmp_path / "first"
    _run(checkpoint, first_out, 1, "--episodes=1")
    out = tmp_path / "out"
    proc = subprocess.run(_args(other, out, f"--policy={first_out / 'policy'}"), cwd=ROOT,
                          env=_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "(24, 32)" in last and "(40, 32)" in last and "--policy" in last
    assert not out.exists()


def test_checkpoint_every_saves_less_often_and_the_last(checkpoint, tmp_path):
    out = tmp_path / "out"
    _run(checkpoint, out, 1, "--episodes=5", "--checkpoint_every=2")
    steps = sorted(int(n) for n in os.listdir(out / "train_state") if n.isdigit())
    assert steps == [4, 5]  # every 2nd episode and the last; the newest two are kept
