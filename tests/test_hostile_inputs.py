"""Hostile and careless inputs, in process: folder names that collide or escape the run folder,
malformed config.json / safetensors headers / index files, out-of-range numbers, non-finite
training, the run lock, full disks and lost permissions, symlinked outputs, binary list files.
(The fuzz tests are in test_fuzz_formats.py; launcher exit codes in test_hostile_launchers.py.)"""
import errno
import json
import math
import os
import struct

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from prunenet_jax import rng
from prunenet_jax.errors import UserError, WriteError
from prunenet_jax.perplexity import EvalConfig
from prunenet_jax.formats import hf
from prunenet_jax.formats.safetensors import SafetensorsFile, write_safetensors
from prunenet_jax.launch import flags as launch_flags
from prunenet_jax.method import episode, trainer
from prunenet_jax.models.config import ModelConfig
from prunenet_jax.files import atomic, output_folder, run_lock
from prunenet_jax.run import batch
from prunenet_jax.formats import run_dir

# ----------------------------------------------------------------------------- folder names


def test_ratio_folders_keep_ordinary_names_and_never_collide():
    assert [run_dir.ratio_dirname(r) for r in (0.1, 0.25, 0.3, 0.0, 0.5)] == [
        "ratio_0.1", "ratio_0.25", "ratio_0.3", "ratio_0", "ratio_0.5"]
    assert run_dir.ratio_dirname(0.3001302) != run_dir.ratio_dirname(0.3001303)


@settings(max_examples=300, deadline=None)
@given(st.floats(0.0, 1.0, exclude_max=True), st.floats(0.0, 1.0, exclude_max=True))
def test_ratio_folder_names_are_exact(a, b):
    assert float(run_dir.ratio_dirname(a)[len("ratio_"):]) == a
    assert (run_dir.ratio_dirname(a) == run_dir.ratio_dirname(b)) == (a == b)


def test_ratios_listed_twice_are_refused():
    assert launch_flags.parse_ratios("0.3001302,0.3001303") == [0.3001302, 0.3001303]
    with pytest.raises(UserError, match="appears twice"):
        launch_flags.parse_ratios("0.1,0.10")
    for bad in ("nan", "inf", "-inf", "1e-400,1"):
        with pytest.raises(UserError, match="outside"):
            launch_flags.parse_ratios(bad)


def test_batch_names_unique_stable_and_from_resolved_paths(tmp_path):
    for d in ("x/a", "y/a", "z/a-2", "w/policy", "v/b"):
        (tmp_path / d).mkdir(parents=True)
    items = [str(tmp_path / p) for p in ("x/a", "y/a", "z/a-2", "w/policy", "v/b/../b/..")]
    names = batch.output_names(items)
    assert len(set(names)) == len(names)
    assert names == batch.output_names(list(items))  # the same on every shard and every rerun
    assert names[0].startswith("a-") and names[1].startswith("a-") and names[2] == "a-2"
    assert names[3].startswith("policy-")  # never the run folder's own policy/
    assert names[4] == "v"  # `v/b/../b/..` is v: named by what it reaches
    with pytest.raises(UserError, match="twice"):
        batch.output_names([str(tmp_path / "v"), str(tmp_path / "v/b/..")])
    assert batch.output_names(["org/model@r1", "org/model@r2"])[0].startswith("org--model-")


def test_outputs_are_proven_inside_the_run_folder(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    orbax_dir, _, _ = run_dir.output_dirs(str(out / "a"), 0.3, root=str(out))
    assert orbax_dir == str(out / "a" / "ratio_0.3" / "orbax")
    (out / "a").symlink_to(elsewhere)
    with pytest.raises(UserError, match="outside the run folder"):
        run_dir.output_dirs(str(out / "a"), 0.3, root=str(out))
    with pytest.raises(UserError, match="outside the run folder"):
        run_dir.check_inside(str(out), str(out / ".." / "ratio_0.3"))
    link_out = tmp_path / "link_out"  # --out_dir itself may be a link: its target is the folder
    link_out.symlink_to(out)
    run_dir.check_inside(str(link_out), str(link_out / "b" / "ratio_0.3"))


def test_a_binary_checkpoint_list_is_refused(tmp_path):
    listing = tmp_path / "list.bin"
    listing.write_bytes(b"\x00\x01\xff\xfe" * 100)
    with pytest.raises(UserError, match="not a text file"):
        batch.parse_checkpoints(str(listing))
    listing.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(UserError, match="not a text file"):
        batch.parse_checkpoints(str(listing))


# ----------------------------------------------------------------------------- config.json

GOOD = {"model_type": "llama", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize("change,field", [
    ({"model_type": ["llama"]}, "model_type"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"hidden_size": float("inf")}, "hidden_size"),
    ({"hidden_size": float("nan")}, "hidden_size"),
    ({"intermediate_size": -4}, "intermediate_size"),
    ({"intermediate_size": 4.5}, "intermediate_size"),
    ({"intermediate_size": "48"}, "intermediate_size"),
    ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"vocab_size": 10**30}, "vocab_size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"num_attention_heads": 6}, "num_attention_heads"),  # 6 does not divide 32
    ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
    ({"rope_theta": float("inf")}, "rope_theta"),
    ({"rope_scaling": [1, 2]}, "rope_scaling"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"head_dim": {"a": 1}}, "head_dim"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": float("nan"), "low_freq_factor": 1,
                       "high_freq_factor": 4, "original_max_position_embeddings": 16}}, "factor"),
])
def test_config_fields_are_checked_by_schema(change, field):
    with pytest.raises(UserError, match=f"field '{field}'") as e:
        ModelConfig.from_hf({**GOOD, **change}, source="x/config.json")
    assert str(e.value).startswith("x/config.json")


def test_config_json_of_the_wrong_shape(tmp_path):
    assert ModelConfig.from_hf(dict(GOOD)).head_dim == 8
    assert ModelConfig.from_hf({**GOOD, "hidden_size": 32.0}).hidden_size == 32
    for content in ("[1, 2, 3]", '"llama"', "null", "[" * 100000, "{\"a\": NaN"):
        (tmp_path / "config.json").write_text(content)
        with pytest.raises(UserError, match="config.json"):
            hf.load_config(str(tmp_path))


# ----------------------------------------------------------------------------- safetensors


def _raw_safetensors(path, header, data: bytes = b"\0" * 64):
    head = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return str(path)


ENTRY = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize("header,fragment", [
    ([ENTRY], "not an object"),
    ({"t": [1, 2]}, "not an object"),
    ({"t": {**ENTRY, "data_offsets": [-16, 0]}}, "data_offsets"),
    ({"t": {**ENTRY, "data_offsets": [0.0, 16.0]}}, "data_offsets"),
    ({"t": {"dtype": "F32", "shape": [2, 2]}}, "data_offsets"),
    ({"t": {**ENTRY, "data_offsets": [0, 16, 32]}}, "data_offsets"),
    ({"t": {**ENTRY, "shape": [2, -2]}}, "shape"),
    ({"t": {**ENTRY, "shape": "2x2"}}, "shape"),
    ({"t": {**ENTRY, "dtype": ["F32"]}}, "dtype"),
    ({"t": {**ENTRY, "data_offsets": [0, 12]}}, "need 16 bytes"),
    ({"t": {**ENTRY, "data_offsets": [64, 80]}}, "truncated"),
    ({"t": ENTRY, "u": {**ENTRY, "data_offsets": [8, 24]}}, "share the bytes"),
    ({"t": {**ENTRY, "shape": [0, 2**62], "data_offsets": [0, 0]}}, "beyond any array"),
    ({"__metadata__": [1], "t": ENTRY}, "__metadata__"),
    ({"__metadata__": {"format": 1}, "t": ENTRY}, "__metadata__"),
    (b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "t": {"dtype": "F32", '
     b'"shape": [1], "data_offsets": [0, 4]}}', "truncated or not a safetensors"),  # duplicate key
    (b"[" * 50000, "truncated or not a safetensors"),
])
def test_malformed_safetensors_headers(tmp_path, header, fragment):
    path = _raw_safetensors(tmp_path / "m.safetensors", header)
    with pytest.raises(UserError, match=fragment):
        SafetensorsFile(path)


def test_a_valid_header_with_gaps_and_empty_tensors_loads(tmp_path):
    header = {"a": {**ENTRY, "data_offsets": [32, 48]}, "b": ENTRY,
              "e": {"dtype": "BF16", "shape": [0, 5], "data_offsets": [16, 16]},
              "__metadata__": {"format": "pt"}}
    f = SafetensorsFile(_raw_safetensors(tmp_path / "m.safetensors", header))
    assert f.get("a").shape == (2, 2) and f.get("e").shape == (0, 5) and f.metadata == {"format": "pt"}


# ----------------------------------------------------------------------------- index files


@pytest.mark.parametrize("weight_map,fragment", [
    ({"t": "/etc/passwd"}, "not a plain file name"),
    ({"t": "../../outside.safetensors"}, "not a plain file name"),
    ({"t": "sub/model.safetensors"}, "not a plain file name"),
    ({"t": ".."}, "not a plain file name"),
    ({"t": ""}, "not a plain file name"),
    ({"t": 3}, "not a file name"),
    (["model.safetensors"], "no 'weight_map'"),
    ({"t": "model.safetensors", "not_there": "model.safetensors"}, "does not hold it"),
])
def test_malformed_index_files(tmp_path, weight_map, fragment):
    write_safetensors(str(tmp_path / "model.safetensors"), {"t": np.zeros((2,), np.float32)})
    (tmp_path / hf.SAFE_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UserError, match=fragment):
        hf.open_shards(str(tmp_path))


def test_index_not_json_object(tmp_path):
    (tmp_path / hf.SAFE_INDEX).write_text("[]")
    with pytest.raises(UserError, match="no 'weight_map'"):
        hf.open_shards(str(tmp_path))


# ----------------------------------------------------------------------------- numbers


def test_seeds_and_eval_settings_in_range():
    rng.check_seed(2**63 - 1)
    rng.check_seed(-(2**63))
    for bad in (2**63, -(2**63) - 1, 10**30):
        with pytest.raises(UserError, match="--seed"):
            rng.check_seed(bad)
    for field, value in (("seq_len", 1), ("seq_len", 10**12), ("batch_size", 0),
                         ("batch_size", 10**9), ("max_tokens", -1), ("max_tokens", 10**20)):
        with pytest.raises(UserError, match=f"--{field}"):
            EvalConfig(texts={}, **{field: value}).check()
    opt = ModelConfig.from_hf({**GOOD, "model_type": "opt", "ffn_dim": 48, "max_position_embeddings": 16})
    with pytest.raises(UserError, match="exceeds the 16 learned positions"):
        EvalConfig(texts={}, seq_len=17).check_model(opt, "m")
    EvalConfig(texts={}, seq_len=16).check_model(opt, "m")
    mistral = ModelConfig.from_hf({**GOOD, "model_type": "mistral", "sliding_window": 16})
    EvalConfig(texts={}, seq_len=17).check_model(mistral, "m")  # masked, not refused


# ----------------------------------------------------------------------------- training


def _gates(L=3, I=16, H=8, scale=1.0):
    return (scale * np.random.default_rng(0).standard_normal((L, I, H))).astype(np.float32)


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), 1e38])
def test_non_finite_training_stops_with_a_user_error(lr):
    cfg = episode.TrainConfig(ratio=0.5, learning_rate=lr, schedule="episode")
    with pytest.raises(UserError, match=r"non-finite in episode \d.*lower --lr"):
        trainer.train(_gates(), cfg, seed=0, num_episodes=3)


def test_gates_too_large_for_float32_are_refused():
    with pytest.raises(UserError, match="singular values are not finite"):
        trainer.train(_gates(scale=3e37), episode.TrainConfig(ratio=0.5), seed=0, num_episodes=1)


def test_a_non_finite_episode_is_never_the_best():
    cfg = episode.TrainConfig(ratio=0.5)
    W = _gates()
    ref = episode.reference_singular_values(W)
    state = episode.init_state(trainer.initial_params(0, 16, 8), cfg)
    run_episode = episode.make_episode_fn(cfg)
    state, _ = run_episode(state, W, ref, trainer.episode_key(jax.random.key(0), 0))
    assert int(state.best_episode) == 0
    poisoned = state._replace(params={**state.params, "b": state.params["b"].at[0].set(np.nan)},
                              best_reward=np.float32(-np.inf))
    after, metrics = run_episode(poisoned, W, ref, trainer.episode_key(jax.random.key(0), 1))
    assert int(after.best_episode) == 0 and float(after.best_reward) == -math.inf


# ----------------------------------------------------------------------------- run lock


def test_the_run_lock_refuses_a_second_run_and_takes_over_a_stale_one(tmp_path):
    out = tmp_path / "out"
    with run_lock.hold(str(out)):
        assert (out / run_lock.LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(UserError, match=f"in use by another run \\(pid {os.getpid()}"):
            with run_lock.hold(str(out)):
                pass
        output_folder.check_out_dir(str(out), [], reuse=False)  # the lock file is not content
    assert not out.exists()  # made by the lock, empty: removed again
    out.mkdir()
    (out / run_lock.LOCK_FILE).write_text("999999999\n")  # left by a killed run: nobody holds it
    with run_lock.hold(str(out)):
        (out / "result").write_text("x")
    assert sorted(os.listdir(out)) == ["result"]
    with run_lock.hold(str(out), name=run_dir.lock_name(0, 2)):  # shards lock separately
        with run_lock.hold(str(out), name=run_dir.lock_name(1, 2)):
            pass


# ----------------------------------------------------------------------------- full disk, permissions


@pytest.mark.parametrize("error,reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "quota"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only"),
    (ValueError('RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database'), "no space left"),
])
def test_failed_writes_become_write_errors_and_leave_no_temporary_folder(tmp_path, error, reason):
    final = tmp_path / "out" / "ratio_0.3" / "orbax"
    with pytest.raises(WriteError, match=f"cannot write .*{reason}.*rerun the same command"):
        with atomic.staged_dir(str(final)) as tmp:
            (tmp_path / "staged").write_text(tmp)
            with open(os.path.join(tmp, "part"), "w") as f:
                f.write("partial")
            raise error
    assert os.listdir(final.parent) == []  # the staged folder is gone, nothing half-written
    with pytest.raises(WriteError, match=reason):
        atomic.atomic_write(str(tmp_path / "manifest.json"), lambda f: (_ for _ in ()).throw(error))
    assert sorted(os.listdir(tmp_path)) == ["out", "staged"]
    with pytest.raises(KeyError):  # other errors are not disguised
        with atomic.write_errors("x"):
            raise KeyError("bug")


def test_a_disk_too_small_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(WriteError, match="needs about"):
        output_folder.check_free_space(str(tmp_path / "x"), 2000)
    output_folder.check_free_space(str(tmp_path / "x"), 500)


def test_symlinked_outputs_are_never_swapped(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(UserError, match="symbolic link"):
        output_folder.check_out_dir(str(link), [], reuse=True, name="--output", replaced=True)
    with pytest.raises(UserError, match="symbolic link"):
        with atomic.staged_dir(str(link)):
            pass
    assert os.path.islink(link) and (target / "keep.txt").read_text() == "mine"


def test_a_failed_write_stops_a_batch_instead_of_failing_the_checkpoint(tmp_path, monkeypatch):
    """A full disk is no fault of the checkpoint being written: the batch stops (exit 2)."""
    from prunenet_jax import progress
    from prunenet_jax.run.prune_run import OutputOptions, Training

    def full_disk(*args, **kwargs):
        raise WriteError("cannot write x: no space left on the device")

    monkeypatch.setattr(batch.sources, "load_config", full_disk)
    job = batch.BatchJob(checkpoints=("a", "b"), ratios=(0.5,),
                         training=Training(episode.TrainConfig(ratio=0.5)), outputs=OutputOptions(),
                         out_dir=str(tmp_path))
    manifest = run_dir.Manifest(str(tmp_path), {}, resume=False)
    with pytest.raises(WriteError):
        batch._prune_one(job, "a", "a", {}, None, manifest, progress.bar(total=1, desc="outputs"))
    assert manifest.outputs == []  # not recorded as the checkpoint's failure
