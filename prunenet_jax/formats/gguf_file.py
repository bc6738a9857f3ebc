"""The GGUF file itself (llama.cpp's format): opening and checking it, typed metadata, and
dequantising a tensor to a host numpy array in Hugging Face's layout.

Layout note: ggml lists a tensor's dimensions fastest-first (`[in, out]` for a matrix); the reader
hands out numpy arrays in the reversed order, which is Hugging Face's `[out, in]`.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from prunenet_jax.errors import UserError


def open_gguf(path: str):
    """A `gguf.GGUFReader` on `path` (memory-mapped); every failure becomes a UserError.

    Parsing the header of a large file takes seconds, and a launcher reads the config before the
    weights: the last reader is kept for the same file version."""
    _check_file(path)
    stat = os.stat(path)
    return _open_reader(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _open_reader(path: str, size: int, mtime_ns: int):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e}); check the file") from None
    except Exception as e:  # the reader fails with ValueError/IndexError/KeyError... on bad bytes
        size = os.path.getsize(path)
        raise UserError(f"{path} is truncated or not a valid GGUF file ({size:,} bytes; reading it "
                        f"failed with {type(e).__name__}: {e}); re-download or re-convert it") from None


def _check_file(path: str) -> None:
    """Missing file, folder, unreadable file or wrong magic bytes -> UserError."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file; check the path of the .gguf file")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; pass the .gguf file itself")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}); check its permissions") from None
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); "
                        "pass a .gguf file written by llama.cpp, or re-download it")


# A quantised tensor whose float32 copy is larger than this is dequantised in blocks of rows
# into its output: the gguf package's dequantisers hold two or three float temporaries of their
# whole input (Gemma 3's 262144 x 640 Q8_0 embedding: 2 GB for a 671 MB result).
_BLOCK_BYTES = 64 << 20


def dequantize(t, path: str) -> np.ndarray:
    """One tensor as float32 numpy in HF layout (numpy shape = reversed ggml dims)."""
    from gguf import quants

    try:
        arr = _dequantize_rows(t, quants)
    except NotImplementedError:
        raise UserError(f"{path}: tensor {t.name!r} is stored as {t.tensor_type.name}, which the "
                        "installed gguf package cannot dequantise; use a file quantised as F32, F16, "
                        "BF16, Q8_0, Q4_0, Q4_1 (or another type gguf.quants supports)") from None
    except ValueError as e:
        raise UserError(f"{path}: tensor {t.name!r} ({t.tensor_type.name}, shape "
                        f"{t.shape.tolist()}) is malformed ({e}); the file is corrupt or was "
                        "converted wrongly; re-download or re-convert it") from None
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if arr.shape != shape:
        arr = arr.reshape(shape)
    return arr.astype(np.float32, copy=False)


def _dequantize_rows(t, quants) -> np.ndarray:
    """quants.dequantize of the tensor's data, a block of rows at a time when it is large (the
    data of a quantised tensor is (rows..., bytes per row), each row a whole number of blocks)."""
    from gguf import GGMLQuantizationType

    data = t.data
    row_values = int(t.shape[0]) if len(t.shape) else 1  # ggml's first dim: values per row
    quantised = t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16)
    if not quantised or data.ndim < 2 or data.size // data.shape[-1] * row_values * 4 <= _BLOCK_BYTES:
        return quants.dequantize(data, t.tensor_type)
    rows = data.reshape(-1, data.shape[-1])
    out = np.empty((rows.shape[0], row_values), np.float32)
    step = max(1, _BLOCK_BYTES // (4 * row_values))
    for start in range(0, rows.shape[0], step):
        block = quants.dequantize(rows[start:start + step], t.tensor_type)
        out[start:start + step] = block.reshape(-1, row_values)
    return out.reshape(data.shape[:-1] + (row_values,))


class Metadata:
    """Typed access to GGUF metadata; a missing or malformed key is a UserError naming the file."""

    REQUIRED = object()

    def __init__(self, reader, path):
        self.reader, self.path = reader, path

    def get(self, key: str, default: Any = REQUIRED) -> Any:
        from gguf import GGUFValueType

        field = self.reader.fields.get(key)
        if field is None:
            if default is self.REQUIRED:
                raise UserError(f"{self.path}: GGUF metadata key {key!r} is missing; the file is "
                                "incomplete or not a llama.cpp model; re-convert it with llama.cpp")
            return default
        try:
            value = field.contents()
        except Exception as e:
            raise UserError(f"{self.path}: GGUF metadata key {key!r} is unreadable ({e}); the file "
                            "is corrupt; re-download it") from None
        if field.types and field.types[-1] == GGUFValueType.FLOAT32:
            # float32 in the file; its shortest decimal is the value the model's config stated
            value = ([float(str(np.float32(v))) for v in value] if isinstance(value, list)
                     else float(str(np.float32(value))))
        return value

    def int(self, key: str, default: Any = REQUIRED) -> Any:
        value = self.get(key, default)
        if value is None or value is default:
            return value
        if isinstance(value, list):  # some converters write per-layer lists
            if not value or any(v != value[0] for v in value):
                raise UserError(f"{self.path}: GGUF metadata {key!r} differs between layers "
                                f"({value[:8]}...); per-layer sizes are not supported")
            value = value[0]
        try:
            return int(value)
        except (TypeError, ValueError):
            raise UserError(f"{self.path}: GGUF metadata {key!r} = {value!r} is not an integer; "
                            "the file is corrupt; re-download it") from None
