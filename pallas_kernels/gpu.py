"""Pallas GPU (Triton-lowered) kernel: fused SparseK attention forward over gathered tiles.

One program per (batch, KV head, block of ``block_q`` queries). The program holds the block's queries of all
query heads of the KV head's group as one ``[block_q * group, head_dim]`` tile and visits

1. the contiguous keys ``(i0 - window, i0 + block_q - 1]`` (the windows and the candidates that enter
   inside the block) in chunks of ``block_k``, read as slices of K/V padded by ``window`` on the left;
2. the block's anchor keys (the first query's selected keys), ``block_k`` at a time, gathered by index
   from K/V (ref indexing with an index vector).

Masks and gates are rebuilt per (query, key) from positions, segments, ``u``, ``tau``, ``theta`` and
``theta_pos``; one online softmax per query row (FlashAttention-style running max and sum); value gating
multiplies the probabilities by the gates in the accumulator only, so the denominator is the plain softmax's.
Outputs are the attention output and the log-sum-exp per row, in the layout of the blocked XLA path, whose
backward pass consumes them.

The kernel takes arrays and static sizes only; it knows nothing of the library above it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _tile_update(carry, s, allowed, gates, v, gate_mode):
    """One online-softmax step over a chunk: s, allowed, gates [rows, block_k]; v [block_k, d]."""
    acc, row_max, row_sum = carry
    if gate_mode == "logit":
        s = s + jnp.log(jnp.maximum(gates, jnp.finfo(jnp.float32).tiny))
    s = jnp.where(allowed, s, MASK_VALUE)
    new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
    correction = jnp.exp(row_max - new_max)
    p = jnp.where(allowed, jnp.exp(s - new_max[:, None]), 0.0)
    row_sum = row_sum * correction + jnp.sum(p, axis=1)
    weights = p * gates if gate_mode == "value" else p
    acc = acc * correction[:, None] + jnp.dot(weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, new_max, row_sum


def _forward_kernel(q_ref, k_ref, v_ref, u_ref, seg_ref, qpos_ref, qseg_ref, tau_ref, theta_ref, theta_pos_ref,
                    anchors_ref, o_ref, lse_ref, *, window, block_q, block_k, seq, scale, gate_mode, num_anchors):
    c = pl.program_id(2)
    i0 = c * block_q
    q = q_ref[...]                       # [rows, d], rows = block_q * group
    i = qpos_ref[...]                    # [rows] query positions (>= seq for padding rows)
    q_seg = qseg_ref[...]
    tau = tau_ref[...]
    theta = theta_ref[...]
    theta_pos = theta_pos_ref[...]
    rows, head_dim = q.shape

    def scores_and_masks(k, j, u_j, seg_j, valid_j):
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale        # [rows, block_k]
        same = valid_j[None, :] & (seg_j[None, :] == q_seg[:, None]) & (i[:, None] < seq)
        in_window = same & (j[None, :] <= i[:, None]) & (j[None, :] > i[:, None] - window)
        selected = (same & (j[None, :] <= i[:, None] - window)
                    & ((u_j[None, :] > theta[:, None])
                       | ((u_j[None, :] == theta[:, None]) & (j[None, :] >= theta_pos[:, None]))))
        gates = jnp.where(in_window, 1.0, jnp.where(selected, jnp.clip(u_j[None, :] - tau[:, None], 0.0, 1.0), 0.0))
        return s, in_window | selected, gates

    carry = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
             jnp.zeros((rows,), jnp.float32))

    # 1. contiguous keys j in [i0 - window + 1, i0 + block_q - 1]; K/V/u/seg are padded by `window` on the left.
    num_contiguous = -(-(window + block_q - 1) // block_k)

    def contiguous(t, carry):
        start = i0 + 1 + t * block_k  # padded index (j + window) of key j = i0 - window + 1 + t * block_k
        j = i0 - window + 1 + t * block_k + lax.iota(jnp.int32, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        u_j = u_ref[pl.ds(start, block_k)]
        seg_j = seg_ref[pl.ds(start, block_k)]
        valid = (j >= 0) & (j < seq) & (j <= i0 + block_q - 1)
        s, allowed, gates = scores_and_masks(k, j, u_j, seg_j, valid)
        return _tile_update(carry, s, allowed, gates, v, gate_mode)

    carry = lax.fori_loop(0, num_contiguous, contiguous, carry)

    # 2. anchors: gathered rows (index vectors), block_k at a time.
    def anchored(t, carry):
        j = anchors_ref[pl.ds(t * block_k, block_k)]
        valid = j >= 0
        padded = jnp.where(valid, j, 0) + window
        k = k_ref[padded, :]
        v = v_ref[padded, :]
        u_j = u_ref[padded]
        seg_j = seg_ref[padded]
        s, allowed, gates = scores_and_masks(k, j, u_j, seg_j, valid)
        return _tile_update(carry, s, allowed, gates, v, gate_mode)

    if num_anchors:
        carry = lax.fori_loop(0, num_anchors // block_k, anchored, carry)
    acc, row_max, row_sum = carry
    has_keys = row_sum > 0
    o_ref[...] = (acc / jnp.where(has_keys, row_sum, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has_keys, row_max + jnp.log(jnp.where(has_keys, row_sum, 1.0)), 0.0)


@functools.partial(jax.jit, static_argnames=("seq", "window", "block_q", "block_k", "scale", "gate_mode", "interpret",
                                             "num_warps", "num_stages"))
def sparsek_forward(q_tiles, k, v, u, segments, query_pos, query_seg, tau, theta, theta_pos, anchors, *, seq: int,
                    window: int, block_q: int, block_k: int, scale: float, gate_mode: str, interpret: bool = False,
                    num_warps: int = 4, num_stages: int = 2):
    """Fused forward.

    Args:
      q_tiles: ``[batch, kv_heads, num_blocks, block_q * group, head_dim]`` (row ``r`` = query ``r // group``
        of the block, head ``r % group`` of the group).
      k, v: ``[batch, kv_heads, window + seq_pad, head_dim]``: keys padded by ``window`` zero rows on the left
        and to ``num_blocks * block_q + block_k`` rows at least on the right.
      u, segments: ``[batch, kv_heads, window + seq_pad]`` float32 scores and int32 document ids, same padding.
      query_pos, query_seg, tau, theta, theta_pos: ``[batch, kv_heads, num_blocks, block_q * group]`` per row.
      anchors: ``[batch, kv_heads, num_blocks, num_anchors]`` int32 key positions (-1: empty), ``num_anchors``
        a multiple of ``block_k`` (pad with -1).

      seq: the real sequence length (keys and queries at or beyond it are masked).

    Returns:
      ``(out [batch, kv_heads, num_blocks, rows, head_dim] float32, lse [batch, kv_heads, num_blocks, rows])``.
    """
    batch, kv_heads, num_blocks, rows, head_dim = q_tiles.shape
    padded_len = k.shape[2]
    num_anchors = anchors.shape[3]
    kernel = functools.partial(_forward_kernel, window=window, block_q=block_q, block_k=block_k, seq=seq,
                               scale=scale, gate_mode=gate_mode, num_anchors=num_anchors)
    row_spec = pl.BlockSpec((None, None, None, rows), lambda b, h, c: (b, h, c, 0))
    full_keys = pl.BlockSpec((None, None, padded_len, head_dim), lambda b, h, c: (b, h, 0, 0))
    full_vector = pl.BlockSpec((None, None, padded_len), lambda b, h, c: (b, h, 0))
    in_specs = [pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, c: (b, h, c, 0, 0)),
                full_keys, full_keys, full_vector, full_vector,
                row_spec, row_spec, row_spec, row_spec, row_spec,
                pl.BlockSpec((None, None, None, max(num_anchors, 1)), lambda b, h, c: (b, h, c, 0))]
    out_specs = [pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, c: (b, h, c, 0, 0)), row_spec]
    out_shape = [jax.ShapeDtypeStruct((batch, kv_heads, num_blocks, rows, head_dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, kv_heads, num_blocks, rows), jnp.float32)]
    if num_anchors == 0:
        anchors = jnp.full((batch, kv_heads, num_blocks, 1), -1, jnp.int32)
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(kernel, grid=(batch, kv_heads, num_blocks), in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=interpret, compiler_params=compiler_params)(
        q_tiles, k, v, u, segments, query_pos, query_seg, tau, theta, theta_pos, anchors)
