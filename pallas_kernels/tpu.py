"""Pallas TPU (Mosaic) kernels: SparseK attention forward and backward.

Same tiles and math as the GPU kernels (``sparsek_kernels.common``): for a run of queries starting at ``i0``
every key is a contiguous key in ``(i0 - window, i0 + run - 1]`` or an anchor (a key selected by the run's
first query). What differs is how keys reach the core, because TPUs move data as tile-aligned blocks
(8 x 128) and Mosaic has no per-row gather inside a kernel:

- **contiguous keys** come straight from K/V through BlockSpecs: K/V are padded on the left to a multiple
  of ``block_k`` at least ``window`` long, so the keys of a query block are ``num_contiguous`` whole,
  aligned ``block_k``-row blocks whose index the BlockSpec's index map computes from the grid position;
  keys of those blocks outside the block's range are masked;
- **anchors** are gathered by XLA into a dense ``[.., num_anchors, head_dim]`` array per query block (or
  per super-block for the backward), which the kernel reads with plain BlockSpecs (docs/kernels.md says why
  this beat scalar-prefetched indices and per-row DMA).

The key axis is the innermost grid axis (``arbitrary``): the forward and the ``dq`` kernel keep their
accumulators in VMEM scratch across it, FlashAttention-style; the key-major ``dk``/``dv`` kernel has the
query blocks of a super-block as its innermost axis instead and writes partial sums per (super-block, key
slot) that the caller segment-sums by key position.

Layouts (Mosaic wants the last two block dims tile-aligned or whole): per-row values are ``[..., rows, 1]``,
per-key values ``[..., 1, keys]``, so they broadcast to ``[rows, keys]`` without reshapes in the kernel.
The kernels take arrays and static sizes only; they know nothing of the library above them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sparsek_kernels import layout
from sparsek_kernels.common import MASK_VALUE, logits, pair_gates, score_gradients


def contiguous_blocks(window: int, run: int, block_k: int) -> int:
    """Aligned ``block_k`` blocks that cover ``(i0 - window, i0 + run - 1]`` wherever ``i0`` falls."""
    return -(-(window + run - 1) // block_k) + 1


def first_block(i0, *, window: int, left_pad: int, block_k: int):
    """Index of the aligned K/V block holding key ``i0 - window + 1`` (K/V padded by ``left_pad`` rows)."""
    return (i0 - window + 1 + left_pad) // block_k


def _key_positions(block, *, left_pad, block_k):
    return block * block_k - left_pad + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)


def _rows(refs):
    """Per-row [rows, 1] values from refs (position, document, tau, theta, theta_pos)."""
    return tuple(r[...] for r in refs)


def _chunk(rows, j, u_j, seg_j, valid, *, window, seq):
    return pair_gates(*rows, j, u_j, seg_j, valid, window=window, seq=seq)


def _visit(step, start, run, update, key_refs, *, num_contiguous, window, block_k, left_pad, seq, reaches=True):
    """Key step ``step`` of the tile of the run of ``run`` queries starting at ``start``: an aligned block of
    contiguous keys (masked to the run's range ``(start - window, start + run - 1]``, so no key is counted
    twice), then the anchor blocks. Calls ``update(k, v, j, u_j, seg_j, valid)`` with ``[1, block_k]`` key
    vectors. ``reaches``: whether the contiguous block can be attended at all (skipped otherwise)."""
    kc_ref, vc_ref, uc_ref, segc_ref, ka_ref, va_ref, ua_ref, sega_ref, posa_ref = key_refs

    @pl.when((step < num_contiguous) & reaches)
    def _contiguous():
        j = _key_positions(first_block(start, window=window, left_pad=left_pad, block_k=block_k) + step,
                           left_pad=left_pad, block_k=block_k)
        valid = (j > start - window) & (j <= start + run - 1) & (j >= 0) & (j < seq)
        update(kc_ref[...], vc_ref[...], j, uc_ref[...], segc_ref[...], valid)

    @pl.when(step >= num_contiguous)
    def _anchors():
        j = posa_ref[...]
        update(ka_ref[...], va_ref[...], j, ua_ref[...], sega_ref[...], j >= 0)


def _query_major(key_refs, row_refs, init, update, finish, *, window, block_q, block_k, left_pad, seq,
                 num_contiguous):
    """The walk shared by the forward and ``dq`` kernels (grid: batch, KV head, query block, key step):
    ``init()`` at the first key step, ``update(rows, k, v, j, u_j, seg_j, valid)`` at every step, and
    ``finish()`` at the last; accumulators live in the caller's VMEM scratch."""
    c, t = pl.program_id(2), pl.program_id(3)
    rows = _rows(row_refs)
    pl.when(t == 0)(init)
    _visit(t, c * block_q, block_q, functools.partial(update, rows), key_refs, num_contiguous=num_contiguous,
           window=window, block_k=block_k, left_pad=left_pad, seq=seq)
    pl.when(t == pl.num_programs(3) - 1)(finish)


def _forward_kernel(q_ref, kc_ref, vc_ref, uc_ref, segc_ref, ka_ref, va_ref, ua_ref, sega_ref, posa_ref,
                    qpos_ref, qseg_ref, tau_ref, theta_ref, theta_pos_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr,
                    *, scale, gate_mode, **walk):
    def init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def update(rows, k, v, j, u_j, seg_j, valid):
        allowed, gates, _ = _chunk(rows, j, u_j, seg_j, valid, window=walk["window"], seq=walk["seq"])
        s = logits(q_ref[...], k, allowed, gates, scale=scale, gate_mode=gate_mode)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        correction = jnp.exp(m_prev - m_new)
        p = jnp.where(allowed, jnp.exp(s - m_new), 0.0)
        l_scr[...] = l_scr[...] * correction + jnp.sum(p, axis=1, keepdims=True)
        weights = p * gates if gate_mode == "value" else p
        acc_scr[...] = acc_scr[...] * correction + jnp.dot(weights.astype(v.dtype), v,
                                                           preferred_element_type=jnp.float32)
        m_scr[...] = m_new

    def finish():
        total = l_scr[...]
        has_keys = total > 0
        o_ref[...] = (acc_scr[...] / jnp.where(has_keys, total, 1.0)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(has_keys, m_scr[...] + jnp.log(jnp.where(has_keys, total, 1.0)), 0.0)

    _query_major((kc_ref, vc_ref, uc_ref, segc_ref, ka_ref, va_ref, ua_ref, sega_ref, posa_ref),
                 (qpos_ref, qseg_ref, tau_ref, theta_ref, theta_pos_ref), init, update, finish, **walk)


def _backward_queries_kernel(q_ref, kc_ref, vc_ref, uc_ref, segc_ref, ka_ref, va_ref, ua_ref, sega_ref, posa_ref,
                             qpos_ref, qseg_ref, tau_ref, theta_ref, theta_pos_ref, do_ref, lse_ref, delta_ref,
                             dq_ref, gsum_ref, dq_scr, gsum_scr, *, scale, gate_mode, **walk):
    def init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)
        gsum_scr[...] = jnp.zeros(gsum_scr.shape, jnp.float32)

    def update(rows, k, v, j, u_j, seg_j, valid):
        allowed, gates, fractional = _chunk(rows, j, u_j, seg_j, valid, window=walk["window"], seq=walk["seq"])
        s = logits(q_ref[...], k, allowed, gates, scale=scale, gate_mode=gate_mode)
        p = jnp.where(allowed, jnp.exp(s - lse_ref[...]), 0.0)
        dp = lax.dot_general(do_ref[...], v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds, g = score_gradients(p, dp, delta_ref[...], gates, fractional, gate_mode)
        dq_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
        gsum_scr[...] += jnp.sum(g, axis=1, keepdims=True)

    def finish():
        dq_ref[...] = dq_scr[...] * scale
        gsum_ref[...] = gsum_scr[...]

    _query_major((kc_ref, vc_ref, uc_ref, segc_ref, ka_ref, va_ref, ua_ref, sega_ref, posa_ref),
                 (qpos_ref, qseg_ref, tau_ref, theta_ref, theta_pos_ref), init, update, finish, **walk)


def _backward_keys_kernel(q_ref, kc_ref, vc_ref, uc_ref, segc_ref, ka_ref, va_ref, ua_ref, sega_ref, posa_ref,
                          qpos_ref, qseg_ref, tau_ref, theta_ref, theta_pos_ref, do_ref, lse_ref, delta_ref,
                          dk_ref, dv_ref, du_ref, dk_scr, dv_scr, du_scr, *, window, block_q, block_k, left_pad, seq,
                          scale, gate_mode, blocks_per_group, num_contiguous):
    g_idx, tile, c = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    run = block_q * blocks_per_group
    s0 = g_idx * run
    contiguous_j = _key_positions(first_block(s0, window=window, left_pad=left_pad, block_k=block_k) + tile,
                                  left_pad=left_pad, block_k=block_k)
    rows = _rows((qpos_ref, qseg_ref, tau_ref, theta_ref, theta_pos_ref))

    @pl.when(c == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)
        du_scr[...] = jnp.zeros(du_scr.shape, jnp.float32)

    def update(k, v, j, u_j, seg_j, valid):
        allowed, gates, fractional = _chunk(rows, j, u_j, seg_j, valid, window=window, seq=seq)
        q, do = q_ref[...], do_ref[...]
        s = logits(q, k, allowed, gates, scale=scale, gate_mode=gate_mode)
        p = jnp.where(allowed, jnp.exp(s - lse_ref[...]), 0.0)
        dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds, g = score_gradients(p, dp, delta_ref[...], gates, fractional, gate_mode)
        weights = p * gates if gate_mode == "value" else p
        rows_contract = (((0,), (0,)), ((), ()))  # [rows, keys] x [rows, d] -> [keys, d]
        dv_scr[...] += lax.dot_general(weights.astype(do.dtype), do, rows_contract,
                                       preferred_element_type=jnp.float32)
        dk_scr[...] += lax.dot_general(ds.astype(q.dtype), q, rows_contract, preferred_element_type=jnp.float32)
        du_scr[...] += jnp.sum(g, axis=0, keepdims=True)

    # Query blocks that end before the tile's first key cannot attend to it.
    reaches = s0 + (c + 1) * block_q - 1 >= jnp.min(contiguous_j)
    _visit(tile, s0, run, update, (kc_ref, vc_ref, uc_ref, segc_ref, ka_ref, va_ref, ua_ref, sega_ref, posa_ref),
           num_contiguous=num_contiguous, window=window, block_k=block_k, left_pad=left_pad, seq=seq,
           reaches=reaches)

    @pl.when(c == blocks_per_group - 1)
    def _finish():
        dk_ref[...] = dk_scr[...] * scale
        dv_ref[...] = dv_scr[...]
        du_ref[...] = du_scr[...]


_STATIC = ("seq", "window", "block_q", "block_k", "left_pad", "scale", "gate_mode", "interpret")


def _specs(q_tiles, *, block_k, num_contiguous, query_block, key_step, contiguous_base, anchor_group):
    """BlockSpecs of the shared inputs. Functions of the grid coordinates give the query block, the key step
    (contiguous steps first, then anchor steps), the first aligned K/V block of the run, and the run's index
    in the anchor arrays. Clamped indices repeat the previous block, which Pallas does not fetch again."""
    rows, head_dim = q_tiles.shape[3:]
    contiguous = lambda g: contiguous_base(g) + jnp.minimum(key_step(g), num_contiguous - 1)
    anchor = lambda g: jnp.maximum(key_step(g) - num_contiguous, 0)
    tile = pl.BlockSpec((None, None, None, rows, head_dim), lambda *g: (g[0], g[1], query_block(g), 0, 0))
    row = pl.BlockSpec((None, None, None, rows, 1), lambda *g: (g[0], g[1], query_block(g), 0, 0))
    keys = pl.BlockSpec((None, None, block_k, head_dim), lambda *g: (g[0], g[1], contiguous(g), 0))
    key_vector = pl.BlockSpec((None, None, 1, block_k), lambda *g: (g[0], g[1], 0, contiguous(g)))
    anchor_keys = pl.BlockSpec((None, None, None, block_k, head_dim),
                               lambda *g: (g[0], g[1], anchor_group(g), anchor(g), 0))
    anchor_vector = pl.BlockSpec((None, None, None, 1, block_k),
                                 lambda *g: (g[0], g[1], anchor_group(g), 0, anchor(g)))
    return tile, row, keys, key_vector, anchor_keys, anchor_vector


def _query_major_specs(q_tiles, *, window, block_q, block_k, left_pad):
    """Grid (batch, kv_head, query block c, key step t)."""
    return _specs(q_tiles, block_k=block_k, num_contiguous=contiguous_blocks(window, block_q, block_k),
                  query_block=lambda g: g[2], key_step=lambda g: g[3],
                  contiguous_base=lambda g: first_block(g[2] * block_q, window=window, left_pad=left_pad,
                                                        block_k=block_k),
                  anchor_group=lambda g: g[2])


def _inputs_in_specs(specs):
    tile, row, keys, key_vector, anchor_keys, anchor_vector = specs
    return ([tile, keys, keys, key_vector, key_vector, anchor_keys, anchor_keys, anchor_vector, anchor_vector,
             anchor_vector] + [row] * 5)


def _params(interpret, semantics):
    return dict(interpret=pltpu.InterpretParams() if interpret else False,
                compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))


@functools.partial(jax.jit, static_argnames=_STATIC)
def sparsek_forward(q_tiles, k, v, u, segments, anchor_k, anchor_v, anchor_u, anchor_seg, anchor_pos, query_pos,
                    query_seg, tau, theta, theta_pos, *, seq: int, window: int, block_q: int, block_k: int,
                    left_pad: int, scale: float, gate_mode: str, interpret: bool = False):
    """Fused forward.

    Args:
      q_tiles: ``[batch, kv_heads, num_blocks, rows, head_dim]`` (row ``r`` = query ``r // group`` of the
        block, head ``r % group``; ``rows`` a multiple of 8, extra rows padding).
      k, v: ``[batch, kv_heads, padded_len, head_dim]``: keys padded by ``left_pad`` rows on the left
        (a multiple of ``block_k``, at least ``window``) and on the right to whole ``block_k`` blocks that
        cover every block's contiguous range.
      u, segments: ``[batch, kv_heads, 1, padded_len]`` scores (float32) and document ids, same padding.
      anchor_k, anchor_v: ``[batch, kv_heads, num_blocks, num_anchors, head_dim]`` each block's anchors'
        keys and values; anchor_u, anchor_seg, anchor_pos: ``[batch, kv_heads, num_blocks, 1, num_anchors]``
        (position -1: empty slot); ``num_anchors`` a positive multiple of ``block_k``.
      query_pos, query_seg, tau, theta, theta_pos: ``[batch, kv_heads, num_blocks, rows, 1]``.

    Returns:
      ``(out [batch, kv_heads, num_blocks, rows, head_dim] float32, lse [batch, kv_heads, num_blocks, rows, 1])``.
    """
    batch, kv_heads, num_blocks, rows, head_dim = q_tiles.shape
    num_contiguous = contiguous_blocks(window, block_q, block_k)
    num_anchor_steps = anchor_k.shape[3] // block_k
    specs = _query_major_specs(q_tiles, window=window, block_q=block_q, block_k=block_k, left_pad=left_pad)
    tile, row = specs[0], specs[1]
    kernel = functools.partial(_forward_kernel, window=window, block_q=block_q, block_k=block_k, left_pad=left_pad,
                               seq=seq, scale=scale, gate_mode=gate_mode, num_contiguous=num_contiguous)
    return pl.pallas_call(
        kernel, grid=(batch, kv_heads, num_blocks, num_contiguous + num_anchor_steps), name="sparsek_forward",
        in_specs=_inputs_in_specs(specs), out_specs=[tile, row],
        out_shape=[jax.ShapeDtypeStruct(q_tiles.shape, jnp.float32),
                   jax.ShapeDtypeStruct((batch, kv_heads, num_blocks, rows, 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                        pltpu.VMEM((rows, head_dim), jnp.float32)],
        **_params(interpret, ("parallel", "parallel", "parallel", "arbitrary")))(
        q_tiles, k, v, u, segments, anchor_k, anchor_v, anchor_u, anchor_seg, anchor_pos, query_pos, query_seg, tau,
        theta, theta_pos)


@functools.partial(jax.jit, static_argnames=_STATIC)
def sparsek_backward_queries(q_tiles, k, v, u, segments, anchor_k, anchor_v, anchor_u, anchor_seg, anchor_pos,
                             query_pos, query_seg, tau, theta, theta_pos, do_tiles, lse, delta, *, seq: int,
                             window: int, block_q: int, block_k: int, left_pad: int, scale: float, gate_mode: str,
                             interpret: bool = False):
    """``dq`` and the per-row sum of gate gradients over fractional keys. Arguments as in
    ``sparsek_forward`` plus ``do_tiles`` (like ``q_tiles``), ``lse`` and ``delta = sum(do * out, -1)``
    (``[batch, kv_heads, num_blocks, rows, 1]``). Returns ``(dq like q_tiles, gsum like lse)``, float32."""
    batch, kv_heads, num_blocks, rows, head_dim = q_tiles.shape
    num_contiguous = contiguous_blocks(window, block_q, block_k)
    specs = _query_major_specs(q_tiles, window=window, block_q=block_q, block_k=block_k, left_pad=left_pad)
    tile, row = specs[0], specs[1]
    kernel = functools.partial(_backward_queries_kernel, window=window, block_q=block_q, block_k=block_k,
                               left_pad=left_pad, seq=seq, scale=scale, gate_mode=gate_mode,
                               num_contiguous=num_contiguous)
    return pl.pallas_call(
        kernel, grid=(batch, kv_heads, num_blocks, num_contiguous + anchor_k.shape[3] // block_k),
        name="sparsek_backward_queries", in_specs=_inputs_in_specs(specs) + [tile, row, row], out_specs=[tile, row],
        out_shape=[jax.ShapeDtypeStruct(q_tiles.shape, jnp.float32),
                   jax.ShapeDtypeStruct((batch, kv_heads, num_blocks, rows, 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((rows, head_dim), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32)],
        **_params(interpret, ("parallel", "parallel", "parallel", "arbitrary")))(
        q_tiles, k, v, u, segments, anchor_k, anchor_v, anchor_u, anchor_seg, anchor_pos, query_pos, query_seg, tau,
        theta, theta_pos, do_tiles, lse, delta)


def backward_keys_slots(window: int, block_q: int, block_k: int, blocks_per_group: int, num_anchors: int) -> int:
    """Key slots per super-block in ``sparsek_backward_keys``: the aligned contiguous blocks, then anchors."""
    return contiguous_blocks(window, block_q * blocks_per_group, block_k) * block_k + num_anchors


@functools.partial(jax.jit, static_argnames=_STATIC + ("blocks_per_group",))
def sparsek_backward_keys(q_tiles, k, v, u, segments, anchor_k, anchor_v, anchor_u, anchor_seg, anchor_pos,
                          query_pos, query_seg, tau, theta, theta_pos, do_tiles, lse, delta, *, seq: int, window: int,
                          block_q: int, block_k: int, left_pad: int, scale: float, gate_mode: str,
                          blocks_per_group: int, interpret: bool = False):
    """Per super-block partial sums of ``dk``, ``dv`` and the direct term of ``du``, by key slot.

    Arguments as in ``sparsek_backward_queries``, except that the anchor arrays hold one entry per
    super-block of ``blocks_per_group`` query blocks (the anchors of its first block). Slot ``s`` of
    super-block ``g`` below ``contiguous = contiguous_blocks(window, run, block_k) * block_k`` is key
    ``first_block(g * run) * block_k - left_pad + s``; slot ``contiguous + a`` is anchor ``a``. Returns
    ``(dk, dv [batch, kv_heads, groups, slots, head_dim], du [batch, kv_heads, groups, 1, slots])`` float32.
    """
    batch, kv_heads, num_blocks, rows, head_dim = q_tiles.shape
    m = blocks_per_group
    run = block_q * m
    num_groups = num_blocks // m
    num_contiguous = contiguous_blocks(window, run, block_k)
    slots = backward_keys_slots(window, block_q, block_k, m, anchor_k.shape[3])
    specs = _specs(q_tiles, block_k=block_k, num_contiguous=num_contiguous,
                   query_block=lambda g: g[2] * m + g[4], key_step=lambda g: g[3],
                   contiguous_base=lambda g: first_block(g[2] * run, window=window, left_pad=left_pad,
                                                         block_k=block_k),
                   anchor_group=lambda g: g[2])
    tile, row = specs[0], specs[1]
    out_keys = pl.BlockSpec((None, None, None, block_k, head_dim), lambda b, h, g, t, c: (b, h, g, t, 0))
    out_vector = pl.BlockSpec((None, None, None, 1, block_k), lambda b, h, g, t, c: (b, h, g, 0, t))
    kernel = functools.partial(_backward_keys_kernel, window=window, block_q=block_q, block_k=block_k,
                               left_pad=left_pad, seq=seq, scale=scale, gate_mode=gate_mode, blocks_per_group=m,
                               num_contiguous=num_contiguous)
    return pl.pallas_call(
        kernel, grid=(batch, kv_heads, num_groups, slots // block_k, m), name="sparsek_backward_keys",
        in_specs=_inputs_in_specs(specs) + [tile, row, row], out_specs=[out_keys, out_keys, out_vector],
        out_shape=[jax.ShapeDtypeStruct((batch, kv_heads, num_groups, slots, head_dim), jnp.float32)] * 2
        + [jax.ShapeDtypeStruct((batch, kv_heads, num_groups, 1, slots), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((block_k, head_dim), jnp.float32), pltpu.VMEM((block_k, head_dim), jnp.float32),
                        pltpu.VMEM((1, block_k), jnp.float32)],
        **_params(interpret, ("parallel", "parallel", "parallel", "parallel", "arbitrary")))(
        q_tiles, k, v, u, segments, anchor_k, anchor_v, anchor_u, anchor_seg, anchor_pos, query_pos, query_seg, tau,
        theta, theta_pos, do_tiles, lse, delta)


# -- adapter: the library's layout in, the library's layout out ---------------------------------------------------

class Options(NamedTuple):
    """Static options of the TPU attention kernels."""

    window: int
    gate: str
    scale: float
    block_q: int
    block_k: int          # keys per step (128 lanes on hardware; any multiple of 8 in the interpreter)
    blocks_per_group: int  # query blocks per super-block of the key-major backward
    interpret: bool = False


def _anchor_arrays(q, k, v, scores, segments, anchors):
    """Each run's anchors gathered into dense arrays: keys and values ``[.., A, d]``, vectors ``[.., 1, A]``."""
    safe = jnp.maximum(anchors, 0)
    key_seg = jnp.broadcast_to(segments[:, :, None], scores.shape)
    keys = [layout.gather_rows(x.astype(q.dtype), safe) for x in (k, v)]
    vectors = [layout.gather_rows(x, safe)[..., None, :] for x in (scores, key_seg)]
    return (*keys, *vectors, anchors[..., None, :])


def _prepare(q, k, v, scores, segments, selection: layout.Selection, o: Options):
    seq, kv_heads = q.shape[1], k.shape[2]
    ts = layout.tile_shape(seq, q.shape[2] // kv_heads, block_q=o.block_q, blocks_per_group=o.blocks_per_group,
                           row_multiple=8)
    B, bk, m = o.block_q, o.block_k, o.blocks_per_group
    left = -(-o.window // bk) * bk
    first = functools.partial(first_block, window=o.window, left_pad=left, block_k=bk)
    # Whole aligned blocks covering every query block's and every super-block's contiguous range.
    blocks_needed = max(first((ts.padded_blocks - 1) * B) + contiguous_blocks(o.window, B, bk),
                        first((ts.padded_blocks // m - 1) * B * m) + contiguous_blocks(o.window, B * m, bk))
    keys = functools.partial(layout.padded_keys, left=left, length=max(blocks_needed * bk, -(-(left + seq) // bk) * bk))
    key_seg = jnp.broadcast_to(segments[:, :, None], scores.shape)
    shared = (keys(k.astype(q.dtype)), keys(v.astype(q.dtype)), keys(scores)[:, :, None, :],
              keys(key_seg, fill=-1)[:, :, None, :])
    anchors = layout.padded_anchors(selection.anchors, ts, bk)
    rows = (*layout.query_rows(segments, ts, kv_heads), *layout.selection_rows(selection, ts))
    static = dict(seq=seq, window=o.window, block_q=B, block_k=bk, left_pad=left, scale=o.scale, gate_mode=o.gate,
                  interpret=o.interpret)
    return ts, shared, anchors, rows, static


def attention_forward(q, k, v, scores, segments, selection: layout.Selection, o: Options):
    """As ``sparsek_kernels.gpu.attention_forward``, with the TPU kernels."""
    ts, shared, anchors, rows, static = _prepare(q, k, v, scores, segments, selection, o)
    with jax.named_scope("sparsek_forward"):
        out, lse = sparsek_forward(layout.query_tiles(q, ts, k.shape[2]), *shared,
                                   *_anchor_arrays(q, k, v, scores, segments, anchors), *rows, **static)
    return layout.from_tiles(out, ts), layout.from_tiles(lse, ts)[..., 0]


def attention_backward(q, k, v, scores, segments, selection: layout.Selection, out, lse, d_out, o: Options):
    """As ``sparsek_kernels.gpu.attention_backward``, with the TPU kernels."""
    batch, seq, kv_heads = scores.shape
    ts, shared, anchors, rows, static = _prepare(q, k, v, scores, segments, selection, o)
    q_tiles = layout.query_tiles(q, ts, kv_heads)
    outputs = layout.output_rows(d_out.astype(q.dtype), out, lse, ts, kv_heads)
    with jax.named_scope("sparsek_backward_queries"):
        dq, gsum = sparsek_backward_queries(q_tiles, *shared, *_anchor_arrays(q, k, v, scores, segments, anchors),
                                            *rows, *outputs, **static)
    m = o.blocks_per_group
    group_anchors = anchors[:, :, ::m]
    with jax.named_scope("sparsek_backward_keys"):
        dk_part, dv_part, du_part = sparsek_backward_keys(
            q_tiles, *shared, *_anchor_arrays(q, k, v, scores, segments, group_anchors), *rows, *outputs,
            blocks_per_group=m, **static)
    with jax.named_scope("key_gradient_sums"):
        groups = jnp.arange(ts.padded_blocks // m, dtype=jnp.int32)
        starts = first_block(groups * (o.block_q * m), window=o.window, left_pad=static["left_pad"],
                             block_k=o.block_k) * o.block_k - static["left_pad"]
        slot_pos = layout.super_block_slots(starts, group_anchors, dk_part.shape[3], seq)
        dk, dv, direct = layout.key_gradients((dk_part, dv_part, du_part[:, :, :, 0]), slot_pos, seq)
    gsum = layout.from_tiles(gsum, ts)[..., 0].reshape(batch, seq, kv_heads, ts.group).sum(-1)
    return layout.from_tiles(dq, ts), dk, dv, direct, gsum
