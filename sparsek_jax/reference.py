"""The dense reference SparseK attention: the O(seq^2) pattern, one masked softmax. The oracle every fast path
is tested against (``implementation="reference"``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparsek_jax.pattern import attention_pattern
from sparsek_jax.softmax import masked_softmax
from sparsek_kernels.common import TINY


@functools.partial(jax.jit, static_argnames=("topk", "window", "gate", "scale"))
def reference_attention(q, k, v, scores, segment_ids, *, topk, window, gate, scale):
    """Arguments as in ``sparsek_attention`` (validated). Differentiable with plain autodiff."""
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    pattern = attention_pattern(scores, topk=topk, window=window, segment_ids=segment_ids)
    allowed = (pattern.window | pattern.selected)[:, :, None]  # [batch, kv_heads, 1, seq_q, seq_k]
    gates = pattern.gates[:, :, None]
    if gate == "none":
        gates = jax.lax.stop_gradient(gates)

    qg = q.astype(jnp.float32).reshape(batch, seq, kv_heads, group, head_dim)
    logits = jnp.einsum("bihgd,bjhd->bhgij", qg, k.astype(jnp.float32)) * scale
    if gate == "logit":
        logits = logits + jnp.log(jnp.maximum(gates, TINY))
    probs, _ = masked_softmax(logits, allowed)
    if gate == "value":
        probs = probs * gates
    out = jnp.einsum("bhgij,bjhd->bihgd", probs, v.astype(jnp.float32))
    return out.reshape(batch, seq, q_heads, head_dim).astype(q.dtype)
