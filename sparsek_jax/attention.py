"""SparseK attention: one softmax over each query's sliding window and its top-k gated candidates.

``sparsek_attention`` is the public entry point; ``implementation=`` picks the path, in the manner of
``jax.nn.dot_product_attention``. The ``"reference"`` path below builds the dense pattern (O(seq^2)) and is
the oracle every other path is tested against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparsek_jax import validation
from sparsek_jax.pattern import attention_pattern
from sparsek_jax.xla_attention import DEFAULT_BLOCK_SIZE, xla_sparsek_attention

__all__ = ["sparsek_attention"]


@functools.partial(jax.jit, static_argnames=("topk", "window", "gate", "scale"))
def _reference_attention(q, k, v, scores, segment_ids, *, topk, window, gate, scale):
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
        # Selected gates are > 0 (the top-k lie inside the SPARSEK support); the floor only guards log(0).
        logits = logits + jnp.log(jnp.maximum(gates, jnp.finfo(jnp.float32).tiny))
    logits = jnp.where(allowed, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(allowed, jnp.exp(logits - row_max), 0.0)
    denominator = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denominator > 0, denominator, 1.0)  # a query with no keys outputs 0
    if gate == "value":
        probs = probs * gates
    out = jnp.einsum("bhgij,bjhd->bihgd", probs, v.astype(jnp.float32))
    return out.reshape(batch, seq, q_heads, head_dim).astype(q.dtype)


def _resolve_implementation(implementation: str) -> str:
    """``"auto"``: the kernels of the default backend (``pallas_gpu``, ``pallas_tpu``), else ``xla``."""
    if implementation != "auto":
        return implementation
    return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend(), "xla")


def sparsek_attention(q: jax.Array, k: jax.Array, v: jax.Array, scores: jax.Array, *, topk: int,
                      window: int, gate: str = "value", segment_ids: jax.Array | None = None,
                      scale: float | None = None, implementation: str = "reference",
                      block_size: int | None = None, buffer_size: int | None = None,
                      interpret: bool = False) -> jax.Array:
    """Causal SparseK attention with a sliding window.

    Query ``i`` attends with one softmax to its window ``W_i = {j : i - window < j <= i}`` (gate 1) and to
    ``S_i``, the ``topk`` highest-scoring keys among the older candidates ``C_i = {j : j <= i - window}``
    (ties: newer key first), each gated by ``m_ij = clip(u_j - tau_i, 0, 1)`` with ``tau_i`` the SPARSEK
    threshold of ``u[C_i]``. Keys, scores and selections are per KV head and shared by its query heads.

    Args:
      q: ``[batch, seq, q_heads, head_dim]``.
      k: ``[batch, seq, kv_heads, head_dim]``; ``q_heads`` must be a multiple of ``kv_heads``.
      v: ``[batch, seq, kv_heads, head_dim]``.
      scores: ``[batch, seq, kv_heads]`` key importance scores ``u`` (float32 inside).
      topk: ``k >= 0`` selected keys per query beyond the window (0: plain sliding window).
      window: ``w >= 0`` sliding-window length (0: pure SparseK).
      gate: ``"value"`` (weights ``softmax * m``, the default), ``"logit"`` (``log m`` added to the logits)
        or ``"none"`` (hard top-k; the scores then get no gradient).
      segment_ids: optional int ``[batch, seq]``; no attention and no selection across documents. Segments
        must be contiguous runs (as produced by packing).
      scale: logit scale, default ``1 / sqrt(head_dim)``.
      implementation: ``"reference"`` (dense O(seq^2), the test oracle), ``"xla"`` (blocked and gathered,
        O(seq (topk + block_size + window)) memory and time, forward and backward, any backend),
        ``"pallas_gpu"`` (fused Pallas GPU kernels, forward and backward; see docs/kernels.md),
        ``"pallas_tpu"`` (the Pallas TPU kernels, forward and backward) or ``"auto"`` (the kernels of the
        default backend: ``pallas_gpu`` on GPUs, ``pallas_tpu`` on TPUs, ``xla`` elsewhere).
      interpret: run the Pallas kernels in interpret mode (any backend; for tests; TPU kernels in the TPU
        interpreter).
      block_size: queries per gathered tile of the blocked paths (default 64).
      buffer_size: top scores kept by the blocked thresholds (default ``default_buffer_size``); ``tau`` is
        exact while no key above it is dropped (see ``prefix_thresholds``).

    Returns:
      ``[batch, seq, q_heads, head_dim]`` in ``q``'s dtype. A query with no key at all (``window = 0`` and
      ``topk = 0``) outputs zeros.
    """
    validation.check_attention_inputs(q, k, v, scores, segment_ids)
    topk = validation.check_nonnegative_int("topk", topk)
    window = validation.check_nonnegative_int("window", window)
    validation.check_choice("gate", gate, validation.GATES)
    validation.check_choice("implementation", implementation, validation.IMPLEMENTATIONS)
    if scale is None:
        scale = 1.0 / float(q.shape[-1]) ** 0.5
    if block_size is not None:
        block_size = validation.check_nonnegative_int("block_size", block_size)
        if block_size < 1:
            raise ValueError(f"block_size: expected a positive int, received {block_size}")
    if buffer_size is not None:
        buffer_size = validation.check_nonnegative_int("buffer_size", buffer_size)
        if buffer_size < min(max(topk, 1), q.shape[1]):
            raise ValueError(f"buffer_size: expected at least min(topk, seq)={min(topk, q.shape[1])}, "
                             f"received {buffer_size}")
    implementation = _resolve_implementation(implementation)
    if implementation in ("xla", "pallas_gpu", "pallas_tpu"):
        return xla_sparsek_attention(q, k, v, scores, segment_ids, topk=topk, window=window, gate=gate,
                                     scale=float(scale), block_size=block_size or DEFAULT_BLOCK_SIZE,
                                     buffer_size=buffer_size, path=implementation, interpret=interpret)
    return _reference_attention(q, k, v, scores, segment_ids, topk=topk, window=window, gate=gate,
                                scale=float(scale))
