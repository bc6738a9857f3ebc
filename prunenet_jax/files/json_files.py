"""JSON files, read with checks and written strictly.

`read_json` is the one reader of the JSON the project writes (manifests, checkpoint metadata) and
of the JSON files of model folders it reads: whatever is wrong with the file (unreadable, not
UTF-8, not JSON, NaN/Infinity, the wrong top-level type) is a UserError that names the file.
`dumps` is the one writer: non-finite floats become null, so what is written is always JSON.
"""
from __future__ import annotations

import json
import math
import re
from typing import Optional

from prunenet_jax.errors import UserError

# A JSON string, or one of the constants Python's json writes for non-finite floats.
_CONSTANT = re.compile(r'"(?:[^"\\]|\\.)*"|(-?Infinity|NaN)')
_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
               type(None): "null", int: "a number", float: "a number"}


class _NotJson(ValueError):
    """NaN or Infinity, which Python's json accepts and JSON does not."""


def _refuse_constant(name: str):
    raise _NotJson(name)


def read_json(path: str, *, fix: str, kind: Optional[type] = dict, constants: bool = False):
    """The value of the JSON file `path`. A file that cannot be read, is not UTF-8, is not JSON
    (or holds NaN/Infinity, unless `constants`: files of other tools that Python's json wrote),
    or whose top-level value is not a `kind` (None: any) is a UserError naming `path` and `fix`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}); check the path and "
                        "permissions") from None
    return loads(data, source=path, fix=fix, kind=kind, constants=constants)


def loads(data, *, source: str, fix: str, kind: Optional[type] = dict, constants: bool = False):
    """`data` (bytes or text) as JSON, checked as `read_json` checks a file; `source` names it."""
    value = _parse(source, data, fix, constants)
    if kind is not None and not isinstance(value, kind):
        raise UserError(f"{source} holds {_type_name(value)}, not {_type_name(kind())}; {fix}")
    return value


def _parse(source: str, data, fix: str, constants: bool):
    """loads' decoding and parsing."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as e:
        raise UserError(f"{source} cannot be read as JSON (not UTF-8 text: byte "
                        f"0x{data[e.start]:02x} at offset {e.start}); {fix}") from None
    try:
        return json.loads(text, **({} if constants else {"parse_constant": _refuse_constant}))
    except _NotJson as e:
        raise UserError(f"{source} cannot be read as JSON ({e} is not a JSON number, at "
                        f"{_where_constant(text)}); {fix}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{source} cannot be read as JSON ({e.msg} at line {e.lineno} column "
                        f"{e.colno}); {fix}") from None
    except (ValueError, RecursionError) as e:  # huge integers; nesting deeper than the stack
        reason = "nested too deep" if isinstance(e, RecursionError) else str(e).split(";")[0]
        raise UserError(f"{source} cannot be read as JSON ({reason}); {fix}") from None


def _where_constant(text: str) -> str:
    """Where the first NaN/Infinity outside a string is, as "line L column C" (the parser does
    not say)."""
    for m in _CONSTANT.finditer(text):
        if m.group(1):
            at = m.start(1)
            line, column = text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)
            return f"line {line} column {column}"
    return "an unknown place"


def _type_name(value) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def finite(value):
    """`value` with every non-finite float (NaN, Infinity), at any depth, made None (null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value, **kwargs) -> str:
    """`value` as strict JSON (json.dumps `kwargs`): non-finite floats become null, and
    allow_nan=False makes any that slip through an error rather than NaN in a file."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)
