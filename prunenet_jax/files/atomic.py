"""Atomic files and folders, and what a failed write means.

Files and folders are written under a temporary name, fsynced and renamed, so a crash leaves the old
one or the complete new one, never a partial one. Which folder may be written is files/out_dir.py's.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import tempfile
import uuid
from typing import Optional

from prunenet_jax.errors import UserError, WriteError
from prunenet_jax.files import json_files


_WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                 errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                 errno.EROFS: "read-only file system"}
# How orbax/tensorstore word the same failures in the exceptions they raise.
_WRITE_TEXTS = {"RESOURCE_EXHAUSTED": _WRITE_ERRNOS[errno.ENOSPC],
                "No space left": _WRITE_ERRNOS[errno.ENOSPC],
                "PERMISSION_DENIED": _WRITE_ERRNOS[errno.EACCES],
                "Permission denied": _WRITE_ERRNOS[errno.EACCES],
                "Read-only file system": _WRITE_ERRNOS[errno.EROFS]}


# What a rerun after a failed write keeps, for every launcher that writes.
RERUN = ("finished outputs are kept; with --resume, launch.prune and launch.recover continue "
         "training from their last checkpoint")


def write_failure(error: BaseException) -> Optional[str]:
    """Why a write failed, when `error` (or what caused it) is the disk or the permissions
    rather than a bug: "no space left on the device", ...; else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
            return _WRITE_ERRNOS[error.errno]
        text = str(error)
        for marker, reason in _WRITE_TEXTS.items():
            if marker in text:
                return reason
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def write_errors(path: str):
    """Turns a failed write under `path` (see `write_failure`) into a WriteError: one line that
    says what to do, instead of a traceback."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        reason = write_failure(e)
        if reason is None:
            raise
        raise WriteError(f"cannot write {path}: {reason}; free space or restore write access, "
                         f"then rerun the same command ({RERUN})") from None


@contextlib.contextmanager
def staged_dir(final: str, *, create: bool = True):
    """Yields a temporary sibling path of folder `final` to fill; on success it is renamed to
    `final`. An existing `final` is renamed away first and deleted after the swap, so at every
    instant `final` is the old complete folder, the new complete one, or (for the instant between
    two renames) absent, never partial. On an exception the temporary folder is removed.
    `create=False` yields the path without making it (for writers that insist on creating it).
    A failed write (disk full, permission lost) is a WriteError; a symbolic link at `final` is
    refused (swapping it would delete the link and write beside it)."""
    final = os.path.abspath(final)
    if os.path.islink(final):
        raise UserError(f"{final} is a symbolic link; replacing it would write through the link. "
                        "Pass the folder it points to, or remove the link")
    with write_errors(final):
        with _staged_dir(final, create) as tmp:
            yield tmp


@contextlib.contextmanager
def _staged_dir(final: str, create: bool):
    """staged_dir's staging and swap."""
    parent, name = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    _recover(parent, name)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    if create:
        os.mkdir(tmp)
    try:
        yield tmp
        old = None
        if os.path.lexists(final):
            old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            if old is not None:
                os.rename(old, final)
            raise
        fsync_path(parent)
        if old is not None:
            shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)
    except BaseException:
        for path in glob.glob(glob.escape(tmp) + "*"):  # orbax stages in <tmp>.orbax-checkpoint-tmp
            shutil.rmtree(path, ignore_errors=True)
        raise


def _recover(parent: str, name: str) -> None:
    """Tidies what a killed writer of `name` left: partial `.tmp-` folders are deleted; an
    `.old-` folder is the complete previous output when the kill fell between the two renames,
    so it is put back if `name` is missing, else deleted. (One writer per output folder.)"""
    for old in sorted(glob.glob(os.path.join(parent, glob.escape(f".{name}.old-") + "*"))):
        if not os.path.lexists(os.path.join(parent, name)):
            os.rename(old, os.path.join(parent, name))
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in glob.glob(os.path.join(parent, glob.escape(f".{name}.tmp-") + "*")):
        shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else os.remove(tmp)


def fsync_path(path: str) -> None:
    """A file's data, or a folder's entries, on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str) -> None:
    """Everything under `folder` on disk (before it is renamed into place)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def atomic_write(path: str, write) -> None:
    """Calls write(file) on a temporary file beside `path`, fsyncs it and renames it to `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    with write_errors(path):
        _atomic_write(path, folder, write)


def _atomic_write(path: str, folder: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj, *, sort_keys: bool = False) -> None:
    """`obj` as indented strict JSON (NaN/Infinity become null), written atomically (fsynced,
    then renamed into place)."""
    text = json_files.dumps(obj, indent=2, sort_keys=sort_keys) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
