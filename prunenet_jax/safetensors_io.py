"""Reading safetensors files tensor by tensor through a memory map.

Our own reader (the format is an 8-byte header length, a JSON header, then raw little-endian data)
because it gives bf16 as `ml_dtypes.bfloat16` without torch, never copies a whole file, and lets us
tell a truncated file apart from a valid one before any tensor is read.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

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
