"""A stacked (L, ...) array whose layers are read from the checkpoint only when sliced.

On multi-host runs, `sharding.place_stacked` asks each host only for the layers of its own
devices, so with a lazy stack a host reads just those layers' gate matrices from disk.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


class LazyLayerStack:
    def __init__(self, shape: tuple, dtype, read_layer: Callable[[int], np.ndarray]):
        self.shape, self.dtype, self._read = tuple(shape), np.dtype(dtype), read_layer

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if isinstance(first, (int, np.integer)):
            return np.asarray(self._read(int(first)), self.dtype)[rest]
        if not isinstance(first, slice):
            raise TypeError(f"a lazy layer stack is indexed by an int or a slice, not {first!r}")
        layers = [np.asarray(self._read(i), self.dtype) for i in range(*first.indices(self.shape[0]))]
        out = np.stack(layers) if layers else np.zeros((0,) + self.shape[1:], self.dtype)
        return out[(slice(None),) + tuple(rest)]

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:], dtype)


def layer_range(stack, start: int, stop: int) -> LazyLayerStack:
    """Layers [start, stop) of a stacked array or LazyLayerStack, read only when sliced."""
    shape = (stop - start,) + tuple(stack.shape[1:])
    return LazyLayerStack(shape, stack.dtype, lambda i: stack[start + i:start + i + 1][0])
