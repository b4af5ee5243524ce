"""Placing a model on a device mesh of axes ``data``, ``fsdp`` and ``tensor``: the logical-axis rules that map
the modules' axis names onto it, and sharded creation (every variable created directly in its place).

    mesh = jax.make_mesh((1, 4, 2), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    model = create_sharded(mesh, lambda: TransformerLM(config, rngs=nnx.Rngs(0)))
    with activate(mesh):
        logits = nnx.jit(lambda m, t: m(t))(model, tokens)
"""

from __future__ import annotations

import contextlib

import jax
from flax import nnx

from sparsek_jax.nn.attention import BATCH_AXIS, HEADS_AXIS

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


@contextlib.contextmanager
def activate(mesh):
    """The mesh and the logical axis rules, for tracing and running sharded steps."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_RULES):
        yield


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
