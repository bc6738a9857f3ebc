"""Device mesh and layer-axis sharding for the stacked (L, ...) arrays of the method; the 1-D mesh
builder and the device-memory budget that recovery uses too.

The method's only parallel axis is the layer axis L: gate matrices (L, I, H), reference spectra
(L, m), actions (L, k) are split over a 1-D mesh axis named `LAYER_AXIS`; the policy and its
optimiser state are replicated. `NamedSharding` needs L divisible by the number of devices, so L is
padded up (zeros) to a multiple of it; the training code masks padded layers out (their reward and
loss are zero, and no optimiser step is taken for them), and results are cut back with `unpad`.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

LAYER_AXIS = "layers"


def make_mesh(num_devices: Optional[int] = None,
              devices: Optional[Sequence[jax.Device]] = None, axis: str = LAYER_AXIS) -> Mesh:
    """A 1-D mesh over `num_devices` devices (default: all), its one axis named `axis` (the
    method's layer axis; recovery's data axis).

    Axis type Auto: outside `shard_map`, jit propagates shardings as usual (GSPMD).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices) if num_devices is None else int(num_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"asked for a mesh of {n} devices but {len(devices)} are available")
    return jax.make_mesh((n,), (axis,), axis_types=(AxisType.Auto,), devices=devices[:n])


def device_budget_bytes(fraction: float = 0.7) -> Optional[int]:
    """`fraction` of one device's memory, in bytes: what a run plans to fill (streaming the gate
    stack, sharding or caching in recovery); None where the backend reports no limit (CPU)."""
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    return None if limit is None else int(fraction * limit)


def mesh_size(mesh: Optional[Mesh]) -> int:
    return 1 if mesh is None else int(mesh.shape[LAYER_AXIS])


def layer_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (layer) axis split over the mesh, other axes whole."""
    return NamedSharding(mesh, P(LAYER_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def padded_num_layers(num_layers: int, mesh_or_devices) -> int:
    """The smallest multiple of the device count that is >= num_layers."""
    n = mesh_or_devices if isinstance(mesh_or_devices, int) else mesh_size(mesh_or_devices)
    return -(-int(num_layers) // n) * n


def pad_layers(x: np.ndarray, num_padded: int) -> np.ndarray:
    """Host array (L, ...) -> (num_padded, ...), zero rows appended (a copy only when padding)."""
    L = x.shape[0]
    if num_padded < L:
        raise ValueError(f"cannot pad {L} layers down to {num_padded}")
    if num_padded == L:
        return x
    return np.concatenate([x, np.zeros((num_padded - L,) + x.shape[1:], x.dtype)])


def valid_mask(num_layers: int, num_padded: int) -> np.ndarray:
    """(num_padded,) bool, True for real layers."""
    return np.arange(num_padded) < num_layers


def unpad(x, num_layers: int):
    """Drops padded layers from a stacked array (or every leaf of a pytree) with leading axis L."""
    return jax.tree.map(lambda a: a[:num_layers], x)


def place_stacked(array: np.ndarray, mesh: Mesh, num_padded: Optional[int] = None,
                  dtype=None) -> jax.Array:
    """Puts a host (L, ...) array on the mesh, split along L, padded with zero layers to
    `num_padded` (default: the next multiple of the mesh size), in `dtype` (default: its own).

    Streamed one layer at a time: each device's block is allocated on the device and its layers
    are read (`array[l:l + 1]`, so a `LazyLayerStack` reads just that layer), converted and copied
    in one by one. Host memory holds one layer, never the stack nor the padding; each device
    receives only its own layers, and on multi-host setups each host reads only its own devices'
    layers from its own copy of `array`.
    """
    dtype = np.dtype(array.dtype if dtype is None else dtype)
    L = array.shape[0]
    Lp = padded_num_layers(L, mesh) if num_padded is None else int(num_padded)
    if Lp < L or Lp % mesh_size(mesh):
        raise ValueError(f"num_padded={Lp} must be >= {L} and a multiple of the mesh size "
                         f"{mesh_size(mesh)}")
    shape = (Lp,) + tuple(array.shape[1:])
    target = layer_sharding(mesh)
    blocks = []
    for device, index in target.addressable_devices_indices_map(shape).items():
        start, stop, _ = index[0].indices(Lp)
        block = _zeros((stop - start,) + shape[1:], dtype, device)
        for l in range(start, min(stop, L)):
            layer = jax.device_put(np.asarray(array[l:l + 1], dtype), device)
            block = _set_layers(block, layer, l - start)
        blocks.append(block)
    return jax.make_array_from_single_device_arrays(shape, target, blocks)


def _zeros(shape: tuple, dtype, device: jax.Device) -> jax.Array:
    """Zeros allocated on `device` itself (no host buffer of that size)."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=SingleDeviceSharding(device))()


@functools.partial(jax.jit, donate_argnums=0)
def _set_layers(block: jax.Array, layers: jax.Array, start) -> jax.Array:
    """block[start:start + n] = layers, in place (the block's buffer is donated)."""
    return lax.dynamic_update_slice_in_dim(block, layers, start, axis=0)


def replicate(tree, mesh: Mesh):
    """Puts every leaf of a pytree on all devices of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def to_host(x) -> np.ndarray:
    """A (possibly multi-host) jax.Array as a whole host numpy array, on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def device_dtype(dtype) -> np.dtype:
    """The dtype gate matrices are kept in on the device: their own when fp32, bf16 or fp16
    (spectra and logits are accumulated in fp32 anyway), else fp32."""
    dtype = np.dtype(dtype)
    return dtype if dtype.name in ("float32", "bfloat16", "float16") else np.dtype(np.float32)
