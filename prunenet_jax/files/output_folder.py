"""Which folders a run may write: the one check of every output folder, and free space."""
from __future__ import annotations

import os
import shutil
from typing import Optional

from prunenet_jax.errors import UserError, WriteError
from prunenet_jax.files import atomic
from prunenet_jax.files.run_lock import LOCK_FILE

RUN_DIR_FIX = ("pass --overwrite to replace an earlier run's outputs, --resume to continue it, "
               "or choose an empty folder")


def check_out_dir(out_dir: str, inputs, *, reuse: bool = True, name: Optional[str] = None,
                  fix: str = RUN_DIR_FIX, replaced: bool = False,
                  must_not_exist: bool = False) -> None:
    """The one check of every output folder (--out_dir, --report_dir, --output, HF exports):
    refuses one inside an input (a path or a list of paths), one that cannot be written, and
    (unless `reuse`, i.e. --overwrite/--resume) a non-empty one, whose error says `fix`, or with
    `must_not_exist` an existing one. `replaced`: the folder is swapped whole (staged_dir), so one
    holding an input is refused too. `name` is how messages call the folder (default
    `--out_dir=<out_dir>`). Creates nothing."""
    name = name or f"--out_dir={out_dir}"
    out = os.path.realpath(out_dir)
    for source in [inputs] if isinstance(inputs, str) else inputs:
        if not source or not os.path.exists(source):
            continue  # hub ids and the like: nothing on disk to protect
        src = os.path.realpath(source)
        if _inside(out, src):
            raise UserError(f"{name} is inside the input checkpoint {source}; choose a folder "
                            "outside it (inputs are never written into)")
        if replaced and _inside(src, out):
            raise UserError(f"{name} holds the input checkpoint {source}, which replacing the "
                            "folder would delete; choose another folder")
    if replaced and os.path.islink(out_dir):
        raise UserError(f"{name} is a symbolic link (to {out}); replacing it would write through "
                        "the link. Pass the folder it points to, or remove the link")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{name} exists and is not a folder; choose another path")
    if not reuse and os.path.isdir(out) and set(os.listdir(out)) - {LOCK_FILE}:
        raise UserError(f"{name} is not empty; {fix}")
    if must_not_exist and not reuse and os.path.exists(out_dir):
        raise UserError(f"{name} exists; pass --overwrite to replace it")
    existing = out
    while not os.path.exists(existing):  # the nearest existing ancestor must let us create it
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{name} cannot be written ({existing} is not a writable folder); choose "
                        "a writable path")


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_free_space(path: str, nbytes: int) -> None:
    """Refuses to start writing about `nbytes` under `path` when its file system has less free:
    a write that fails midway is slower to report and (in orbax's writer threads) noisier."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if free < nbytes:
        raise WriteError(f"cannot write {path}: it needs about {nbytes / 2**20:.1f} MiB but "
                         f"{existing} has {free / 2**20:.1f} MiB free; free space, then rerun "
                         f"the same command ({atomic.RERUN})")
