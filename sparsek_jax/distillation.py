"""Teaching a scorer what dense attention reads: dense causal attention and the scorer's distillation loss.

A SparseK layer's scorer ranks keys without seeing the query, and a key outside a query's top-k gets no
gradient from it, so a scorer that starts by preferring recent keys may never try the far ones a task needs.
Trained against dense attention first (as DeepSeek's sparse attention trains its indexer before switching to
sparse), it learns which keys the queries actually read: for query ``i`` the target is the attention its
heads pay to each candidate ``j <= i - window`` (averaged over the KV head's query heads, renormalised over
the candidates), the student is ``softmax(u)`` over the same candidates, and the loss is the cross-entropy,
weighted by how much attention the query pays beyond its window.

O(seq^2): meant for warm-up steps and retrofits at moderate lengths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsek_jax.softmax import masked_softmax

__all__ = ["dense_teacher_attention"]


def dense_teacher_attention(q: jax.Array, k: jax.Array, v: jax.Array, scores: jax.Array, *, window: int,
                            segment_ids: jax.Array | None = None, scale: float | None = None):
    """Dense causal attention and the distillation loss of ``scores`` against it.

    Args:
      q: ``[batch, seq, q_heads, head_dim]``; k, v: ``[batch, seq, kv_heads, head_dim]`` (GQA).
      scores: ``[batch, seq, kv_heads]`` key scores ``u``; the loss's gradient reaches only them (the
        attention is the fixed target).
      window: the SparseK window: keys ``j <= i - window`` are query ``i``'s candidates.
      segment_ids: optional int ``[batch, seq]``; nothing crosses documents.
      scale: logit scale, default ``1 / sqrt(head_dim)``.

    Returns:
      ``(out, loss)``: ``out`` ``[batch, seq, q_heads, head_dim]`` in ``q``'s dtype (plain causal attention);
      ``loss`` a float32 scalar: ``-sum_i sum_j a_ij log softmax_{C_i}(u)_j / sum_i sum_j a_ij`` over the
      candidates ``C_i``, with ``a_ij`` the attention (averaged over a KV head's query heads) that query ``i``
      pays to candidate ``j``; 0 when no query attends beyond its window.
    """
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    scale = 1.0 / float(head_dim) ** 0.5 if scale is None else scale
    i = jnp.arange(seq)[:, None]
    j = jnp.arange(seq)[None, :]
    same = (jnp.ones((batch, seq, seq), bool) if segment_ids is None
            else segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [b, 1, i, j]
    allowed = same & (j <= i)
    qg = q.astype(jnp.float32).reshape(batch, seq, kv_heads, group, head_dim)
    logits = jnp.einsum("bihgd,bjhd->bhgij", qg, k.astype(jnp.float32)) * scale
    probs, _ = masked_softmax(logits, allowed[:, :, None])
    out = jnp.einsum("bhgij,bjhd->bihgd", probs, v.astype(jnp.float32)).reshape(q.shape).astype(q.dtype)

    candidate = same & (j <= i - window)  # [b, 1, i, j]
    target = jnp.where(candidate, jax.lax.stop_gradient(jnp.mean(probs, axis=2)), 0.0)  # [b, h, i, j]
    u = jnp.moveaxis(scores.astype(jnp.float32), 2, 1)[:, :, None, :]  # [b, h, 1, j]
    u = jnp.broadcast_to(u, target.shape)
    _, lse = masked_softmax(u, jnp.broadcast_to(candidate, target.shape))
    cross = -jnp.sum(jnp.where(candidate, target * (u - lse[..., None]), 0.0))
    loss = cross / jnp.maximum(jnp.sum(target), 1e-9)
    return out, loss
