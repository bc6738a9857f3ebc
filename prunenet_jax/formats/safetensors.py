"""Reading safetensors files tensor by tensor through a memory map, and writing them.

Our own reader and writer (the format is an 8-byte header length, a JSON header, then raw
little-endian data) because they handle bf16 as `ml_dtypes.bfloat16` without torch and never hold
a whole file in memory; the reader also tells a truncated file apart from a valid one before any
tensor is read.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from prunenet_jax.run import atomic
from prunenet_jax.errors import UserError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """The tensors of one .safetensors file, each read on demand as a read-only memmap view."""

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
                header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise UserError(corrupt) from None
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}; check the path and permissions") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + n
        self._entries = header
        end = 0
        for name, entry in header.items():
            dtype = entry.get("dtype")
            if dtype not in DTYPES:
                raise UserError(f"{path}: tensor {name!r} has dtype {dtype!r}, which is not "
                                f"supported (supported: {', '.join(DTYPES)})")
            begin, stop = entry["data_offsets"]
            nbytes = int(np.prod(entry["shape"], dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
            if stop - begin != nbytes:
                raise UserError(f"{path}: tensor {name!r} header is inconsistent; {corrupt}")
            end = max(end, stop)
        if self._data_start + end > size:
            raise UserError(f"{path} is truncated ({size} bytes, its header needs "
                            f"{self._data_start + end}); re-download or re-save the checkpoint")

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


_NAMES = {np.dtype(t): name for name, t in DTYPES.items()}
_CHUNK_BYTES = 64 * 2**20  # tensors are cast and written in slices of about this size


def dtype_name(dtype) -> str:
    """The safetensors name ("F32", "BF16", ...) of a numpy dtype; UserError if it has none."""
    dt = np.dtype(dtype)
    if dt not in _NAMES:
        raise UserError(f"dtype {dt} cannot be stored in safetensors (supported: {', '.join(DTYPES)})")
    return _NAMES[dt]


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None,
                      dtype=None) -> int:
    """Writes `tensors` as a .safetensors file at `path`; returns the number of data bytes.

    `dtype` (optional) casts every tensor while writing, a slice at a time, so no second copy of
    the weights is ever held. Data is streamed to a temporary file in the same folder, fsynced and
    renamed, so `path` is either absent/old or complete. Tensors are laid out largest itemsize
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
