"""What a pruning run writes: results.json, the trained policy, its history, the kept channels.

Files are written under a temporary name and renamed, so a crash leaves the old file or the
complete new one, never a partial one. The input checkpoint is never written into.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from prunenet_jax.errors import UserError


def check_out_dir(out_dir: str, model_source: str) -> None:
    """Refuses an --out_dir inside the input checkpoint, or one that cannot be written. Creates
    nothing: the folder is made when the first output is written."""
    out = os.path.realpath(out_dir)
    if os.path.isdir(model_source):
        src = os.path.realpath(model_source)
        if out == src or out.startswith(src + os.sep):
            raise UserError(f"--out_dir={out_dir} is inside the input checkpoint {model_source}; "
                            "choose a folder outside it (inputs are never written into)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out_dir={out_dir} exists and is not a folder; choose another path")
    existing = out
    while not os.path.exists(existing):  # the nearest existing ancestor must let us create it
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out_dir={out_dir} cannot be written ({existing} is not a writable "
                        "folder); choose a writable path")


def _atomic(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
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


def write_json(path: str, obj) -> None:
    _atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_arrays(path: str, arrays: dict) -> None:
    _atomic(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}))


def write_run(out_dir: str, summary: dict, policy_params: dict, kept: dict, history: dict) -> None:
    """policy.npz (P, b, r), kept_channels.npz (ratio_<r>: (L, k)), history.npz (per episode:
    ks, rewards (E, L), indices (E, L, k)), results.json (the summary the launcher prints)."""
    os.makedirs(out_dir, exist_ok=True)
    write_arrays(os.path.join(out_dir, "policy.npz"), policy_params)
    write_arrays(os.path.join(out_dir, "history.npz"), history)
    write_arrays(os.path.join(out_dir, "kept_channels.npz"), kept)
    write_json(os.path.join(out_dir, "results.json"), summary)
