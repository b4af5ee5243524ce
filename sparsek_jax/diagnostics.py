"""Where a given key stands for a query: in its window, selected with gate 1, selected with a fractional gate,
or not attended. Tells why a model does or does not retrieve a token it needs (``sparsek-eval``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsek_jax.thresholds import is_selected, prefix_thresholds

__all__ = ["KEY_STATUS", "key_status"]

KEY_STATUS = ("window", "gate_one", "fractional", "not_attended")


def key_status(scores: jax.Array, sources: jax.Array, *, topk: int, window: int,
               segment_ids: jax.Array | None = None, buffer_size: int | None = None) -> jax.Array:
    """For every query ``i`` and one key ``sources[b, i]`` of it, an index into ``KEY_STATUS``.

    Args:
      scores: ``[batch, seq, kv_heads]`` key scores of a SparseK layer.
      sources: int ``[batch, seq]``: the key position asked about for each query (``0 <= source <= i``), or
        -1 for queries not asked about.
      topk, window, segment_ids, buffer_size: as in ``sparsek_attention``.

    Returns:
      int32 ``[batch, seq, kv_heads]``: 0 the key is in the query's window, 1 selected with gate 1,
      2 selected with a gate in (0, 1), 3 not attended (not selected, gate 0, or in another document);
      -1 where ``sources`` is -1.
    """
    tau, theta, info = prefix_thresholds(scores, topk=topk, window=window, segment_ids=segment_ids,
                                         buffer_size=buffer_size, return_info=True)
    seq = scores.shape[1]
    asked = sources >= 0
    j = jnp.clip(sources, 0, seq - 1)
    i = jnp.arange(seq, dtype=jnp.int32)[None, :]
    u_j = jnp.take_along_axis(scores.astype(jnp.float32), j[:, :, None], axis=1)
    same = jnp.ones_like(asked) if segment_ids is None else (
        jnp.take_along_axis(segment_ids, j, axis=1) == segment_ids)
    in_window = same & (j <= i) & (j > i - window)
    selected = (same & (j <= i - window))[:, :, None] & is_selected(u_j, j[:, :, None], theta, info.theta_pos)
    gap = u_j - tau
    status = jnp.where(in_window[:, :, None], 0,
                       jnp.where(selected & (gap >= 1.0), 1, jnp.where(selected & (gap > 0.0), 2, 3)))
    return jnp.where(asked[:, :, None], status, -1).astype(jnp.int32)
