"""Hostile files, round 2: project-written JSON read through one checked reader (files/json_files.py)
and written strictly; damaged manifests reported as damaged (never silently for a folder named as
input or continued with --resume); manifest folders confined to their run folder; damaged orbax
metadata; saved channel scores checked on load. Library calls in process where a launcher would
prove nothing more; one launcher subprocess per launcher behaviour (exit 2, one `error:` line,
nothing written, the input unchanged)."""
import json
import os
import shutil
import types

import numpy as np
import pytest

from prunenet_jax import prune, sources
from prunenet_jax.errors import UserError
from prunenet_jax.files import atomic, json_files
from prunenet_jax.formats import orbax, run_dir
from prunenet_jax.method import calibration, scores
from prunenet_jax.method.episode import TrainConfig
from prunenet_jax.models import registry
from prunenet_jax.run import prune_run
from tests import tiny_models
from tests.test_user_errors import _assert_user_error, _run, tree_hash

L, I, H = 2, 40, 32  # the tiny model's layers and widths


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny dense HF model and a run folder holding its random-mode pruned model (orbax) and
    a manifest that lists it."""
    root = tmp_path_factory.mktemp("hostile_files")
    dense = tiny_models.save_hf_model(tiny_models.make_hf_model(
        "llama_gqa_untied", num_hidden_layers=L, intermediate_size=I), root / "dense")
    weights = sources.load_model(dense)
    kept = prune.select_kept(None, weights.layers[registry.GATE], 0.5, "random", 0)
    run = root / "run"
    orbax.save_model(str(run / "ratio_0.5" / "orbax"), prune.slice_weights(weights, kept),
                     {"ratio": 0.5, "mode": "random", "guard": False, "source": dense}, kept=kept)
    manifest = run_dir.Manifest(str(run), {"model": dense}, resume=False)
    manifest.record(run_dir.OutputEntry(ratio=0.5, orbax_dir="ratio_0.5/orbax",
                                        recipe={"mode": "random"}))
    return root, dense, run


def _copy_run(models, tmp_path):
    _, _, run = models
    return shutil.copytree(run, tmp_path / "run", symlinks=True)


# ----------------------------------------------------------------------------- the JSON reader

@pytest.mark.parametrize("data,kind,fragment", [
    (b'{"a": 1,\n "b": }', dict, "Expecting value at line 2 column 7"),
    (b'{"a": "\xff"}', dict, "not UTF-8 text: byte 0xff at offset 7"),
    (b'{"s": "NaN",\n "ppl": NaN}', dict, "NaN is not a JSON number, at line 2 column 9"),
    (b'[1, -Infinity]', list, "-Infinity is not a JSON number, at line 1 column 5"),
    (b'[1, 2]', dict, "holds a list, not an object"),
    (b'"text"', dict, "holds a string, not an object"),
    (b'[' * 100_000, None, "nested too deep"),
])
def test_read_json_names_the_file_and_what_is_wrong(tmp_path, data, kind, fragment):
    path = tmp_path / "record.json"
    path.write_bytes(data)
    with pytest.raises(UserError) as e:
        json_files.read_json(str(path), fix="restore it", kind=kind)
    assert str(e.value).startswith(str(path)) and fragment in str(e.value)
    assert str(e.value).endswith("; restore it")


def test_read_json_unreadable_and_constants_of_other_tools(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match=r"cannot read .*folder \(Is a directory\); check the path"):
        json_files.read_json(str(tmp_path / "folder"), fix="x")
    (tmp_path / "config.json").write_text('{"x": NaN}')  # as transformers' json.dumps writes
    value = json_files.read_json(str(tmp_path / "config.json"), fix="x", constants=True)
    assert np.isnan(value["x"])


def test_json_out_is_strict(tmp_path):
    """write_json, the manifest and launcher lines: NaN/Infinity become null, never NaN."""
    value = {"ppl": float("nan"), "rows": [float("inf"), 1.5, (float("-inf"), 2)]}
    assert json_files.dumps(value) == '{"ppl": null, "rows": [null, 1.5, [null, 2]]}'
    atomic.write_json(str(tmp_path / "a.json"), value)
    assert json_files.read_json(str(tmp_path / "a.json"), fix="x")["rows"] == [None, 1.5, [None, 2]]
    manifest = run_dir.Manifest(str(tmp_path), {"dense_ppl": float("inf")}, resume=False)
    manifest.record(run_dir.OutputEntry(ratio=0.5, ppl=float("nan")))
    data = json_files.read_json(manifest.path, fix="x")
    assert data["dense_ppl"] is None and data["outputs"][0]["ppl"] is None


# ----------------------------------------------------------------------------- manifests

CORRUPT = {"truncated": '{"model": "m", "outputs": [', "list": "[]",
           "outputs": '{"outputs": {"ratio": 0.5}}', "nan": '{"outputs": [], "dense_ppl": NaN}'}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_a_corrupt_input_manifest_is_reported_as_corrupt(tmp_path, case):
    (tmp_path / run_dir.MANIFEST).write_text(CORRUPT[case])
    with pytest.raises(UserError) as e:
        run_dir.finished_outputs(str(tmp_path))
    text = str(e.value)
    assert str(tmp_path / run_dir.MANIFEST) in text and "lists no finished output" not in text
    assert "is damaged: restore it, or pass the model folders" in text
    assert run_dir.finished_outputs(str(tmp_path), strict=False) == []  # a folder above the one named


def test_a_corrupt_manifest_is_refused_on_resume_and_ignored_when_written_anew(tmp_path):
    path = tmp_path / run_dir.MANIFEST
    path.write_text(CORRUPT["truncated"])
    for attempt in (lambda: run_dir.check_resume(str(tmp_path), True, False),
                    lambda: run_dir.Manifest(str(tmp_path), {}, resume=True)):
        with pytest.raises(UserError, match="restore it, or pass --overwrite to start the run afresh"):
            attempt()
    assert path.read_text() == CORRUPT["truncated"]
    fresh = run_dir.Manifest(str(tmp_path), {"model": "m"}, resume=False)  # --overwrite: replaced
    assert fresh.outputs == []
    (tmp_path / "manifests").mkdir()
    (tmp_path / run_dir.shard_manifest_name(1, 2)).write_text("{")
    with pytest.raises(UserError, match=r"shard-00001-of-00002.json cannot be read as JSON.*rerun shard 1"):
        run_dir.merge_manifests(str(tmp_path), 2)


@pytest.mark.parametrize("field,value,fragment", [
    ("orbax_dir", "/etc", "not a path inside the run folder"),
    ("orbax_dir", "../outside", "not a path inside the run folder"),
    ("hf_dir", "ratio_0.5/../../outside", "not a path inside the run folder"),
    ("orbax_dir", "link/orbax", "outside the run folder (a symbolic link)"),
    ("orbax_dir", 7, "not a folder name"),
    ("hf_dir", ["ratio_0.5"], "not a folder name"),
    ("mode", {"a": 1}, "not a string"),
])
def test_manifest_folders_stay_inside_the_run_folder(tmp_path, field, value, fragment):
    run, outside = tmp_path / "run", tmp_path / "outside"
    (outside / "orbax").mkdir(parents=True)
    (run / "ratio_0.5" / "orbax").mkdir(parents=True)
    os.symlink(outside, run / "link")
    entry = {"ratio": 0.5, "status": "done", "orbax_dir": "ratio_0.5/orbax", field: value}
    (run / run_dir.MANIFEST).write_text(json.dumps({"outputs": [entry]}))
    for attempt in (lambda: run_dir.finished_outputs(str(run)),
                    lambda: run_dir.finished_outputs(str(run), strict=False),
                    lambda: run_dir.Manifest(str(run), {}, resume=True)):
        with pytest.raises(UserError) as e:
            attempt()
        assert str(run / run_dir.MANIFEST) in str(e.value) and fragment in str(e.value)
        assert f"{field}={value!r}" in str(e.value)


def test_a_corrupt_run_manifest_through_the_launchers(models, tmp_path):
    """launch.generate names the run folder (read as input); launch.prune --resume continues one:
    both refuse its damaged manifest before loading anything, and write nothing."""
    run = _copy_run(models, tmp_path)
    (run / run_dir.MANIFEST).write_text(CORRUPT["truncated"])
    before = tree_hash(run)
    last = _assert_user_error(_run("launch.generate", f"--model={run}", "--prompt=hi"),
                              str(run / run_dir.MANIFEST), "cannot be read as JSON",
                              "restore it, or pass the model folders")
    assert "lists no finished output" not in last
    _assert_user_error(_run("launch.prune", f"--model={models[1]}", "--mode=random",
                            "--ratios=0.5", f"--out_dir={run}", "--resume"),
                       str(run / run_dir.MANIFEST), "pass --overwrite to start the run afresh")
    assert tree_hash(run) == before and sorted(os.listdir(run)) == ["manifest.json", "ratio_0.5"]


# ----------------------------------------------------------------------------- orbax metadata

def _meta_file(folder):
    return os.path.join(folder, "meta", "metadata")


def _edit_meta(folder, **changes):
    meta = json.load(open(_meta_file(folder)))
    meta.update(changes)
    with open(_meta_file(folder), "w") as f:
        json.dump(meta, f)


def test_damaged_orbax_metadata_is_a_user_error_naming_the_file(models, tmp_path):
    model = _copy_run(models, tmp_path) / "ratio_0.5" / "orbax"
    good = open(_meta_file(model)).read()
    for garbage, fragment in (("\0\0garbage", "cannot be read as JSON"),
                              ('{"kind": "prunenet_jax.sliced_model", "ratio": NaN}', "NaN")):
        with open(_meta_file(model), "w") as f:
            f.write(garbage)
        with pytest.raises(UserError, match=fragment) as e:
            orbax.read_meta(str(model))
        assert _meta_file(model) in str(e.value) and "the checkpoint is damaged" in str(e.value)
    for changes, fragment in (({"format_version": "1"}, "format_version is '1'"),
                              ({"dtypes": []}, "'dtypes' does not name a dtype")):
        with open(_meta_file(model), "w") as f:
            f.write(good)
        _edit_meta(model, **changes)
        with pytest.raises(UserError, match=fragment) as e:
            orbax.load_model(str(model))
        assert _meta_file(model) in str(e.value)


@pytest.mark.parametrize("launcher", ["launch.recover", "launch.generate", "launch.evaluate"])
def test_damaged_orbax_metadata_through_the_launchers(models, tmp_path, launcher):
    _, dense, _ = models
    model = _copy_run(models, tmp_path) / "ratio_0.5" / "orbax"
    with open(_meta_file(model), "w") as f:
        f.write('{"kind": "prunenet_jax.sliced_model", ')
    before, out = tree_hash(tmp_path / "run"), tmp_path / "out"
    args = {"launch.recover": [f"--input={model}", f"--out_dir={out}"],
            "launch.generate": [f"--model={model}", "--prompt=hi"],
            "launch.evaluate": [f"--model={dense}", f"--pruned={model}", f"--report_dir={out}"]}
    _assert_user_error(_run(launcher, *args[launcher]), _meta_file(model),
                       "cannot be read as JSON", "the checkpoint is damaged")
    assert not out.exists() and tree_hash(tmp_path / "run") == before


# ----------------------------------------------------------------------------- saved scores

def _valid(l=L, i=I):
    rng = np.random.default_rng(0)
    return {n: rng.uniform(0.1, 1.0, (l, i)).astype(np.float32) for n in scores.ARRAYS}


def _save_scores(path, named, **meta_changes):
    meta = {"shape": [L, I, H], "model": "m", "calibration": {"source": "self"}}
    orbax.save_scores(str(path), named, meta, overwrite=True)
    if meta_changes:
        _edit_meta(path, **meta_changes)
    return str(path)


def _bad_arrays(case):
    arrays = _valid()
    if case == "nan":
        arrays["energy"][1, 3] = np.nan
    elif case == "negative":
        arrays["peak"][0, 0] = -1.0
    elif case == "constant":
        arrays["energy"][1] = 0.25
    elif case in ("no_peak", "peak_not_saved"):
        del arrays["peak"]
    return arrays


BAD_SCORES = {
    "nan": ({}, "energy has 1 NaN or Inf values"),
    "negative": ({}, "peak has 1 negative values"),
    "constant": ({}, "energy is 0.25 for every channel of layer 1, so it cannot rank them"),
    "no_peak": ({}, "without peak"),
    "peak_not_saved": ({"arrays": ["energy", "mean_sq", "peak"]}, "damaged or incomplete"),
    "short_shape": ({"shape": [L, I]}, f"shape is [{L}, {I}], not [layers"),
    "shape_types": ({"shape": [L, "40", True]}, "3 integers >= 1"),
    "array_shape": ({"shape": [L, I + 1, H]}, f"has shape ({L}, {I}), not (layers, intermediate_size) = ({L}, {I + 1})"),
    "arrays_type": ({"arrays": "energy"}, "arrays is 'energy', not a list of names"),
}


@pytest.mark.parametrize("case", sorted(BAD_SCORES))
def test_saved_scores_are_checked_on_load(tmp_path, case):
    changes, fragment = BAD_SCORES[case]
    path = _save_scores(tmp_path / "scores", _bad_arrays(case), **changes)
    with pytest.raises(orbax.BadScores) as e:
        scores.load(path)
    assert str(e.value).startswith(f"--scores={path}: ") and fragment in e.value.problem
    assert str(e.value).endswith("pass the scores/ folder of an earlier energy run of this model "
                                 "(<its --out_dir>/scores), or drop --scores")


def test_invalid_saved_scores_are_measured_again_with_a_warning(tmp_path, monkeypatch, capsys):
    cal = calibration.Calibration(sequences=2, seq_len=8)
    weights = types.SimpleNamespace(
        source="m", config=types.SimpleNamespace(num_hidden_layers=L, intermediate_size=I,
                                                  hidden_size=H))
    saved = tmp_path / scores.SCORES
    _save_scores(saved, _bad_arrays("constant"), calibration=cal.describe())
    good = _valid()
    measured = scores.Scores(good["energy"], good["mean_sq"], good["peak"],
                             {"shape": [L, I, H], "model": "m", "calibration": cal.describe()})
    monkeypatch.setattr(scores, "measure", lambda *a, **k: measured)
    got, computed = scores.obtain(weights, cal, lambda: None, folder=str(tmp_path))
    assert computed and got is measured
    warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning: ")]
    assert len(warnings) == 1 and str(saved) in warnings[0]
    assert "energy is 0.25 for every channel of layer 1" in warnings[0] and "--scores" not in warnings[0]
    np.testing.assert_array_equal(scores.load(str(saved)).energy, good["energy"])  # replaced


def test_bad_scores_through_the_prune_launcher(models, tmp_path):
    _, dense, _ = models
    bad = _save_scores(tmp_path / "old" / "scores", _bad_arrays("constant"))
    before, out = tree_hash(tmp_path / "old"), tmp_path / "out"
    _assert_user_error(_run("launch.prune", f"--model={dense}", "--mode=energy", "--ratios=0.5",
                            f"--scores={bad}", f"--out_dir={out}"),
                       f"--scores={bad}: energy is 0.25 for every channel of layer 1",
                       "or drop --scores")
    assert not out.exists() and tree_hash(tmp_path / "old") == before


@pytest.mark.parametrize("modes", [("sample",), ("topk", "random")])
def test_scores_without_a_mode_that_uses_them_is_refused(modes):
    job = prune_run.PruneJob(model="m", ratios=(0.5,),
                             training=prune_run.Training(TrainConfig(ratio=0.5)),
                             outputs=prune_run.OutputOptions(modes=modes), scores="old/scores")
    with pytest.raises(UserError, match=f"--scores=old/scores is used only by --mode=energy,compensated, and "
                                        f"--mode={','.join(modes)} uses no scores"):
        job.check()


def test_damaged_training_checkpoint_metadata_is_a_user_error_on_resume(tmp_path):
    ckpts = orbax.TrainCheckpoints(str(tmp_path / "state"), {"seed": 1})
    ckpts.save(1, {"w": np.zeros(3, np.float32)}, {"loss": np.zeros(1, np.float32)})
    ckpts.wait()
    ckpts.close()
    meta = tmp_path / "state" / "1" / "meta" / "metadata"
    assert json.loads(meta.read_text())["seed"] == 1  # where orbax keeps it
    meta.write_bytes(b"\x00garbage{")
    resumed = orbax.TrainCheckpoints(str(tmp_path / "state"), {"seed": 1})
    with pytest.raises(UserError, match=f"{meta} cannot be read as JSON .*drop --resume"):
        resumed.restore({"w": np.zeros(3, np.float32)},
                        lambda n: {"loss": np.zeros(1, np.float32)})
    resumed.close()
