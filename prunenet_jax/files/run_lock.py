"""One run at a time per output folder: an advisory lock (fcntl.flock) on `<folder>/.prunenet.lock`,
held for the whole run.

A second run into the same folder gets a UserError naming the holder's pid. The kernel drops the
lock when its holder dies, so a lock file left by a killed run is simply taken over (its stale
pid is logged). The file is removed on release, and a folder the lock itself created is removed
again when nothing else was written into it, so a run refused early leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from typing import Optional

from absl import logging

from prunenet_jax.errors import UserError
from prunenet_jax.files import atomic

LOCK_FILE = ".prunenet.lock"  # not counted as content of a run folder (output_folder.py)


def lock_path(folder: str, name: str = LOCK_FILE) -> str:
    return os.path.join(folder, name)


@contextlib.contextmanager
def hold(folder: Optional[str], *, flag: str = "--out_dir", name: str = LOCK_FILE,
         shown: Optional[str] = None):
    """Holds the lock of `folder` (nothing when `folder` is None). `name`: the lock file's name
    (batch shards, which write disjoint files, each lock their own); `shown`: the path the
    refusal names (default `folder`)."""
    if not folder:
        yield
        return
    created = not os.path.exists(folder)
    with atomic.write_errors(folder):
        os.makedirs(folder, exist_ok=True)
        fd = _acquire(shown or folder, lock_path(folder, name), flag)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(lock_path(folder, name))  # before unlocking: a waiter re-checks the inode
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only if the run wrote nothing else


def hold_beside(path: Optional[str], *, flag: str):
    """The lock of an output that is swapped in whole (convert's --output, evaluate's
    --report_dir): the folder itself is replaced, so its lock is a file beside it,
    `.<name>.prunenet.lock`, in its parent."""
    if not path:
        return hold(None)
    parent, name = os.path.split(os.path.abspath(path))
    return hold(parent, flag=flag, name=f".{name}{LOCK_FILE}", shown=path)


def _acquire(folder: str, path: str, flag: str) -> int:
    """Locks `path` (created if missing); returns its descriptor, with our pid written in."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise UserError(f"{flag}={folder} is in use by another run (pid {holder or '?'}, "
                            f"lock {path}); wait for it to finish, or choose another folder") from None
        # The holder before us may have removed the file between our open and our lock: then we
        # locked a file nobody else will see; start again on the one now at `path`.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = _read_pid(fd)
    if stale:
        logging.info("%s: taking over the lock of pid %s, which is gone", path, stale)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _read_pid(fd: int) -> Optional[str]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 32).decode(errors="replace").strip()
    return text if text.isdigit() else None
