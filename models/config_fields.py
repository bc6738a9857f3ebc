"""Typed, range-checked reading of a config dict (config.json, or a part of it such as
`rope_parameters`): every failure is a UserError naming the file, the field and what it must be."""
from __future__ import annotations

import math
from typing import Any

from prunenet_jax.errors import UserError

REQUIRED = object()

_MAX_SIZE = 2**31 - 1  # sizes index int32 arrays


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """Typed, range-checked access to a config dict; every failure is a UserError naming the
    file, the field and what it must be. A field set to null counts as absent."""

    def __init__(self, cfg: dict, source: str):
        self.cfg, self.source = cfg, source

    def fail(self, key: str, problem: str):
        raise UserError(f"{self.source}: field {key!r} {problem}; fix the config so it matches "
                        "what transformers writes for this architecture")

    def get(self, key: str, kind: type, default: Any = REQUIRED) -> Any:
        value = self.cfg.get(key)
        if value is None:
            if default is REQUIRED:
                self.fail(key, "is missing")
            return default
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            what = "number" if isinstance(kind, tuple) else kind.__name__
            self.fail(key, f"is {_short(value)} ({type(value).__name__}), not a {what}")
        return value

    def size(self, key: str, default: Any = REQUIRED) -> Any:
        """A positive integer (an integral float such as 64.0 is taken as 64)."""
        value = self.get(key, (int, float), default)
        if value is default:
            return value
        if not (math.isfinite(value) and value == int(value) and 1 <= value <= _MAX_SIZE):
            self.fail(key, f"is {_short(value)}, not an integer in [1, {_MAX_SIZE}]")
        return int(value)

    def positive(self, key: str, default: Any = REQUIRED) -> float:
        """A finite number > 0."""
        value = self.get(key, (int, float), default)
        if not (math.isfinite(value) and value > 0):
            self.fail(key, f"is {_short(value)}, not a finite number > 0")
        return float(value)
