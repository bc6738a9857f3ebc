"""formats/run_dir.py in process: the manifest's write/read/merge round trip, failed entries, old
manifests, and what a resumed run counts as done."""
import json
import os

import pytest

from prunenet_jax.errors import UserError
from prunenet_jax.formats import run_dir
from prunenet_jax.formats.run_dir import Manifest, OutputEntry

RECIPE = run_dir.recipe("abcd", "sample", 42, True, False)


def _done(folder, ratio, checkpoint=None, **kw):
    orbax_dir, hf_dir, _ = run_dir.output_dirs(os.path.join(folder, checkpoint or ""), ratio)
    os.makedirs(orbax_dir)
    os.makedirs(hf_dir)
    return OutputEntry(ratio=ratio, kept=10, params=1000, ppl=12.5, checkpoint=checkpoint,
                       orbax_dir=os.path.relpath(orbax_dir, folder),
                       hf_dir=os.path.relpath(hf_dir, folder), recipe=RECIPE, **kw)


def test_write_read_round_trip(tmp_path):
    m = Manifest(str(tmp_path), {"model": "tiny", "seed": 42}, resume=False)
    m.record(_done(str(tmp_path), 0.1, extra={"dense_ppl": 10.0}))
    m.record(_done(str(tmp_path), 0.2))
    data = json.loads((tmp_path / run_dir.MANIFEST).read_text())
    assert data["model"] == "tiny" and [o["ratio"] for o in data["outputs"]] == [0.1, 0.2]
    assert data["outputs"][0] == {"dense_ppl": 10.0, "ratio": 0.1, "kept": 10, "params": 1000,
                                  "ppl": 12.5, "orbax_dir": "ratio_0.1/orbax",
                                  "hf_dir": "ratio_0.1/hf", "status": "done", **RECIPE}
    again = Manifest(str(tmp_path), {"model": "tiny", "seed": 42}, resume=True)
    assert [e.to_json() for e in again.outputs] == data["outputs"]
    assert again.is_done(0.1, RECIPE) and again.is_done(0.2, RECIPE)
    assert not again.is_done(0.1, {**RECIPE, "seed": 1})  # another recipe: redo
    assert not Manifest(str(tmp_path), {}, resume=False).outputs  # not resuming: start afresh
    found = run_dir.finished_outputs(str(tmp_path))
    assert [(o.ratio, o.model_dir) for o in found] == [
        (0.1, str(tmp_path / "ratio_0.1" / "hf")), (0.2, str(tmp_path / "ratio_0.2" / "hf"))]


def test_done_entry_with_a_missing_folder_is_redone(tmp_path):
    m = Manifest(str(tmp_path), {}, resume=False)
    m.record(_done(str(tmp_path), 0.3))
    os.rmdir(tmp_path / "ratio_0.3" / "hf")
    assert not m.is_done(0.3, RECIPE)
    with pytest.raises(UserError, match="missing; rerun the prune launcher with --resume"):
        run_dir.finished_outputs(str(tmp_path))


def test_failed_entry_replaces_and_is_replaced(tmp_path):
    m = Manifest(str(tmp_path), {}, resume=False)
    m.record(OutputEntry(ratio=0.5, status=run_dir.FAILED, checkpoint="bad", error="boom",
                         recipe=RECIPE, extra={"source": "/x"}))
    data = json.loads((tmp_path / run_dir.MANIFEST).read_text())["outputs"][0]
    assert data["status"] == "failed" and data["error"] == "boom" and data["kept"] is None
    assert data["checkpoint"] == "bad" and data["source"] == "/x"
    assert not m.is_done(0.5, RECIPE, "bad")
    with pytest.raises(UserError, match="lists no finished output"):
        run_dir.finished_outputs(str(tmp_path))
    m.record(_done(str(tmp_path), 0.5, checkpoint="bad"))  # the rerun succeeds: one entry, done
    assert len(m.outputs) == 1 and m.is_done(0.5, RECIPE, "bad")
    assert m.find(0.5) is None  # a one-model entry is another key than a batch item's


def test_old_manifest_is_read_and_its_entries_redone(tmp_path):
    """A manifest of an earlier version (no export_hf/torch_format in its entries, an unknown
    field) is read; its entries lack part of today's recipe, so they are redone, and the unknown
    field survives a rewrite."""
    old = {"model": "tiny", "outputs": [{"ratio": 0.1, "kept": 10, "params": 5, "ppl": None,
                                         "orbax_dir": "ratio_0.1/orbax", "hf_dir": None,
                                         "status": "done", "policy_fingerprint": "abcd",
                                         "mode": "sample", "seed": 42, "note": "v0"}]}
    os.makedirs(tmp_path / "ratio_0.1" / "orbax")
    (tmp_path / run_dir.MANIFEST).write_text(json.dumps(old))
    m = Manifest(str(tmp_path), {"model": "tiny"}, resume=True)
    assert m.outputs[0].extra == {"note": "v0"} and not m.is_done(0.1, RECIPE)
    assert m.is_done(0.1, {k: RECIPE[k] for k in ("policy_fingerprint", "mode", "seed")})
    m.save()
    assert json.loads((tmp_path / run_dir.MANIFEST).read_text())["outputs"][0] == old["outputs"][0]
    (tmp_path / run_dir.MANIFEST).write_text("{not json")  # a foreign, broken file: start afresh
    assert run_dir.read_manifest(str(tmp_path / run_dir.MANIFEST)) is None


def test_merge_shard_manifests(tmp_path):
    for i in (0, 2):
        m = Manifest(str(tmp_path), {"ratios": [0.1], "shard_index": i, "num_shards": 3},
                     resume=False, name=run_dir.shard_manifest_name(i, 3))
        m.record(OutputEntry(ratio=0.1, checkpoint=f"c{i}", recipe=RECIPE))
    merged = run_dir.merge_manifests(str(tmp_path), 3)
    assert merged["shards"] == {"present": [0, 2], "missing": [1]}
    assert "shard_index" not in merged and [o["checkpoint"] for o in merged["outputs"]] == ["c0", "c2"]
    assert json.loads((tmp_path / run_dir.MANIFEST).read_text()) == merged
    with pytest.raises(UserError, match="no shard manifests"):
        run_dir.merge_manifests(str(tmp_path / "empty"), 2)
