"""The one in-memory form of a model's weights, whatever file it came from.

Per-layer tensors are stacked on a leading layer axis L (gate/up `(L, I, H)`, down `(L, H, I)`,
HF layout `[out, in]`), so the method handles all layers in one call and can shard the L axis
over devices. Arrays are host numpy arrays in the dtype they were loaded in.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import ml_dtypes
import numpy as np

from prunenet_jax.errors import UserError
from prunenet_jax.models import registry
from prunenet_jax.models.config import ModelConfig

# The floating dtypes weights are computed in and exported as, by the name config.json and
# --dtype use (numpy dtypes; JAX takes them as they are).
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}


def dtype_by_name(name: str, flag: str = "--dtype") -> np.dtype:
    if name not in DTYPES:
        raise UserError(f"{flag}={name} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_shape(source: str, name: str, found: tuple, expected: tuple, implied_by: str,
                fix: str) -> None:
    """The one shape-vs-config check of every loader: a tensor whose shape disagrees with what
    the config (or file metadata) implies is a UserError naming both."""
    if tuple(found) != tuple(expected):
        raise UserError(f"{source}: tensor {name!r} has shape {tuple(found)} but {implied_by} "
                        f"implies {tuple(expected)}; {fix}")


@dataclasses.dataclass
class ModelWeights:
    config: ModelConfig
    hf_config: dict[str, Any]  # the source `config.json` (built from metadata for GGUF)
    globals: dict[str, np.ndarray]  # registry.EMBED, FINAL_NORM, and LM_HEAD unless tied
    layers: dict[str, np.ndarray]  # registry layer suffix -> stacked (L, ...) array
    source: str  # what the user named: a folder, a hub id, a .gguf path or "default"
    tokenizer_dir: Optional[str] = None  # folder with tokenizer files, for HF sources
    gguf_file: Optional[str] = None  # the .gguf file, for GGUF sources (tokenizer built from it)

    def layer(self, i: int) -> dict[str, np.ndarray]:
        """Layer i's tensors (views, no copy)."""
        return {name: arr[i] for name, arr in self.layers.items()}

    def named_arrays(self):
        """(full HF name, array) for every tensor, per-layer ones as views into the stacks."""
        yield from self.globals.items()
        for name, stacked in self.layers.items():
            for i in range(stacked.shape[0]):
                yield registry.LAYER_PREFIX.format(i) + name, stacked[i]

    def num_params(self) -> int:
        return sum(int(a.size) for a in self.globals.values()) + sum(
            int(a.size) for a in self.layers.values())

    def check_shapes(self) -> None:
        """Raises UserError when a tensor is missing or its shape disagrees with the config."""
        expected = registry.expected_shapes(self.config)
        found = {**self.globals, **self.layers}
        for name, shape in expected.items():
            if name not in found:
                raise UserError(f"{self.source}: tensor {name!r} is missing; the checkpoint is "
                                "incomplete or its config.json describes another model")
            check_shape(self.source, name, found[name].shape, shape, "the config",
                        "fix config.json or use matching weights")

    def check_finite(self) -> None:
        """Raises UserError naming the first tensor with a NaN or Inf (a corrupt checkpoint would
        otherwise train a policy on garbage and export it)."""
        for name, array in self.named_arrays():
            if not np.isfinite(array).all():
                bad = int(np.size(array) - np.isfinite(array).sum())
                raise UserError(f"{self.source}: tensor {name!r} has {bad} NaN or Inf values; the "
                                "checkpoint is corrupt: re-download or re-convert it")

    def astype(self, dtype) -> "ModelWeights":
        cast = lambda d: {k: v.astype(dtype, copy=False) for k, v in d.items()}
        return dataclasses.replace(self, globals=cast(self.globals), layers=cast(self.layers))
