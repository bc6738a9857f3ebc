"""Hostile inputs to recovery (launch.recover and recover_weights): training gone non-finite stops
with one `error:` line and writes nothing; a killed run resumes with its whole loss history; one
run per --out_dir; the ratio comes from the weights; numbers no run can use are refused before
anything is made; a far too short --train_text is warned about; a full disk is one line of its
own and leaves no partial checkpoint."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from prunenet_jax import prune, sources
from prunenet_jax.errors import Diverged, UserError
from prunenet_jax.formats import orbax
from prunenet_jax.recovery import data
from prunenet_jax.recovery.config import RecoverConfig
from prunenet_jax.recovery.recover import RecoverSpec, recover_weights
from tests import tiny_models
from tests import machine
from tests.test_recovery_launcher import _recover
from tests.test_report import save_tokenizer
from tests.test_user_errors import ENV, ROOT, _assert_user_error, _run, tree_hash

STEPS = ["--recover_steps=12", "--recover_checkpoint_every=1"]  # the killed and locked-out runs


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny dense model (with a tokenizer) and its prune run folder (ratio 0.25: 36 of 48)."""
    base = tmp_path_factory.mktemp("hostile_recovery")
    dense = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_gqa_untied"), base / "dense")
    save_tokenizer(dense)
    proc = _run("launch.prune", f"--model={dense}", "--ratios=0.25", "--episodes=1",
                f"--out_dir={base / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dense, str(base / "run")


def _start(args, log):
    """A launcher started in the background, its output into the file `log`."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", *map(str, args)], cwd=ROOT, env=ENV,
                                stdout=f, stderr=subprocess.STDOUT)


def _wait_for_checkpoint(proc, out) -> None:
    """Until the run `proc` has finished a recovery checkpoint (a step folder) in `out`."""
    state = out / "recover_state" / "ratio_0.25"
    deadline = time.time() + 300
    while not (state.is_dir() and any(n.isdigit() for n in os.listdir(state))):
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.002)


def _output(out) -> tuple[dict, dict]:
    """(the manifest's one entry, the recovered arrays) of a finished run in `out`."""
    entry = json.load(open(out / "manifest.json"))["outputs"][0]
    weights = orbax.load_model(str(out / "ratio_0.25" / "orbax"))
    return entry, dict(weights.named_arrays())


# ----------------------------------------------------------------------------- non-finite training

def test_diverging_recovery_stops_with_one_error_line_and_writes_nothing(tmp_path, pruned):
    dense, run = pruned
    before = tree_hash(run), tree_hash(dense)
    out = tmp_path / "out"
    # weight decay 10 at lr 10 without warm-up: the LoRA factors blow up within a few steps
    proc = _run(*_recover(run, out, "--recover_lr=10", "--weight_decay=10", "--warmup=0",
                          "--recover_steps=8", "--recover_checkpoint_every=2"))
    last = _assert_user_error(proc, "diverged: at step", "lower --recover_lr or --lora_alpha",
                              "nothing was written for this model")
    failed = re.search(r"at step (\d+) of 8 the loss is (nan|inf)", last)
    kept = re.search(r"the last good training checkpoint \(after step (\d+)\) is kept in (\S+)$", last)
    assert failed and kept and "at learning rate" in last, last
    state = out / "recover_state" / "ratio_0.25"
    assert kept.group(2) == str(state)
    steps = sorted(int(n) for n in os.listdir(state))
    assert steps[-1] == int(kept.group(1)) < int(failed.group(1))  # the bad state never saved
    assert sorted(os.listdir(out)) == ["recover_state"]  # no output folder, no manifest
    assert (tree_hash(run), tree_hash(dense)) == before


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """(dense, pruned) ModelWeights of a tiny model, in this process."""
    folder = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_gqa_untied"),
                                       tmp_path_factory.mktemp("pair") / "dense")
    dense = sources.load_model(folder)
    return dense, prune.slice_weights(dense, np.stack([np.arange(0, 48, 2)] * 3))


def test_no_checkpoint_or_result_holds_non_finite_weights(tmp_path, tiny_pair):
    dense, pruned = tiny_pair
    tiny = dict(seq_len=16, lora_rank=4, pool_rows=8, warmup=0, refit=False)
    # The first update overflows the LoRA factors (decay 1e30 at lr 1e30) while its loss and
    # gradient are finite: the parameters are checked before the checkpoint after it is saved.
    spec = RecoverSpec(RecoverConfig(steps=3, lr=1e30, weight_decay=1e30, **tiny), checkpoint_every=1)
    with pytest.raises(Diverged, match=r"after step 1 of 3 the trained parameters hold NaN or Inf, "
                                       r".*no training checkpoint was saved$"):
        recover_weights(pruned, dense, spec, tokenizer=None, state_dir=str(tmp_path / "state"))
    assert not (tmp_path / "state").exists()  # the state folder it made, empty, is gone
    # Finite factors whose product overflows (lr 1e37, alpha 1e6): the merged weights are checked.
    spec = RecoverSpec(RecoverConfig(steps=1, lr=1e37, lora_alpha=1e6, **tiny), checkpoint_every=0)
    with pytest.raises(Diverged, match=r"the recovered weights hold NaN or Inf \(model\.\S+\) "
                                       r"after 1 steps"):
        recover_weights(pruned, dense, spec, tokenizer=None)


# ----------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("field, value, message", [
    ("lr", float("nan"), "--recover_lr=nan must be a finite number > 0"),
    ("lr", float("inf"), "--recover_lr=inf must be a finite number > 0"),
    ("weight_decay", -1.0, "--weight_decay=-1.0 must be a finite number >= 0"),
    ("weight_decay", float("inf"), "--weight_decay=inf must be a finite number >= 0"),
    ("clip_norm", 0.0, "--clip_norm=0.0 must be a finite number > 0"),
    ("clip_norm", float("nan"), "--clip_norm=nan must be a finite number > 0"),
    ("lora_alpha", float("inf"), "--lora_alpha=inf must be a finite number > 0"),
    ("lora_alpha", -32.0, "--lora_alpha=-32.0 must be a finite number > 0"),
    ("seed", -1, r"--recover_seed=-1 must be in \[0, 2\*\*63 - 1\]"),
    ("seed", 2**63, r"--recover_seed=9223372036854775808 must be in \[0, 2\*\*63 - 1\]"),
    ("steps", 2**31, "--recover_steps=2147483648 is too many: optax counts steps in int32"),
    ("warmup", 2**31, r"--warmup=2147483648 must be in \[0, 2147483647\]"),
])
def test_recover_config_refuses_numbers_no_run_can_use(field, value, message):
    with pytest.raises(UserError, match=message):
        RecoverConfig(**{field: value}).check()


def test_a_sampled_pool_beyond_host_memory_is_refused_and_the_largest_seed_samples(monkeypatch):
    for cfg, fix in ((RecoverConfig(steps=2**31 - 1), "lower --recover_steps, --train_batch"),
                     (RecoverConfig(pool_rows=2**40), "lower --pool_rows")):
        cfg.check()
        with pytest.raises(UserError, match=f"GiB of memory; {fix}"):
            cfg.check_pool(None)
        cfg.check_pool("some.txt")  # the pool is the text's windows: no sampling
    RecoverConfig().check_pool(None)
    seeds = []
    monkeypatch.setattr(data.decode, "sample_rows",
                        lambda *a, seed_of_batch, **k: seeds.append(seed_of_batch(64)))
    data.generated_pool(None, 1, [2], 8, 16, seed=2**63 - 1)
    import jax

    jax.random.key(seeds[0])  # a valid key (a C long), not an OverflowError


# ----------------------------------------------------------------------------- lock, kill, resume

@pytest.fixture(scope="module")
def two_runs_on_one_folder(pruned, tmp_path_factory):
    """launch.recover into one --out_dir twice at once: the first (STEPS) is paused (SIGSTOP) once
    it has saved a checkpoint, a second run with --overwrite starts meanwhile, then the first
    continues to its end uninterrupted otherwise. (out_dir, first's exit code and output, second)."""
    _, run = pruned
    base = tmp_path_factory.mktemp("locked")
    out = base / "out"
    first = _start(_recover(run, out, *STEPS), base / "first.log")
    _wait_for_checkpoint(first, out)
    first.send_signal(signal.SIGSTOP)
    try:
        second = _run(*_recover(run, out, *STEPS, "--overwrite"))
    finally:
        first.send_signal(signal.SIGCONT)
    return out, first.wait(timeout=300), open(base / "first.log").read(), second


def test_a_second_run_into_the_same_out_dir_is_refused_and_the_first_finishes(two_runs_on_one_folder):
    out, code, log, second = two_runs_on_one_folder
    _assert_user_error(second, f"--out_dir={out} is in use by another run (pid ",
                       "wait for it to finish, or choose another folder")
    assert code == 0, log[-3000:]
    entry, arrays = _output(out)
    assert entry["status"] == "done" and len(entry["recovery"]["losses"]) == 12
    assert all(np.isfinite(a).all() for a in arrays.values())
    assert not (out / ".prunenet.lock").exists()


def test_sigkill_then_resume_records_the_whole_loss_history(tmp_path, pruned, two_runs_on_one_folder):
    _, run = pruned
    out = tmp_path / "killed"
    proc = _start(_recover(run, out, *STEPS), tmp_path / "killed.log")
    _wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "ratio_0.25").exists(), "the run finished before it could be killed"
    resumed = _run(*_recover(run, out, *STEPS, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (entry, arrays), (whole, whole_arrays) = _output(out), _output(two_runs_on_one_folder[0])
    assert 1 <= entry["recovery"]["resumed_after"] < 12
    assert entry["recovery"]["losses"] == whole["recovery"]["losses"]  # all 12, bit for bit
    assert arrays.keys() == whole_arrays.keys()
    for name in arrays:
        assert np.array_equal(arrays[name], whole_arrays[name]), name


# ----------------------------------------------------------------------------- labels and text

def test_a_recorded_ratio_the_weights_contradict_is_refused_before_anything_is_made(tmp_path, pruned):
    _, run = pruned
    edited = tmp_path / "edited"
    shutil.copytree(run, edited)
    # both records say 0.5 (so they agree with each other); its weights keep 36 of 48: 0.25
    for path, record in ((edited / "manifest.json", lambda m: m["outputs"][0]),
                         (edited / "ratio_0.25" / "orbax" / "meta" / "metadata", lambda m: m)):
        content = json.load(open(path))
        record(content)["ratio"] = 0.5
        json.dump(content, open(path, "w"))
    before = tree_hash(edited)
    out = tmp_path / "out"
    proc = _run(*_recover(edited, out, "--recover_steps=1"))
    _assert_user_error(proc, f"{edited / 'manifest.json'} records ratio 0.5, but its weights keep "
                             "36 of the dense model's 48 channels per layer (ratio 0.25)")
    assert not out.exists()
    assert tree_hash(edited) == before


def test_a_train_text_far_shorter_than_one_step_is_warned_about(tmp_path, pruned):
    _, run = pruned
    text = tmp_path / "short.txt"
    text.write_text("the fox")
    out = tmp_path / "out"
    proc = _run(*_recover(run, out, "--recover_steps=1", f"--train_text={text}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [l for l in proc.stderr.split("\n") if l.startswith("warning: --train_text has ")]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert re.search(r"has \d+ tokens, but one training step takes 64 \(--train_batch x "
                     r"--grad_accum x --train_seq_len\) and the refit fits 36 channels per layer, "
                     r"which needs at least 36: .*pass a longer text \(at least 64 tokens\)$",
                     warnings[0]), warnings[0]


def test_a_train_text_of_one_token_is_refused_and_leaves_no_folder_behind(tmp_path, pruned):
    _, run = pruned
    text = tmp_path / "one.txt"
    text.write_text("a")
    out = tmp_path / "out"
    proc = _run(*_recover(run, out, "--recover_steps=1", f"--train_text={text}"))
    _assert_user_error(proc, f"--train_text {text} has fewer than 2 tokens; pass a longer text")
    assert not out.exists()  # not even an empty recover_state/, which would block the rerun


# ----------------------------------------------------------------------------- full disk

@pytest.fixture
def small_disk(tmp_path):
    """A 300 KiB tmpfs: one recovery checkpoint of the tiny model (~190 KiB) fits, a second does
    not (needs root); skipped where it cannot be mounted (fails under CI=true)."""
    with machine.small_disk(tmp_path / "disk", "300k") as mount:
        yield mount


def test_a_full_disk_during_recovery_is_one_line_and_leaves_no_partial_checkpoint(small_disk,
                                                                                 pruned):
    _, run = pruned
    out = small_disk / "out"
    args = _recover(run, out, "--recover_steps=6", "--recover_checkpoint_every=1")
    proc = _run(*args)
    _assert_user_error(proc, f"cannot write {out / 'recover_state' / 'ratio_0.25'}", "free space")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    left = [os.path.join(d, n) for d, dirs, files in os.walk(out) for n in dirs + files
            if "orbax-checkpoint-tmp" in n]
    assert left == [] and not (out / "ratio_0.25").exists(), left
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    resumed = _run(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.load(open(out / "manifest.json"))["outputs"][0]["status"] == "done"
