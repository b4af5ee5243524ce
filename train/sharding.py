"""The device mesh, logical-axis rules, and sharded creation of the model and optimizer."""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sparsek_jax.nn.attention import BATCH_AXIS, HEADS_AXIS
from sparsek_train.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axes -> mesh axes. Embedding dims are sharded FSDP-style; heads and the MLP's hidden dim along the
# tensor axis; the batch along data and fsdp. The activation names tell the SparseK layers which mesh axes
# their inputs are split over, so that the kernels run per shard.
LOGICAL_RULES = (
    (BATCH_AXIS, ("data", "fsdp")),
    (HEADS_AXIS, "tensor"),
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
)


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


@contextlib.contextmanager
def activate(mesh):
    """The mesh and the logical axis rules, for tracing and running sharded steps."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_RULES):
        yield


def batch_sharding(mesh) -> NamedSharding:
    """Batches are split over the data and fsdp axes."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def create_sharded(mesh, build, *inputs):
    """Runs ``build(*inputs)`` (returning NNX objects, e.g. ``(model, optimizer)``; ``inputs`` may be NNX
    objects too, e.g. the model an optimizer is built for) under ``jit`` so that every variable is created
    directly with the sharding its logical axes map to."""
    with activate(mesh):
        @nnx.jit
        def create(*inputs):
            objects = build(*inputs)
            state = nnx.state(objects)
            nnx.update(objects, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
            return objects

        return create(*inputs)
