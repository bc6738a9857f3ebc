"""What every launcher shares: user errors as one `error:` line and exit code 2, dtype names."""
from __future__ import annotations

import sys

import jax.numpy as jnp
from absl import app, flags

from prunenet_jax.errors import UserError  # noqa: F401  (re-exported for launchers)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(f"{e}; run with --help to see the flags")


def run(main) -> None:
    """absl app.run, with flag errors and UserErrors reported as one line and exit code 2."""

    def guarded(argv):
        if len(argv) > 1:
            _fail(f"unexpected arguments {argv[1:]}; every option is a --flag (see --help)")
        try:
            return main(argv)
        except UserError as e:
            _fail(str(e))

    app.run(guarded, flags_parser=_parse_flags)


def dtype(name: str):
    if name not in DTYPES:
        raise UserError(f"--dtype={name} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]
