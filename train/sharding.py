"""The device mesh of a run (``train.mesh``) and the batches' sharding; the logical-axis rules and sharded
creation are the library's (``sparsek_jax.nn.sharding``)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sparsek_jax.nn.sharding import MESH_AXES
from sparsek_train.config import ConfigError, MeshConfig


def mesh_shape(config: MeshConfig, device_count: int) -> tuple[int, int, int]:
    """Axis sizes with the one ``-1`` axis taking the devices left over; the product must be the count."""
    sizes = [config.data, config.fsdp, config.tensor]
    if sizes.count(-1) > 1:
        raise ConfigError(f"train.mesh: at most one axis may be -1, received {dict(zip(MESH_AXES, sizes))}")
    for name, size in zip(MESH_AXES, sizes):
        if size == 0 or size < -1:
            raise ConfigError(f"train.mesh.{name}: expected a positive int or -1, received {size}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if device_count % known:
            raise ConfigError(f"train.mesh: {dict(zip(MESH_AXES, sizes))} does not divide {device_count} devices")
        sizes[sizes.index(-1)] = device_count // known
    if int(np.prod(sizes)) != device_count:
        raise ConfigError(f"train.mesh: expected axis sizes whose product is the {device_count} devices, "
                          f"received {dict(zip(MESH_AXES, sizes))}")
    return tuple(sizes)


def make_mesh(config: MeshConfig) -> jax.sharding.Mesh:
    # Auto axes: the NNX layers shard contracting dims, which Explicit axes reject.
    return jax.make_mesh(mesh_shape(config, jax.device_count()), MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh) -> NamedSharding:
    """Batches are split over the data and fsdp axes."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
