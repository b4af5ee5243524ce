"""Pallas GPU (Triton-lowered) kernels: fused SparseK attention, forward and backward, over gathered tiles.

Tiles. For a block of ``block_q`` consecutive queries starting at ``i0`` every key any of
them attends to is either a *contiguous* key in ``(i0 - window, i0 + block_q - 1]`` (the windows and the
candidates that enter inside the block) or an *anchor*: a key selected by the block's first query. The
queries of all query heads of a KV head's group are one ``[block_q * group, head_dim]`` tile (GQA reads every
key once per group). Masks and gates are rebuilt per (query, key) from positions, document ids, ``u``,
``tau``, ``theta`` and ``theta_pos`` (``common.pair_gates``); no index matrix exists.

Three kernels:

- ``sparsek_forward``: one program per (batch, KV head, query block); contiguous keys are read as slices of
  K/V padded by ``window`` rows on the left, anchors gathered by ref indexing with an index vector; online
  softmax; value gating multiplies the probabilities by the gates in the accumulator only. Outputs the
  attention output and the per-row log-sum-exp.
- ``sparsek_backward_queries``: the same walk, recomputing ``P`` from the log-sum-exp; accumulates ``dq`` and,
  per row, the sum of the gate gradients over the fractional keys (the ``Gbar`` of the scores' backward).
- ``sparsek_backward_keys``: key-major. The queries of a *super-block* of ``blocks_per_group`` query blocks
  share one tile too (the union bound holds for any run of queries); each program owns ``block_k`` keys of
  that tile and loops over the super-block's query blocks, accumulating ``dk``, ``dv`` and the direct term
  of ``du`` in registers. It writes one partial sum per (super-block, tile slot), which the caller
  segment-sums by key position: deterministic, no atomics, and ``blocks_per_group`` times fewer partials
  than per-query-block tiles would give.

The kernels take arrays and static sizes only; they know nothing of the library above them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sparsek_kernels import layout
from sparsek_kernels.common import MASK_VALUE, logits, pair_gates, score_gradients

class _Rows(NamedTuple):
    """Per-row inputs of one query tile (loaded from refs, ``[rows, 1]`` each)."""

    pos: jax.Array
    seg: jax.Array
    tau: jax.Array
    theta: jax.Array
    theta_pos: jax.Array


def _walk_tile(carry, update, refs, rows: _Rows, *, c, window, block_q, block_k, seq, num_anchors):
    """Visits the tile of query block ``c`` in chunks of ``block_k`` keys: ``carry = update(carry, chunk)``
    with ``chunk = (k, v, allowed, gates, fractional)``."""
    k_ref, v_ref, u_ref, seg_ref, anchors_ref = refs
    i0 = c * block_q

    def chunk_of(j, valid, load):
        k, v, u_j, seg_j = load
        allowed, gates, fractional = pair_gates(*rows, j[None, :], u_j[None, :], seg_j[None, :], valid[None, :],
                                             window=window, seq=seq)
        return k, v, allowed, gates, fractional

    def contiguous(t, carry):
        start = i0 + 1 + t * block_k  # padded index (j + window) of key j = i0 - window + 1 + t * block_k
        j = i0 - window + 1 + t * block_k + lax.iota(jnp.int32, block_k)
        valid = (j >= 0) & (j < seq) & (j <= i0 + block_q - 1)
        sl = pl.ds(start, block_k)
        return update(carry, chunk_of(j, valid, (k_ref[sl, :], v_ref[sl, :], u_ref[sl], seg_ref[sl])))

    carry = lax.fori_loop(0, -(-(window + block_q - 1) // block_k), contiguous, carry)

    def anchored(t, carry):
        j = anchors_ref[pl.ds(t * block_k, block_k)]
        valid = j >= 0
        padded = jnp.where(valid, j, 0) + window
        return update(carry, chunk_of(j, valid, (k_ref[padded, :], v_ref[padded, :], u_ref[padded],
                                                 seg_ref[padded])))

    return lax.fori_loop(0, num_anchors // block_k, anchored, carry)


def _forward_kernel(q_ref, k_ref, v_ref, u_ref, seg_ref, anchors_ref, qpos_ref, qseg_ref, tau_ref, theta_ref,
                    theta_pos_ref, o_ref, lse_ref, *, window, block_q, block_k, seq, scale, gate_mode, num_anchors):
    q = q_ref[...]                       # [rows, d], rows = block_q * group
    rows = _Rows(qpos_ref[...], qseg_ref[...], tau_ref[...], theta_ref[...], theta_pos_ref[...])
    n, head_dim = q.shape

    def update(carry, chunk):
        acc, row_max, row_sum = carry
        k, v, allowed, gates, _ = chunk
        s = logits(q, k, allowed, gates, scale=scale, gate_mode=gate_mode)
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
        correction = jnp.exp(row_max - new_max)
        p = jnp.where(allowed, jnp.exp(s - new_max[:, None]), 0.0)
        row_sum = row_sum * correction + jnp.sum(p, axis=1)
        weights = p * gates if gate_mode == "value" else p
        acc = acc * correction[:, None] + jnp.dot(weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, new_max, row_sum

    carry = (jnp.zeros((n, head_dim), jnp.float32), jnp.full((n,), MASK_VALUE, jnp.float32),
             jnp.zeros((n,), jnp.float32))
    acc, row_max, row_sum = _walk_tile(carry, update, (k_ref, v_ref, u_ref, seg_ref, anchors_ref), rows,
                                       c=pl.program_id(2), window=window, block_q=block_q, block_k=block_k,
                                       seq=seq, num_anchors=num_anchors)
    has_keys = row_sum > 0
    o_ref[...] = (acc / jnp.where(has_keys, row_sum, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has_keys, row_max + jnp.log(jnp.where(has_keys, row_sum, 1.0)), 0.0)[:, None]


def _backward_queries_kernel(q_ref, k_ref, v_ref, u_ref, seg_ref, anchors_ref, qpos_ref, qseg_ref, tau_ref,
                             theta_ref, theta_pos_ref, do_ref, lse_ref, delta_ref, dq_ref, gsum_ref, *, window,
                             block_q, block_k, seq, scale, gate_mode, num_anchors):
    q = q_ref[...]
    do = do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    rows = _Rows(qpos_ref[...], qseg_ref[...], tau_ref[...], theta_ref[...], theta_pos_ref[...])

    def update(carry, chunk):
        dq, gsum = carry
        k, v, allowed, gates, fractional = chunk
        s = logits(q, k, allowed, gates, scale=scale, gate_mode=gate_mode)
        p = jnp.where(allowed, jnp.exp(s - lse), 0.0)
        dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
        ds, g = score_gradients(p, dp, delta, gates, fractional, gate_mode)
        dq = dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
        return dq, gsum + jnp.sum(g, axis=1)

    carry = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(q.shape[:1], jnp.float32))
    dq, gsum = _walk_tile(carry, update, (k_ref, v_ref, u_ref, seg_ref, anchors_ref), rows, c=pl.program_id(2),
                          window=window, block_q=block_q, block_k=block_k, seq=seq, num_anchors=num_anchors)
    dq_ref[...] = dq * scale
    gsum_ref[...] = gsum[:, None]


def _backward_keys_kernel(q_ref, k_ref, v_ref, u_ref, seg_ref, anchors_ref, qpos_ref, qseg_ref, tau_ref,
                          theta_ref, theta_pos_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, du_ref, *, window,
                          block_q, block_k, seq, scale, gate_mode, blocks_per_group, num_contiguous):
    s_idx, tile = pl.program_id(2), pl.program_id(3)
    group_len = block_q * blocks_per_group
    i0 = s_idx * group_len
    is_anchor = tile >= num_contiguous
    # The tile's keys: contiguous (i0 - window, i0 + group_len - 1] first, then the group's anchors.
    contiguous_j = i0 - window + 1 + tile * block_k + lax.iota(jnp.int32, block_k)
    anchor_j = anchors_ref[pl.ds(jnp.maximum(tile - num_contiguous, 0) * block_k, block_k)]
    j = jnp.where(is_anchor, anchor_j, contiguous_j)
    valid = jnp.where(is_anchor, anchor_j >= 0, (j >= 0) & (j < seq) & (j <= i0 + group_len - 1))
    padded = jnp.where(valid, j, 0) + window
    k, v, u_j, seg_j = k_ref[padded, :], v_ref[padded, :], u_ref[padded], seg_ref[padded]
    # Query blocks that end before the tile's first key cannot attend to it.
    first_block = jnp.where(is_anchor, 0, jnp.maximum((tile * block_k - window + 1) // block_q, 0))

    def body(c, carry):
        dk, dv, du = carry
        q, do = q_ref[c], do_ref[c]
        lse, delta = lse_ref[c], delta_ref[c]
        allowed, gates, fractional = pair_gates(*(ref[c] for ref in (qpos_ref, qseg_ref, tau_ref, theta_ref,
                                                                   theta_pos_ref)),
                                             j[None, :], u_j[None, :], seg_j[None, :], valid[None, :],
                                             window=window, seq=seq)
        s = logits(q, k, allowed, gates, scale=scale, gate_mode=gate_mode)
        p = jnp.where(allowed, jnp.exp(s - lse), 0.0)
        dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
        ds, g = score_gradients(p, dp, delta, gates, fractional, gate_mode)
        weights = p * gates if gate_mode == "value" else p
        dv = dv + jnp.dot(weights.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dk = dk + jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)
        return dk, dv, du + jnp.sum(g, axis=0)

    head_dim = k.shape[1]
    carry = (jnp.zeros((block_k, head_dim), jnp.float32), jnp.zeros((block_k, head_dim), jnp.float32),
             jnp.zeros((block_k,), jnp.float32))
    dk, dv, du = lax.fori_loop(first_block, blocks_per_group, body, carry)
    dk_ref[...] = dk * scale
    dv_ref[...] = dv
    du_ref[...] = du


def _compiler_params(interpret, num_warps, num_stages):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


_STATIC = ("seq", "window", "block_q", "block_k", "scale", "gate_mode", "interpret", "num_warps", "num_stages")


def _query_major_specs(q_tiles, k, anchors):
    """Specs of the shared inputs for a grid (batch, kv_head, query block)."""
    rows, head_dim = q_tiles.shape[3:]
    tile = pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, c: (b, h, c, 0, 0))
    keys = pl.BlockSpec((None, None, k.shape[2], head_dim), lambda b, h, c: (b, h, 0, 0))
    vector = pl.BlockSpec((None, None, k.shape[2]), lambda b, h, c: (b, h, 0))
    row = pl.BlockSpec((None, None, None, rows, 1), lambda b, h, c: (b, h, c, 0, 0))
    anchor = pl.BlockSpec((None, None, None, anchors.shape[3]), lambda b, h, c: (b, h, c, 0))
    return tile, keys, vector, row, anchor


@functools.partial(jax.jit, static_argnames=_STATIC)
def sparsek_forward(q_tiles, k, v, u, segments, anchors, query_pos, query_seg, tau, theta, theta_pos, *, seq: int,
                    window: int, block_q: int, block_k: int, scale: float, gate_mode: str, interpret: bool = False,
                    num_warps: int = 4, num_stages: int = 2):
    """Fused forward.

    Args:
      q_tiles: ``[batch, kv_heads, num_blocks, rows, head_dim]``, ``rows >= block_q * group`` a power of two
        (row ``r`` = query ``r // group`` of the block, head ``r % group`` of the group; extra rows padding).
      k, v: ``[batch, kv_heads, padded_len, head_dim]``: keys padded by ``window`` zero rows on the left and
        on the right by at least ``block_k`` rows past the last query block (``_key_length``).
      u, segments: ``[batch, kv_heads, padded_len]`` float32 scores and int32 document ids, same padding.
      anchors: ``[batch, kv_heads, num_blocks, num_anchors]`` int32 key positions of each block's anchors
        (-1: empty), ``num_anchors`` a positive multiple of ``block_k``.
      query_pos, query_seg, tau, theta, theta_pos: ``[batch, kv_heads, num_blocks, rows, 1]`` per row
        (padding rows: position ``>= seq``).
      seq: the real sequence length (keys and queries at or beyond it are masked).

    Returns:
      ``(out [batch, kv_heads, num_blocks, rows, head_dim] float32, lse [batch, kv_heads, num_blocks, rows, 1])``.
    """
    batch, kv_heads, num_blocks, rows, head_dim = q_tiles.shape
    tile, keys, vector, row, anchor = _query_major_specs(q_tiles, k, anchors)
    kernel = functools.partial(_forward_kernel, window=window, block_q=block_q, block_k=block_k, seq=seq,
                               scale=scale, gate_mode=gate_mode, num_anchors=anchors.shape[3])
    out_shape = [jax.ShapeDtypeStruct(q_tiles.shape, jnp.float32),
                 jax.ShapeDtypeStruct((batch, kv_heads, num_blocks, rows, 1), jnp.float32)]
    return pl.pallas_call(kernel, grid=(batch, kv_heads, num_blocks),
                          in_specs=[tile, keys, keys, vector, vector, anchor] + [row] * 5,
                          out_specs=[tile, row], out_shape=out_shape, interpret=interpret, name="sparsek_forward",
                          compiler_params=_compiler_params(interpret, num_warps, num_stages))(
        q_tiles, k, v, u, segments, anchors, query_pos, query_seg, tau, theta, theta_pos)


@functools.partial(jax.jit, static_argnames=_STATIC)
def sparsek_backward_queries(q_tiles, k, v, u, segments, anchors, query_pos, query_seg, tau, theta, theta_pos,
                             do_tiles, lse, delta, *, seq: int, window: int, block_q: int, block_k: int,
                             scale: float, gate_mode: str, interpret: bool = False, num_warps: int = 4,
                             num_stages: int = 2):
    """``dq`` and the per-row sum of gate gradients over fractional keys.

    Arguments as in ``sparsek_forward``, plus ``do_tiles`` (the output cotangent in the layout of
    ``q_tiles``), ``lse`` (the forward's log-sum-exp) and ``delta = sum(do * out, -1)``, per row.
    Returns ``(dq [like q_tiles] float32, gsum [batch, kv_heads, num_blocks, rows, 1] float32)``.
    """
    batch, kv_heads, num_blocks, rows, head_dim = q_tiles.shape
    tile, keys, vector, row, anchor = _query_major_specs(q_tiles, k, anchors)
    kernel = functools.partial(_backward_queries_kernel, window=window, block_q=block_q, block_k=block_k,
                               seq=seq, scale=scale, gate_mode=gate_mode, num_anchors=anchors.shape[3])
    out_shape = [jax.ShapeDtypeStruct(q_tiles.shape, jnp.float32),
                 jax.ShapeDtypeStruct((batch, kv_heads, num_blocks, rows, 1), jnp.float32)]
    return pl.pallas_call(kernel, grid=(batch, kv_heads, num_blocks),
                          in_specs=[tile, keys, keys, vector, vector, anchor] + [row] * 5 + [tile, row, row],
                          out_specs=[tile, row], out_shape=out_shape, interpret=interpret,
                          name="sparsek_backward_queries", compiler_params=_compiler_params(interpret, num_warps, num_stages))(
        q_tiles, k, v, u, segments, anchors, query_pos, query_seg, tau, theta, theta_pos, do_tiles, lse, delta)


def backward_keys_slots(window: int, block_q: int, block_k: int, blocks_per_group: int, num_anchors: int) -> int:
    """Tile slots per super-block in ``sparsek_backward_keys``: contiguous keys first, then anchors."""
    contiguous = -(-(window + block_q * blocks_per_group - 1) // block_k) * block_k
    return contiguous + num_anchors


@functools.partial(jax.jit, static_argnames=_STATIC + ("blocks_per_group",))
def sparsek_backward_keys(q_tiles, k, v, u, segments, group_anchors, query_pos, query_seg, tau, theta, theta_pos,
                          do_tiles, lse, delta, *, seq: int, window: int, block_q: int, block_k: int, scale: float,
                          gate_mode: str, blocks_per_group: int, interpret: bool = False, num_warps: int = 4,
                          num_stages: int = 2):
    """Per super-block partial sums of ``dk``, ``dv`` and the direct term of ``du``, by tile slot.

    Arguments as in ``sparsek_backward_queries`` except ``group_anchors [batch, kv_heads, num_groups,
    num_anchors]``: the anchors of the first query block of each super-block of ``blocks_per_group``
    blocks (``num_blocks = num_groups * blocks_per_group``). Slot ``s < contiguous`` of super-block ``g``
    holds key ``g * block_q * blocks_per_group - window + 1 + s``; slot ``contiguous + a`` holds anchor
    ``a`` (see ``backward_keys_slots``). Returns ``(dk, dv [batch, kv_heads, num_groups, slots, head_dim],
    du [batch, kv_heads, num_groups, slots])``, float32; the caller sums them by key position.
    """
    batch, kv_heads, num_blocks, rows, head_dim = q_tiles.shape
    num_groups = num_blocks // blocks_per_group
    num_anchors = group_anchors.shape[3]
    slots = backward_keys_slots(window, block_q, block_k, blocks_per_group, num_anchors)
    num_contiguous = (slots - num_anchors) // block_k
    m = blocks_per_group
    tile = pl.BlockSpec((None, None, m, rows, head_dim), lambda b, h, g, t: (b, h, g, 0, 0))
    keys = pl.BlockSpec((None, None, k.shape[2], head_dim), lambda b, h, g, t: (b, h, 0, 0))
    vector = pl.BlockSpec((None, None, k.shape[2]), lambda b, h, g, t: (b, h, 0))
    row = pl.BlockSpec((None, None, m, rows, 1), lambda b, h, g, t: (b, h, g, 0, 0))
    anchor = pl.BlockSpec((None, None, None, num_anchors), lambda b, h, g, t: (b, h, g, 0))
    out_keys = pl.BlockSpec((None, None, None, block_k, head_dim), lambda b, h, g, t: (b, h, g, t, 0))
    out_vector = pl.BlockSpec((None, None, None, block_k), lambda b, h, g, t: (b, h, g, t))
    kernel = functools.partial(_backward_keys_kernel, window=window, block_q=block_q, block_k=block_k, seq=seq,
                               scale=scale, gate_mode=gate_mode, blocks_per_group=m, num_contiguous=num_contiguous)
    out_shape = [jax.ShapeDtypeStruct((batch, kv_heads, num_groups, slots, head_dim), jnp.float32)] * 2 + [
        jax.ShapeDtypeStruct((batch, kv_heads, num_groups, slots), jnp.float32)]
    return pl.pallas_call(kernel, grid=(batch, kv_heads, num_groups, slots // block_k),
                          in_specs=[tile, keys, keys, vector, vector, anchor] + [row] * 5 + [tile, row, row],
                          out_specs=[out_keys, out_keys, out_vector], out_shape=out_shape, interpret=interpret,
                          name="sparsek_backward_keys", compiler_params=_compiler_params(interpret, num_warps, num_stages))(
        q_tiles, k, v, u, segments, group_anchors, query_pos, query_seg, tau, theta, theta_pos, do_tiles, lse,
        delta)


# -- adapter: the library's layout in, the library's layout out ---------------------------------------------------

class Options(NamedTuple):
    """Static options of the GPU attention kernels."""

    window: int
    gate: str
    scale: float
    block_q: int
    block_k: int          # keys per step; a power of two
    blocks_per_group: int  # query blocks per super-block of the key-major backward
    num_warps: int
    num_stages: int
    interpret: bool = False


def _prepare(q, k, v, scores, segments, selection: layout.Selection, o: Options):
    """Query tiles, padded keys, anchors and row tiles: the shared inputs of the three kernels."""
    seq, kv_heads = q.shape[1], k.shape[2]
    ts = layout.tile_shape(seq, q.shape[2] // kv_heads, block_q=o.block_q, blocks_per_group=o.blocks_per_group)
    # Every contiguous slice (window + block_q keys from i0 - window + 1, in steps of block_k) stays in bounds.
    keys = functools.partial(layout.padded_keys, left=o.window, length=o.window + ts.padded_blocks * o.block_q
                             + o.block_k)
    key_seg = jnp.broadcast_to(segments[:, :, None], scores.shape)
    inputs = (layout.query_tiles(q, ts, kv_heads), keys(k.astype(q.dtype)), keys(v.astype(q.dtype)), keys(scores),
              keys(key_seg, fill=-1), layout.padded_anchors(selection.anchors, ts, o.block_k),
              *layout.query_rows(segments, ts, kv_heads), *layout.selection_rows(selection, ts))
    static = dict(seq=seq, window=o.window, block_q=o.block_q, block_k=o.block_k, scale=o.scale, gate_mode=o.gate,
                  interpret=o.interpret, num_warps=o.num_warps, num_stages=o.num_stages)
    return ts, inputs, static


def attention_forward(q, k, v, scores, segments, selection: layout.Selection, o: Options):
    """The forward kernel on the library's arrays: q ``[batch, seq, q_heads, d]``, k and v ``[batch, seq,
    kv_heads, d]``, float32 scores ``[batch, seq, kv_heads]``, segments ``[batch, seq]``. Returns the output
    ``[batch, seq, q_heads, d]`` and log-sum-exp ``[batch, seq, q_heads]``, float32."""
    ts, inputs, static = _prepare(q, k, v, scores, segments, selection, o)
    with jax.named_scope("sparsek_forward"):
        out, lse = sparsek_forward(*inputs, **static)
    return layout.from_tiles(out, ts), layout.from_tiles(lse, ts)[..., 0]


def attention_backward(q, k, v, scores, segments, selection: layout.Selection, out, lse, d_out, o: Options):
    """The two backward kernels on the library's arrays (``out``, ``lse`` from ``attention_forward``).
    Returns ``dq [batch, seq, q_heads, d]``, ``dk``, ``dv`` ``[batch, seq, kv_heads, d]``, and per KV head
    ``[batch, seq, kv_heads]``: the direct term of the scores' gradient (gate gradients of each key's
    fractional pairs) and, per query, the gate gradients over its fractional keys summed over the group."""
    batch, seq, kv_heads = scores.shape
    ts, inputs, static = _prepare(q, k, v, scores, segments, selection, o)
    rows = layout.output_rows(d_out.astype(q.dtype), out, lse, ts, kv_heads)
    with jax.named_scope("sparsek_backward_queries"):
        dq, gsum = sparsek_backward_queries(*inputs, *rows, **static)
    m = o.blocks_per_group
    group_anchors = inputs[5][:, :, ::m]
    with jax.named_scope("sparsek_backward_keys"):
        partials = sparsek_backward_keys(*inputs[:5], group_anchors, *inputs[6:], *rows, blocks_per_group=m,
                                         **static)
    with jax.named_scope("key_gradient_sums"):
        starts = jnp.arange(ts.padded_blocks // m, dtype=jnp.int32) * (o.block_q * m) - o.window + 1
        slot_pos = layout.super_block_slots(starts, group_anchors, partials[0].shape[3], seq)
        dk, dv, direct = layout.key_gradients(partials, slot_pos, seq)
    gsum = layout.from_tiles(gsum, ts)[..., 0].reshape(batch, seq, kv_heads, ts.group).sum(-1)
    return layout.from_tiles(dq, ts), dk, dv, direct, gsum
