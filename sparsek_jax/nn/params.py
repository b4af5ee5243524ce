"""Parameter creation with logical axis names on every parameter."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype) -> nnx.Param:
    """An ``nnx.Param`` of ``dtype`` (a dtype or its name) initialised by ``init`` and annotated with logical
    axis names.

    Sharding is not applied at creation (``eager_sharding=False``): the training app maps the logical names
    to mesh axes with ``nnx.logical_axis_rules`` and shards through ``jit``, so the modules work unchanged
    with no mesh, on one device, or on many.
    """
    if len(axes) != len(shape):
        raise ValueError(f"axes: expected {len(shape)} logical names for shape {shape}, received {axes}")
    return nnx.Param(init(rngs.params(), shape, jnp.dtype(dtype)), out_sharding=axes, eager_sharding=False)
