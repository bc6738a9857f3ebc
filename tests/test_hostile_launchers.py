"""Hostile and careless use of the launchers (subprocesses, for exit codes, signals and the lock):
bad numbers refused before anything is written, two runs on one --out_dir, Ctrl-C during
training then --resume, a full disk (a 2 MiB tmpfs) then a clean resume, colliding batch names,
binary list files, symlinked outputs, an overflowing learning rate."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from prunenet_jax.files import run_lock
from tests import tiny_models
from tests import machine
from tests.test_user_errors import ENV, ROOT, _assert_user_error, _run, tree_hash


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny = tiny_models.save_hf_model(
        tiny_models.make_hf_model("llama_gqa_untied", num_hidden_layers=2, intermediate_size=40),
        root / "tiny")
    opt = tiny_models.save_hf_model(
        tiny_models.make_hf_model("opt", num_hidden_layers=2, intermediate_size=40,
                                  max_position_embeddings=16), root / "opt")
    text = root / "text.txt"
    text.write_text("Some English text to score. " * 40)
    return {"root": root, "tiny": tiny, "opt": opt, "text": text}


BAD_NUMBERS = [
    (["--lr=nan"], "--lr=nan"), (["--lr=inf"], "--lr=inf"), (["--lr=0"], "--lr=0"),
    (["--gamma=nan"], "--gamma=nan"), (["--gamma=1.5"], "--gamma=1.5"),
    (["--seed=18446744073709551616"], "--seed=18446744073709551616"),
    (["--seed=-9223372036854775809"], "--seed=-9223372036854775809"),
    (["--ratios=0.1,0.1"], "appears twice"), (["--train_ratio=nan"], "--train_ratio=nan"),
    (["--seq_len=1"], "--seq_len=1"), (["--seq_len=10000000000"], "--seq_len=10000000000"),
    (["--batch_size=0"], "--batch_size=0"), (["--max_tokens=-1"], "--max_tokens=-1"),
]


@pytest.mark.parametrize("extra,fragment", BAD_NUMBERS)
def test_bad_numbers_are_refused_before_anything_is_written(models, tmp_path, extra, fragment):
    before = tree_hash(models["root"])
    out = tmp_path / "out"
    proc = _run("launch.prune", f"--model={models['tiny']}", "--ratios=0.5", "--episodes=1",
                f"--out_dir={out}", f"--eval_text={models['text']}", *extra)
    _assert_user_error(proc, fragment)
    assert not out.exists() and tree_hash(models["root"]) == before


def test_batch_refuses_bad_numbers_and_binary_lists(models, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes(bytes(range(256)) * 4)
    out = tmp_path / "out"
    _assert_user_error(_run("launch.batch_prune", f"--checkpoints={listing}", f"--out_dir={out}"),
                       "not a text file")
    _assert_user_error(_run("launch.batch_prune", f"--checkpoints={models['tiny']}",
                            f"--out_dir={out}", "--lr=nan"), "--lr=nan")
    same = f"{models['tiny']},{models['root']}/../{models['root'].name}/tiny"
    _assert_user_error(_run("launch.batch_prune", f"--checkpoints={same}", f"--out_dir={out}"),
                       "twice")
    assert not out.exists()


def test_a_window_longer_than_the_learned_positions_is_refused_before_loading(models, tmp_path):
    out = tmp_path / "out"
    proc = _run("launch.prune", f"--model={models['opt']}", "--ratios=0.5", "--episodes=1",
                f"--out_dir={out}", f"--eval_text={models['text']}", "--seq_len=32")
    _assert_user_error(proc, "--seq_len=32 exceeds the 16 learned positions")
    assert not out.exists()


def test_a_learning_rate_that_would_overflow_is_refused_before_training(models, tmp_path):
    # 1e38 makes the first update overflow; the flag's range refuses it before anything runs (the
    # in-training non-finite stop, for what no range can foresee, is tested on the library:
    # test_hostile_inputs.py::test_non_finite_training_stops_with_a_user_error)
    out = tmp_path / "out"
    proc = _run("launch.prune", f"--model={models['tiny']}", "--ratios=0.5", "--episodes=3",
                f"--out_dir={out}", "--lr=1e38", "--update_schedule=episode")
    _assert_user_error(proc, "--lr=1e+38 must be a finite number in (0, 10]")
    assert not out.exists()


def test_a_second_run_on_a_locked_out_dir_gets_exit_2_naming_the_holder(models, tmp_path):
    out = tmp_path / "out"
    with run_lock.hold(str(out)):
        for module, model_flag in (("launch.prune", "--model"), ("launch.batch_prune", "--checkpoints")):
            proc = _run(module, f"{model_flag}={models['tiny']}", "--ratios=0.5", "--episodes=1",
                        f"--out_dir={out}", "--overwrite")
            _assert_user_error(proc, "in use by another run", f"pid {os.getpid()}")
        assert os.listdir(out) == [run_lock.LOCK_FILE]


def test_two_runs_started_together_one_wins_and_its_json_describes_the_folder(models, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "launch.prune", f"--model={models['tiny']}", "--ratios=0.5",
            "--episodes=2", f"--out_dir={out}"]
    procs = [subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 2], [r[1][-2000:] for r in results]
    loser = next(r for r in results if r[2] == 2)[1].strip().splitlines()[-1]
    assert "in use by another run" in loser or "is not empty" in loser, loser
    winner = json.loads(next(r for r in results if r[2] == 0)[0].strip().splitlines()[-1])
    assert winner == json.load(open(out / "manifest.json"))
    assert all(os.path.isdir(out / o["orbax_dir"]) for o in winner["outputs"])


def test_ctrl_c_stops_after_an_episode_and_resume_continues(models, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "launch.prune", f"--model={models['tiny']}", "--ratios=0.5",
            "--episodes=100000", f"--out_dir={out}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while not (os.path.isdir(out / "train_state") and any(
            n.isdigit() for n in os.listdir(out / "train_state"))) and time.time() < deadline:
        time.sleep(0.2)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert time.time() - t0 < 30  # honoured after the running episode, not at the end of the run
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: interrupted (Ctrl-C) after episode ") and "--resume" in last, last
    done = int(last.split("after episode ")[1].split()[0])
    steps = [int(n) for n in os.listdir(out / "train_state") if n.isdigit()]
    assert max(steps) == done  # the checkpoint of the last finished episode is kept
    assert not [n for n in os.listdir(out) if n.startswith(".") and n != run_lock.LOCK_FILE]
    resumed = _run("launch.prune", f"--model={models['tiny']}", "--ratios=0.5",
                   f"--episodes={done + 1}", f"--out_dir={out}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert manifest["training"]["resumed_after"] == done and manifest["outputs"][0]["status"] == "done"


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root); skipped where it cannot be mounted (fails under CI=true)."""
    with machine.small_disk(tmp_path / "disk", "2m") as mount:
        yield mount


def test_a_full_disk_is_one_error_line_and_the_rerun_resumes(tmp_path, small_disk):
    model = tiny_models.save_hf_model(tiny_models.make_hf_model(
        "llama_gqa_untied", num_hidden_layers=4, hidden_size=64, intermediate_size=256,
        vocab_size=1000), tmp_path / "mid")  # 1.5 MB: two outputs do not fit in 2 MiB
    out = small_disk / "run"
    args = [f"--model={model}", "--ratios=0.1,0.5", "--episodes=2", f"--out_dir={out}", "--export_hf"]
    proc = _run("launch.prune", *args)
    last = _assert_user_error(proc, "cannot write", "free space")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    leftovers = [os.path.join(d, n) for d, dirs, files in os.walk(out) for n in dirs + files
                 if ".tmp-" in n or ".old-" in n or "orbax-checkpoint-tmp" in n]
    assert leftovers == [], (last, leftovers)
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    resumed = _run("launch.prune", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert [o["status"] for o in manifest["outputs"]] == ["done", "done"]


def test_colliding_batch_names_all_get_their_own_folder(models, tmp_path):
    policy_run = tmp_path / "policy_run"
    assert _run("launch.prune", f"--model={models['tiny']}", "--ratios=0.5", "--episodes=1",
                f"--out_dir={policy_run}").returncode == 0
    for d in ("x/a", "y/a", "z/a-2"):
        shutil.copytree(models["tiny"], tmp_path / d)
    items = [tmp_path / "x/a", tmp_path / "y/a", tmp_path / "z/a-2"]
    out = tmp_path / "runs" / "out"
    proc = _run("launch.batch_prune", f"--checkpoints={','.join(map(str, items))}", "--ratios=0.5",
                f"--policy={policy_run / 'policy'}", f"--out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.load(open(out / "manifest.json"))
    assert len(manifest["checkpoints"]) == 3 and sorted(manifest["checkpoints"].values()) == sorted(
        map(str, items))
    for entry in manifest["outputs"]:
        assert entry["status"] == "done" and not entry["orbax_dir"].startswith("..")
        assert os.path.realpath(out / entry["orbax_dir"]).startswith(str(out) + os.sep)
    assert sorted(os.listdir(tmp_path / "runs")) == ["out"]  # nothing written beside --out_dir


def test_convert_refuses_a_symlinked_output_with_overwrite(models, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(target)
    proc = _run("launch.convert", f"--input={models['tiny']}", f"--output={link}", "--overwrite")
    _assert_user_error(proc, "symbolic link")
    assert os.path.islink(link) and os.listdir(target) == ["keep.txt"]
