"""launch.batch_prune on tiny checkpoints: many checkpoints x ratios, failures isolated, resume
after SIGKILL, shards and their merge, and a policy trained on the first checkpoint."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from prunenet_jax.formats import orbax as orbax_format
from prunenet_jax import sources
from prunenet_jax.run import batch
from tests import tiny_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _modified_copy(src, dst, change):
    """An HF folder whose every tensor is change(name, array) of the source's (same shapes)."""
    model = tiny_models.make_hf_model("llama_gqa_untied", num_hidden_layers=4, intermediate_size=40)
    weights = sources.load_model(str(src))
    import torch

    state = {n: torch.from_numpy(np.ascontiguousarray(change(n, a))) for n, a in weights.named_arrays()}
    model.load_state_dict(state, strict=False)
    return tiny_models.save_hf_model(model, dst)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    base = tiny_models.save_hf_model(
        tiny_models.make_hf_model("llama_gqa_untied", num_hidden_layers=4, intermediate_size=40),
        root / "base")
    rng = np.random.default_rng(0)
    scaled = _modified_copy(base, root / "scaled", lambda n, a: a * 1.5)
    noisy = _modified_copy(base, root / "noisy",
                           lambda n, a: a + 0.01 * rng.standard_normal(a.shape).astype(a.dtype))
    other = tiny_models.save_hf_model(
        tiny_models.make_hf_model("llama_gqa_untied", num_hidden_layers=4, intermediate_size=24),
        root / "other")
    policy_run = root / "policy_run"
    proc = subprocess.run([sys.executable, "-m", "launch.prune", f"--model={base}", "--ratios=0.5",
                           "--episodes=2", f"--out_dir={policy_run}"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"base": base, "scaled": scaled, "noisy": noisy, "other": other,
            "policy": policy_run / "policy"}


def _batch(out, checkpoints_spec, *extra, check=True):
    proc = subprocess.run([sys.executable, "-m", "launch.batch_prune",
                           f"--checkpoints={checkpoints_spec}", "--ratios=0.25,0.5",
                           f"--out_dir={out}", *extra], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _manifest(out):
    return json.load(open(os.path.join(out, "manifest.json")))


def test_three_good_one_other_shape_one_missing(inputs, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# checkpoints to prune\n" + "\n".join(
        str(inputs[n]) for n in ("base", "scaled", "noisy", "other")) + "\n/no/such/ckpt\n")
    out = tmp_path / "out"
    proc = _batch(out, listing, f"--policy={inputs['policy']}", check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert any(line.startswith("error: other: ") and "trained for (40, 32)" in line for line in errors)
    assert any(line.startswith("error: ckpt: ") and "/no/such/ckpt" in line for line in errors)
    assert errors[-1].startswith("error: 2 of 5 checkpoints failed: ckpt, other")

    manifest = _manifest(out)
    status = {(e["checkpoint"], e["ratio"]): e["status"] for e in manifest["outputs"]}
    assert len(status) == 10
    for name in ("base", "scaled", "noisy"):
        for ratio in (0.25, 0.5):
            assert status[(name, ratio)] == "done"
            entry = next(e for e in manifest["outputs"]
                         if (e["checkpoint"], e["ratio"]) == (name, ratio))
            pruned = sources.load_model(str(out / entry["orbax_dir"]))
            assert pruned.config.intermediate_size == entry["kept"] == int((1 - ratio) * 40)
            assert pruned.num_params() == entry["params"]
    assert status[("other", 0.5)] == status[("ckpt", 0.25)] == "failed"
    # One policy, one seed: the copies keep different channels only where their gates differ;
    # the scaled copy's gate is a multiple of the base's, so the policy's logits scale too.
    kept = {n: orbax_format.load_kept(str(out / n / "ratio_0.5" / "orbax")) for n in ("base", "noisy")}
    assert kept["base"].shape == kept["noisy"].shape == (4, 20)


def _done(out):
    m = os.path.join(out, "manifest.json")
    if not os.path.exists(m):
        return 0
    try:
        return sum(e["status"] == "done" for e in json.load(open(m))["outputs"])
    except ValueError:
        return 0


def test_sigkill_midway_then_rerun_finishes_only_the_missing(inputs, tmp_path):
    srcs = []
    for i in range(8):
        srcs.append(shutil.copytree(inputs["base" if i % 2 else "noisy"], tmp_path / f"c{i}"))
    spec = str(tmp_path / "c*")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "launch.batch_prune", f"--checkpoints={spec}",
            "--ratios=0.25,0.5", f"--out_dir={out}", f"--policy={inputs['policy']}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _done(out) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = _done(out)
    assert 3 <= done_before < 16, "the batch finished before it could be killed"
    before = {(e["checkpoint"], e["ratio"]): os.stat(out / e["orbax_dir"]).st_ino
              for e in _manifest(out)["outputs"] if e["status"] == "done"}

    rerun = _batch(out, spec, f"--policy={inputs['policy']}")
    manifest = _manifest(out)
    assert len(manifest["outputs"]) == 16 and all(e["status"] == "done" for e in manifest["outputs"])
    after = {(e["checkpoint"], e["ratio"]): os.stat(out / e["orbax_dir"]).st_ino
             for e in manifest["outputs"]}
    for item, inode in before.items():  # finished items were not written again
        assert after[item] == inode, item
    # No partial or temporary folders anywhere.
    for dirpath, dirnames, _ in os.walk(out):
        assert not [d for d in dirnames if ".tmp" in d or d.startswith(".")], dirpath
    assert "16/16" in rerun.stderr  # the progress bar counts items, finished ones included

    # The same result as an uninterrupted batch.
    clean = tmp_path / "uninterrupted"  # (not matched by the c* glob)
    _batch(clean, spec, f"--policy={inputs['policy']}")
    for e in _manifest(clean)["outputs"]:
        np.testing.assert_array_equal(orbax_format.load_kept(str(out / e["orbax_dir"])),
                                      orbax_format.load_kept(str(clean / e["orbax_dir"])))

    # A second rerun has nothing to do.
    again = _batch(out, spec, f"--policy={inputs['policy']}")
    assert json.loads(again.stdout.strip().splitlines()[-1])["failed"] == []
    assert {(e["checkpoint"], e["ratio"]): os.stat(out / e["orbax_dir"]).st_ino
            for e in _manifest(out)["outputs"]} == after


def test_shards_split_the_list_and_merge(inputs, tmp_path):
    spec = ",".join(str(inputs[n]) for n in ("base", "scaled", "noisy"))
    out = tmp_path / "out"
    _batch(out, spec, f"--policy={inputs['policy']}", "--num_shards=2", "--shard_index=1")
    partial = _manifest(out)
    assert partial["shards"] == {"present": [1], "missing": [0]}
    assert {e["checkpoint"] for e in partial["outputs"]} == {"scaled"}
    _batch(out, spec, f"--policy={inputs['policy']}", "--num_shards=2", "--shard_index=0")
    merged = _manifest(out)
    assert merged["shards"] == {"present": [0, 1], "missing": []}
    assert sorted((e["checkpoint"], e["ratio"]) for e in merged["outputs"]) == [
        (n, r) for n in ("base", "noisy", "scaled") for r in (0.25, 0.5)]
    # Same policy and seed as a single-VM run: identical channels.
    single = tmp_path / "single"
    _batch(single, spec, f"--policy={inputs['policy']}")
    for n in ("base", "scaled", "noisy"):
        np.testing.assert_array_equal(orbax_format.load_kept(str(out / n / "ratio_0.5" / "orbax")),
                                      orbax_format.load_kept(str(single / n / "ratio_0.5" / "orbax")))


def test_shards_running_at_once(inputs, tmp_path):
    copy = tmp_path / "copy" / "base"  # a second checkpoint named `base`: both get hashed names
    shutil.copytree(inputs["base"], copy)
    spec = ",".join([str(inputs[n]) for n in ("base", "scaled", "noisy")] + [str(copy)])
    names = batch.output_names(spec.split(","))
    assert names[0].startswith("base-") and names[3].startswith("base-") and names[0] != names[3]
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "launch.batch_prune", f"--checkpoints={spec}",
                               "--ratios=0.25,0.5", f"--out_dir={out}", f"--policy={inputs['policy']}",
                               "--num_shards=2", f"--shard_index={i}"], cwd=ROOT, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    merge = _batch(out, spec, "--merge", "--num_shards=2")  # whoever finished last merged too
    merged = _manifest(out)
    assert merged["shards"] == {"present": [0, 1], "missing": []}
    assert sorted((e["checkpoint"], e["status"]) for e in merged["outputs"]) == sorted(
        (n, "done") for n in (names[0], names[3], "noisy", "scaled") for _ in range(2))
    assert json.loads(merge.stdout.strip().splitlines()[-1])["outputs"] == merged["outputs"]


def test_trains_a_policy_on_the_first_checkpoint_without_policy(inputs, tmp_path):
    out = tmp_path / "out"
    spec = f"{inputs['base']},{inputs['noisy']}"
    _batch(out, spec, "--episodes=2")
    manifest = _manifest(out)
    assert manifest["policy_dir"] == "policy"
    params, meta = orbax_format.load_policy(str(out / "policy"))
    assert meta["source"] == str(inputs["base"]) and meta["episodes"] == 2
    assert all(e["status"] == "done" for e in manifest["outputs"]) and len(manifest["outputs"]) == 4


@pytest.mark.parametrize("extra,fragment", [
    (["--num_shards=2", "--shard_index=0"], "--policy"),
    (["--num_shards=2", "--shard_index=2"], "--shard_index=2"),
    (["--ratios=1.5"], "ratio 1.5"),
    (["--torch_format"], "--export_hf"),
])
def test_user_errors(inputs, tmp_path, extra, fragment):
    out = tmp_path / "out"
    proc = _batch(out, str(inputs["base"]), *extra, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, last
    assert not out.exists()


def test_glob_without_matches_is_a_user_error(tmp_path):
    proc = _batch(tmp_path / "out", str(tmp_path / "nothing*"), check=False)
    assert proc.returncode == 2 and "matches nothing" in proc.stderr
