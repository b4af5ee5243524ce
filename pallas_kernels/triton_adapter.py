"""The Triton attention kernels (``sparsek_kernels.triton_attention``) on the library's arrays, with the
signatures of the other blocked paths' ``attention_forward`` / ``attention_backward`` (``sparsek_kernels.gpu``),
so that one custom VJP drives them all. The kernels read the library's layout directly: the adapter only
casts dtypes and sums the per-head gate gradients over each KV group.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from sparsek_kernels import layout
from sparsek_kernels import triton_attention as kernels

__all__ = ["Options", "launch", "attention_forward", "attention_backward"]


class Options(NamedTuple):
    """Static options of the Triton attention kernels."""

    window: int
    gate: str
    scale: float
    anchor_block: int  # queries per anchor list of the thresholds (``BlockSizes.block_q``)
    rows: int | None   # query rows per row tile (``BlockSizes.tile_rows``; None: by head_dim)
    block_k: int       # keys per step of the forward
    backward_block_k: int  # keys per step of the query-major backward, rows per step of the key-major one
    num_warps: int | None  # None: by head_dim
    num_stages: int
    interpret: bool = False


def launch(head_dim: int, *, rows: int | None, block_k: int, backward_block_k: int, num_warps: int | None,
           num_stages: int) -> kernels.Launch:
    """The kernels' launch parameters; ``rows`` and ``num_warps`` left None follow head_dim (rounded up to a
    power of two). Rows: 64, one warpgroup's wgmma height, fewer only where a 32 KiB float32 accumulator
    (``8192 // head_dim`` rows) is smaller, at least 16. Warps: 4 up to head_dim 64, 8 above, where 4 warps' 255
    registers spill (docs/kernels.md has the H200 timings and register counts behind both)."""
    width = max(16, 1 << (head_dim - 1).bit_length())
    rows = rows or max(16, min(64, 8192 // width))
    return kernels.Launch(rows, block_k, min(backward_block_k, rows), num_warps or (4 if width <= 64 else 8),
                          num_stages)


def _common(q, k, v, scores, segments, selection: layout.Selection, o: Options):
    """The kernels' shared arrays (keys in q's dtype) and keyword options."""
    arrays = (q, k.astype(q.dtype), v.astype(q.dtype), scores.astype(jnp.float32), segments.astype(jnp.int32))
    rows = (selection.tau, selection.theta, selection.theta_pos)
    options = dict(window=o.window, anchor_block=o.anchor_block, scale=o.scale, gate=o.gate,
                   launch=launch(q.shape[3], rows=o.rows, block_k=o.block_k, backward_block_k=o.backward_block_k,
                                 num_warps=o.num_warps, num_stages=o.num_stages),
                   interpret=o.interpret)
    return arrays, rows, options


def attention_forward(q, k, v, scores, segments, selection: layout.Selection, o: Options):
    """q ``[batch, seq, q_heads, d]``, k and v ``[batch, seq, kv_heads, d]``, float32 scores ``[batch, seq,
    kv_heads]``, segments (document run indices) ``[batch, seq]``. Returns the output ``[batch, seq, q_heads,
    d]`` and log-sum-exp ``[batch, seq, q_heads]``, float32."""
    arrays, rows, options = _common(q, k, v, scores, segments, selection, o)
    return kernels.forward(*arrays, selection.anchors, *rows, **options)


def attention_backward(q, k, v, scores, segments, selection: layout.Selection, out, lse, d_out, o: Options):
    """``dq [batch, seq, q_heads, d]``, ``dk``, ``dv`` ``[batch, seq, kv_heads, d]``, and per KV head
    ``[batch, seq, kv_heads]``: the direct term of the scores' gradient (gate gradients of each key's fractional
    pairs) and, per query, the gate gradients over its fractional keys summed over the group; float32."""
    arrays, rows, options = _common(q, k, v, scores, segments, selection, o)
    dq, gsum, delta, dk, dv, direct = kernels.backward_queries(*arrays, selection.anchors, *rows, out,
                                                               d_out.astype(q.dtype), lse, **options)
    dk, dv, direct = kernels.backward_keys(*arrays, *rows, d_out.astype(q.dtype), lse, delta, dk, dv, direct,
                                           **options)
    batch, seq, kv_heads = scores.shape
    return dq, dk, dv, direct, gsum.reshape(batch, seq, kv_heads, -1).sum(-1)
