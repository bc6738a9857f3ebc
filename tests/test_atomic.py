"""files/atomic.py in process: staged folders, replacing one, and recovery after a writer was
killed (simulated by leaving its temporary folders behind as a kill would)."""
import os

import pytest

from prunenet_jax.errors import UserError
from prunenet_jax.files import atomic, output_folder


def _hidden(parent):
    return sorted(n for n in os.listdir(parent) if n.startswith("."))


def test_staged_dir_appears_only_when_complete(tmp_path):
    final = tmp_path / "out"
    with atomic.staged_dir(str(final)) as tmp:
        (open(os.path.join(tmp, "a.txt"), "w")).write("new")
        assert not final.exists() and os.path.basename(tmp).startswith(".out.tmp-")
    assert (final / "a.txt").read_text() == "new" and _hidden(tmp_path) == []


def test_replace_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.staged_dir(str(final)) as tmp:
            open(os.path.join(tmp, "a.txt"), "w").write("half")
            raise RuntimeError("the writer fails midway")
    assert (final / "a.txt").read_text() == "old" and _hidden(tmp_path) == []
    with atomic.staged_dir(str(final)) as tmp:
        open(os.path.join(tmp, "a.txt"), "w").write("new")
        assert (final / "a.txt").read_text() == "old"  # still the old one while writing
    assert (final / "a.txt").read_text() == "new" and _hidden(tmp_path) == []


@pytest.mark.parametrize("killed", ["while writing", "between the renames"])
def test_recovery_after_a_kill(tmp_path, killed):
    """A kill while writing leaves `.out.tmp-*`; a kill between the two renames of a replace
    leaves the previous folder as `.out.old-*` and no `out`. The next write of `out` restores or
    removes them, and a killed writer never leaves a partial `out`."""
    final = tmp_path / "out"
    if killed == "while writing":
        final.mkdir()
        (final / "a.txt").write_text("old")
        (tmp_path / ".out.tmp-dead0001").mkdir()
        (tmp_path / ".out.tmp-dead0001" / "a.txt").write_text("partial")
    else:
        (tmp_path / ".out.old-dead0002").mkdir()
        (tmp_path / ".out.old-dead0002" / "a.txt").write_text("old")
    seen = []
    with atomic.staged_dir(str(final)) as tmp:
        seen.append((final / "a.txt").read_text())  # recovered before the new write begins
        assert _hidden(tmp_path) == [os.path.basename(tmp)]
        open(os.path.join(tmp, "a.txt"), "w").write("new")
    assert seen == ["old"] and (final / "a.txt").read_text() == "new" and _hidden(tmp_path) == []


def test_atomic_file_and_json(tmp_path):
    path = tmp_path / "m.json"
    atomic.write_json(str(path), {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n  "b": 1,\n  "a": [\n    1,\n    2\n  ]\n}\n'
    atomic.write_json(str(path), {"b": 1, "a": 2}, sort_keys=True)
    assert path.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    with pytest.raises(ValueError):
        atomic.atomic_write(str(path), lambda f: (f.write(b"half"), (_ for _ in ()).throw(ValueError())))
    assert path.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n' and _hidden(tmp_path) == []


def test_check_out_dir(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    with pytest.raises(UserError, match="inside the input checkpoint"):
        output_folder.check_out_dir(str(src / "out"), [str(src)])
    with pytest.raises(UserError, match="holds the input checkpoint"):
        output_folder.check_out_dir(str(tmp_path), [str(src)], replaced=True)
    with pytest.raises(UserError, match="is not empty; pass --overwrite"):
        output_folder.check_out_dir(str(src), [], reuse=False)
    (tmp_path / "empty").mkdir()
    output_folder.check_out_dir(str(tmp_path / "empty"), [], reuse=False)
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        output_folder.check_out_dir(str(tmp_path / "empty"), [], reuse=False, must_not_exist=True,
                             name="--output=x")
    assert not (tmp_path / "new").exists()
    output_folder.check_out_dir(str(tmp_path / "new" / "deeper"), [])  # creates nothing
    assert not (tmp_path / "new").exists()
