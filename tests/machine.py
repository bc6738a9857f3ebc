"""Skips that depend on the machine (a missing system file, no root, an optional package absent).

Locally such a test is skipped with its reason (pytest.ini's `-rfEs` prints it in the summary).
CI (the environment variable CI=true; root, `scripts/install.sh --test`, python3.11-doc) has
every one of these conditions, so there the same call fails instead: a CI run cannot pass by
skipping a test it was meant to run. Skips that depend on a parameter or on the math (e.g.
test_spectral's gram case) are not machine-dependent and use pytest.skip directly.
"""
import contextlib
import importlib
import os
import subprocess

import pytest

CI_MUST_NOT_SKIP = "CI must not skip this"


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def machine_skip(reason: str):
    """Skip this test for `reason`, a condition of this machine; under CI=true fail instead.
    Also at module level (the whole module skipped; under CI=true, a collection error)."""
    __tracebackhide__ = True  # the summary names the calling test's line, not this one
    if in_ci():
        pytest.fail(f"{reason} (CI=true: {CI_MUST_NOT_SKIP})", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str, install: str = "bash scripts/install.sh --test"):
    """The module `name` (an optional package of the test extras), imported; if it is missing,
    machine_skip (so under CI=true, where the test extras are installed, the test fails)."""
    __tracebackhide__ = True
    try:
        return importlib.import_module(name)
    except ImportError as e:
        machine_skip(f"could not import {name!r} ({e}): install the test extras: {install}")


@contextlib.contextmanager
def small_disk(mount, size: str):
    """A tmpfs of `size` (e.g. "2m") mounted on the new folder `mount` while inside: a disk that
    fills up (needs root; skipped where it cannot be mounted, failing under CI=true)."""
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        machine_skip("cannot mount a tmpfs here (not root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)
