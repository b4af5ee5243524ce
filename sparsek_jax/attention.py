"""SparseK attention: one softmax over each query's sliding window and its top-k gated candidates.

``sparsek_attention`` is the public entry point; ``implementation=`` picks the path, in the manner of
``jax.nn.dot_product_attention``: the blocked paths (``sparsek_jax.blocked``) or the dense reference
(``sparsek_jax.reference``), the oracle every other path is tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsek_jax import validation
from sparsek_jax.block_sizes import BlockSizes
from sparsek_jax.blocked import MeshAxes, blocked_attention
from sparsek_jax.reference import reference_attention
from sparsek_jax.thresholds import document_index, resolve_buffer_size

__all__ = ["sparsek_attention"]


def sparsek_attention(q: jax.Array, k: jax.Array, v: jax.Array, scores: jax.Array, *, topk: int,
                      window: int, gate: str = "value", segment_ids: jax.Array | None = None,
                      scale: float | None = None, implementation: str = "auto",
                      block_sizes: BlockSizes | None = None, buffer_size: int | None = None,
                      interpret: bool = False, mesh_axes: MeshAxes | None = None) -> jax.Array:
    """Causal SparseK attention with a sliding window.

    Query ``i`` attends with one softmax to its window ``W_i = {j : i - window < j <= i}`` (gate 1) and to
    ``S_i``, the ``topk`` highest-scoring keys among the older candidates ``C_i = {j : j <= i - window}``
    (ties: newer key first), each gated by ``m_ij = clip(u_j - tau_i, 0, 1)`` with ``tau_i`` the SPARSEK
    threshold of ``u[C_i]``. Keys, scores and selections are per KV head and shared by its query heads
    (docs/operator.md).

    Args:
      q: ``[batch, seq, q_heads, head_dim]``.
      k: ``[batch, seq, kv_heads, head_dim]``; ``q_heads`` must be a multiple of ``kv_heads``.
      v: ``[batch, seq, kv_heads, head_dim]``.
      scores: ``[batch, seq, kv_heads]`` key importance scores ``u`` (float32 inside). They must be finite:
        concrete arrays with a non-finite entry are rejected; under a trace the query heads of such a row
        output NaN (every implementation alike). Gates are computed in float32, so their resolution is that
        of float32 at the scores' magnitude (docs/operator.md, "Input contract").
      topk: ``k >= 0`` selected keys per query beyond the window (0: plain sliding window).
      window: ``w >= 0`` sliding-window length (0: pure SparseK).
      gate: ``"value"`` (weights ``softmax * m``, the default), ``"logit"`` (``log m`` added to the logits)
        or ``"none"`` (hard top-k; the scores then get no gradient).
      segment_ids: optional int ``[batch, seq]``; no attention and no selection across documents. Documents
        are contiguous runs (as packing produces): concrete ids that come back after another id are rejected;
        under a trace every change of id starts a new document.
      scale: logit scale, default ``1 / sqrt(head_dim)``.
      implementation: ``"auto"`` (the default: ``triton`` on GPUs where jax-triton is installed, else
        ``pallas_gpu``; ``pallas_tpu`` on TPUs; ``xla`` elsewhere), ``"xla"`` (blocked and gathered, O(seq (topk + block_q + window)) memory and time,
        forward and backward, any backend), ``"pallas_gpu"`` / ``"pallas_tpu"`` (the fused Pallas kernels,
        forward and backward; docs/kernels.md), ``"triton"`` (Triton kernels through jax-triton, forward and
        backward, on GPUs: the ``triton`` extra; docs/kernels.md) or ``"reference"`` (the dense O(seq^2)
        oracle of the tests).
      block_sizes: ``BlockSizes`` of the blocked paths (default: the implementation's).
      buffer_size: top scores kept by the thresholds (default ``default_buffer_size``); ``tau`` is exact while
        no key above it is dropped (see ``prefix_thresholds``).
      interpret: run the Pallas kernels in interpret mode (any backend; TPU kernels in the TPU interpreter),
        or the Triton kernels in Triton's interpreter (in a process that set ``TRITON_INTERPRET=1`` before
        importing triton).
      mesh_axes: ``MeshAxes`` the inputs are split over; inside ``jax.set_mesh`` the blocked paths then run
        per shard (``shard_map``), so no device gathers another's batch rows or heads.

    Returns:
      ``[batch, seq, q_heads, head_dim]`` in ``q``'s dtype. A query with no key at all (``window = 0`` and
      ``topk = 0``) outputs zeros.
    """
    _, seq, _, _, head_dim = validation.check_attention_inputs(q, k, v, scores, segment_ids)
    topk = validation.check_nonnegative_int("topk", topk)
    window = validation.check_nonnegative_int("window", window)
    validation.check_choice("gate", gate, validation.GATES)
    implementation = validation.resolve_implementation(implementation)
    validation.check_backend(implementation, interpret)
    validation.check_finite("scores", scores)
    validation.check_segment_runs(segment_ids)
    scale = 1.0 / float(head_dim) ** 0.5 if scale is None else validation.check_scale(scale)
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes: expected a BlockSizes or None, received {block_sizes!r}")
    buffer_size = resolve_buffer_size(buffer_size, topk=topk, seq=seq)
    segments = (jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None
                else document_index(jnp.asarray(segment_ids, jnp.int32)))
    if implementation == "reference":
        out = reference_attention(q, k, v, scores, segments, topk=topk, window=window, gate=gate, scale=scale)
    else:
        out = blocked_attention(q, k, v, scores, segments, topk=topk, window=window, gate=gate, scale=scale,
                                implementation=implementation,
                                block_sizes=(block_sizes or BlockSizes()).resolve(implementation, seq),
                                buffer_size=buffer_size, interpret=interpret, mesh_axes=mesh_axes)
    bad = jnp.repeat(validation.nonfinite_rows(scores), q.shape[2] // k.shape[2], axis=1)  # [batch, q_heads]
    return jnp.where(bad[:, None, :, None], jnp.asarray(jnp.nan, out.dtype), out)
