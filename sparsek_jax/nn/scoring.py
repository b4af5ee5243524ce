"""The scoring network: one importance score per key and KV head, independent of the query."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsek_jax.nn.params import param


def is_scorer_parameter(path) -> bool:
    """Whether a parameter belongs to a scoring network (every layer keeps its scorer under ``scorer``), by
    its path: components (``("blocks", 0, "attention", "scorer", "w_score")``) or one ``/``-joined string."""
    parts = path.split("/") if isinstance(path, str) else [str(p) for p in path]
    return "scorer" in parts


class ScoringNetwork(nnx.Module):
    """``u_j = x_j · w_score + ε j``.

    With ``init_std = 0`` ``w_score`` starts at zero, so selection starts as "the most recent keys before the
    window"; a positive ``init_std`` draws it from a normal distribution, so keys start with scores that
    depend on their content and far keys get selected (and trained) from the first step. The position slope
    ``ε`` lets newer tokens win without the network predicting ever larger numbers. Scores are float32
    whatever the compute dtype: thresholds are computed on them.
    """

    def __init__(self, d_model: int, num_kv_heads: int, *, position_slope: float, param_dtype, rngs: nnx.Rngs,
                 init_std: float = 0.0):
        self.position_slope = position_slope
        init = nnx.initializers.normal(init_std) if init_std else nnx.initializers.zeros_init()
        self.w_score = param(rngs, init, (d_model, num_kv_heads), ("embed", "kv_heads"), param_dtype)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x ``[batch, seq, d_model]``, positions ``[batch, seq]`` -> scores float32 ``[batch, seq, kv_heads]``."""
        u = jnp.einsum("bsm,mh->bsh", x.astype(jnp.float32), self.w_score[...].astype(jnp.float32))
        return u + self.position_slope * positions.astype(jnp.float32)[..., None]
