"""Reading safetensors files tensor by tensor through a memory map, and writing them.

Our own reader and writer (the format is an 8-byte header length, a JSON header, then raw
little-endian data) because they handle bf16 as `ml_dtypes.bfloat16` without torch and never hold
a whole file in memory; the reader also tells a truncated file apart from a valid one before any
tensor is read.
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Callable

import ml_dtypes
import numpy as np

from prunenet_jax.files import atomic
from prunenet_jax.errors import UserError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """The tensors of one .safetensors file, each read on demand as a read-only memmap view.

    The header is checked by schema before any tensor is read: a JSON object whose entries are
    objects with a known `dtype`, a `shape` of non-negative ints and `data_offsets` of two
    non-negative ints whose span is the tensor's size, inside the file and not overlapping
    another's; `__metadata__` is an object of strings. So no read ever leaves the file."""

    def __init__(self, path: str):
        self.path = path
        corrupt = (f"{path} is truncated or not a safetensors file; re-download or re-save the "
                   "checkpoint")
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise UserError(corrupt)
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, _MAX_HEADER):
                    raise UserError(corrupt)
                header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise UserError(corrupt) from None
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}; check the path and permissions") from None
        if not isinstance(header, dict):
            raise UserError(f"{path}: the header is a JSON {type(header).__name__}, not an object; "
                            f"{corrupt}")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(
                isinstance(v, str) for v in self.metadata.values()):
            raise UserError(f"{path}: '__metadata__' is not an object of strings; {corrupt}")
        self._data_start = 8 + n
        self._entries = {name: _check_entry(path, name, entry, size - self._data_start)
                         for name, entry in header.items()}
        spans = sorted(e["data_offsets"] for e in self._entries.values() if e["nbytes"])
        for (_, stop), (begin, _) in zip(spans, spans[1:]):
            if begin < stop:
                raise UserError(f"{path}: two tensors share the bytes at offset {begin}; {corrupt}")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple:
        return tuple(self._entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        begin, stop = entry["data_offsets"]
        dtype = np.dtype(DTYPES[entry["dtype"]]).newbyteorder("<")
        if stop == begin:
            return np.zeros(entry["shape"], dtype)
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start + begin,
                        shape=(stop - begin,))
        return raw.view(dtype).reshape(entry["shape"])


def _no_duplicates(pairs: list) -> dict:
    """A JSON object with a key given twice is ambiguous (which tensor is meant?): refused."""
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_entry(path: str, name: str, entry, data_bytes: int) -> dict:
    """One header entry checked by schema (see SafetensorsFile); returns it with its size."""
    def bad(problem: str):
        raise UserError(f"{path}: tensor {name!r} {problem}; the header is corrupt: re-download "
                        "or re-save the checkpoint")

    if not isinstance(entry, dict):
        bad(f"is described by a JSON {type(entry).__name__}, not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise UserError(f"{path}: tensor {name!r} has dtype {dtype!r}, which is not supported "
                        f"(supported: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        bad(f"has shape {shape!r}, not a list of non-negative integers")
    if len(shape) > 32 or math.prod(max(d, 1) for d in shape) > 2**60:  # numpy's limits
        bad(f"has shape {shape!r}, beyond any array")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        bad(f"has data_offsets {offsets!r}, not two non-negative integers")
    begin, stop = offsets
    nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
    if stop - begin != nbytes:
        bad(f"has data_offsets {offsets} ({stop - begin} bytes) but its shape {shape} and dtype "
            f"{dtype} need {nbytes} bytes")
    if stop > data_bytes:
        raise UserError(f"{path} is truncated (tensor {name!r} ends at data byte {stop}, the file "
                        f"holds {data_bytes}); re-download or re-save the checkpoint")
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets, "nbytes": nbytes}


_NAMES = {np.dtype(t): name for name, t in DTYPES.items()}
_CHUNK_BYTES = 64 * 2**20  # tensors are cast and written in slices of about this size


def dtype_name(dtype) -> str:
    """The safetensors name ("F32", "BF16", ...) of a numpy dtype; UserError if it has none."""
    dt = np.dtype(dtype)
    if dt not in _NAMES:
        raise UserError(f"dtype {dt} cannot be stored in safetensors (supported: {', '.join(DTYPES)})")
    return _NAMES[dt]


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None,
                      dtype=None, written: Callable[[int], None] = lambda nbytes: None) -> int:
    """Writes `tensors` as a .safetensors file at `path`; returns the number of data bytes.

    `dtype` (optional) casts every tensor while writing, a slice at a time, so no second copy of
    the weights is ever held. Data is streamed to a temporary file in the same folder, fsynced and
    renamed, so `path` is either absent/old or complete; `written(nbytes)` follows each tensor
    (a progress bar). Tensors are laid out largest itemsize
    first, then by name (as the safetensors library does): every tensor stays aligned to its
    itemsize, and the same input always gives the same bytes.
    """
    dtypes = {n: np.dtype(dtype if dtype is not None else t.dtype) for n, t in tensors.items()}
    order = sorted(tensors, key=lambda n: (-dtypes[n].itemsize, n))
    header, offset = {}, 0
    for name in order:
        nbytes = int(np.prod(tensors[name].shape, dtype=np.int64)) * dtypes[name].itemsize
        header[name] = {"dtype": dtype_name(dtypes[name]), "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned

    def write(f):
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name in order:
            _write_tensor(f, tensors[name], dtypes[name])
            written(header[name]["data_offsets"][1] - header[name]["data_offsets"][0])

    atomic.atomic_write(path, write)
    return offset


def _write_tensor(f, array: np.ndarray, dtype: np.dtype) -> None:
    """Streams `array` as C-order little-endian `dtype` bytes, cast a slice of rows at a time."""
    flat = np.asarray(array).reshape(-1) if np.ndim(array) < 2 else np.asarray(array)
    row_bytes = max(1, int(np.prod(flat.shape[1:], dtype=np.int64)) * dtype.itemsize)
    step = max(1, _CHUNK_BYTES // row_bytes)
    for start in range(0, flat.shape[0], step):
        chunk = np.ascontiguousarray(flat[start:start + step], dtype=dtype.newbyteorder("<"))
        f.write(chunk.reshape(-1).view(np.uint8).data)
