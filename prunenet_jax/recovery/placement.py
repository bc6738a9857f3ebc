"""Where recovery's arrays live: the 1-D data-parallel mesh (batches split along it), and the
parameters, optimiser state and teacher either replicated over it or, with `--shard_params`,
split FSDP-style (each array along its largest axis the mesh size divides; XLA gathers them for
the forward pass and reduce-scatters the gradients)."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prunenet_jax.errors import UserError
from prunenet_jax.method import sharding

DATA_AXIS = "data"
SHARD_PARAMS = ("auto", "on", "off")


def data_mesh(devices: Optional[int] = None) -> Optional[Mesh]:
    """The 1-D data-parallel mesh over `devices` (default all); None for one device."""
    n = devices or jax.device_count()
    return None if n == 1 else sharding.make_mesh(n, axis=DATA_AXIS)


def check_data_devices(devices: int) -> None:
    """Refuses --data_devices beyond the devices present (0: all)."""
    if not 0 <= devices <= jax.device_count():
        raise UserError(f"--data_devices={devices} asks for more devices than the "
                        f"{jax.device_count()} present; use 1 to {jax.device_count()} (0: all)")


def fsdp_sharding(mesh: Mesh, shape: tuple) -> NamedSharding:
    """Split `shape` along its largest axis the mesh size divides; replicate what none fits."""
    n = mesh.devices.size
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] >= n and shape[axis] % n == 0:
            return NamedSharding(mesh, P(*[DATA_AXIS if a == axis else None
                                          for a in range(len(shape))]))
    return NamedSharding(mesh, P())


def tree_bytes(*trees) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for t in trees for x in jax.tree.leaves(t))


def should_shard(mode: str, mesh: Optional[Mesh], params, frozen, teacher) -> bool:
    """`--shard_params`: on, off, or auto: shard when the replicated training state (parameters,
    their gradient and two AdamW moments in fp32, the frozen weights and the teacher) would not
    fit the device budget (sharding.device_budget_bytes: 70% of one device's memory; never on CPU,
    which reports no limit)."""
    if mode not in SHARD_PARAMS:
        raise UserError(f"--shard_params={mode} is unknown; use one of {', '.join(SHARD_PARAMS)}")
    if mesh is None or mode == "off":
        return False
    if mode == "on":
        return True
    budget = sharding.device_budget_bytes()
    need = 4 * tree_bytes(params) + tree_bytes(frozen, teacher)
    return bool(budget) and need > budget


def place(tree, mesh: Optional[Mesh], sharded: bool):
    """Onto the mesh: replicated, or split FSDP-style when `sharded` (no mesh: the device)."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, tree)
    rule = ((lambda a: fsdp_sharding(mesh, np.shape(a))) if sharded
            else (lambda a: NamedSharding(mesh, P())))
    return jax.tree.map(lambda a: jax.device_put(a, rule(a)), tree)


def place_batch(arrays: tuple, mesh: Optional[Mesh]) -> tuple:
    """(grad_accum, batch, ...) host arrays on the devices, the batch axis split over the mesh."""
    if mesh is None:
        return tuple(jnp.asarray(a) for a in arrays)
    batch_sharding = NamedSharding(mesh, P(None, DATA_AXIS))
    return tuple(jax.device_put(a, batch_sharding) for a in arrays)
