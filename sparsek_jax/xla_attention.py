"""Blocked SparseK attention in plain JAX: linear memory and time, forward and backward.

For a block of ``B`` consecutive queries starting at ``i0`` every key any of them attends to lies in one
gathered tile of ``window + B - 1 + topk`` keys:

- the contiguous range ``(i0 - window, i0 + B - 1]``: the block's windows plus the ``B - 1`` candidates that
  enter after ``i0``;
- the anchors ``S_{i0}``: the keys selected by the block's first query. Since ``theta`` never decreases, a
  key older than ``i0 - window`` that a later query of the block selects is already in ``S_{i0}``.

Masks and gates are rebuilt per (query, tile slot) from ``u``, ``tau``, ``theta`` and the tie position, one
softmax per query. Memory and time are ``O(batch * heads * seq * (window + B + topk))``; no ``seq x seq``
array exists in the forward or the backward pass.

The backward pass is a custom VJP: with ``P`` the softmax over the tile,
``D_i = dO_i . o_i`` as in FlashAttention, ``dS = P (g dO.v - D)``, ``dv += P g dO``; the gate gradient
``G_ij = P_ij dO_i.v_j`` (value gating) flows to the scores through ``g_ij = clip(u_j - tau_i, 0, 1)`` and
the SPARSEK VJP: ``du_l = sum_i [l in M_i] G_il - sum_i [l in M_i] Gbar_i``. The first sum is accumulated
per tile slot and scattered like ``dk``; the second is a range sum, because the queries whose fractional
set ``M_i`` contains ``l`` form one contiguous range (``tau`` is non-decreasing): prefix sums of ``Gbar``
and two binary searches on ``tau`` per key give it in ``O(seq log seq)``.

Scatter choice: tile gradients are scatter-added to key positions (``.at[].add``). On CPU that is exact and
deterministic; on GPU XLA lowers it to atomics. The Pallas kernels make their own choice (docs/kernels.md).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sparsek_jax.thresholds import (BlockedThresholds, blocked_thresholds, default_buffer_size,
                                   fractional_range_sums, is_selected)

__all__ = ["xla_sparsek_attention", "DEFAULT_BLOCK_SIZE"]

DEFAULT_BLOCK_SIZE = 64


class _Config(NamedTuple):
    topk: int
    window: int
    gate: str
    scale: float
    block_size: int
    buffer_size: int
    path: str = "xla"          # "xla" (blocked einsums), "pallas_gpu" or "pallas_tpu" (the kernels, both passes)
    interpret: bool = False    # run the Pallas kernels in interpret mode
    block_k: int = 32          # keys per kernel step
    blocks_per_group: int = 16  # query blocks per super-block of the key-major backward kernel


class _Tiles(NamedTuple):
    """Per query block: gathered keys and everything needed to rebuild masks and gates."""

    q: jax.Array          # [b, hkv, nb, B, G, d] float32
    k: jax.Array          # [b, hkv, nb, L, d] float32
    v: jax.Array          # [b, hkv, nb, L, d] float32
    key_pos: jax.Array    # [b, hkv, nb, L] int32, -1 where the slot is empty
    allowed: jax.Array    # [b, hkv, nb, B, L] bool: window or selected
    gates: jax.Array      # [b, hkv, nb, B, L] float32: 1 on the window, clip(u - tau, 0, 1) on selected
    fractional: jax.Array  # [b, hkv, nb, B, L] bool: selected with 0 < u - tau < 1 (the gate moves)


def _blocks(x, num_blocks, block_size, fill=0):
    """[b, seq, ...] -> [b, nb, B, ...], padding seq with ``fill``."""
    pad = num_blocks * block_size - x.shape[1]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return x.reshape((x.shape[0], num_blocks, block_size) + x.shape[2:])


def _gather_rows(x, positions):
    """x [b, hkv, seq, ...], positions [b, hkv, nb, L] (valid) -> [b, hkv, nb, L, ...]."""
    b, h, nb, length = positions.shape
    flat = positions.reshape(b, h, nb * length)
    gathered = jnp.take_along_axis(x, flat.reshape(flat.shape + (1,) * (x.ndim - 3)), axis=2)
    return gathered.reshape((b, h, nb, length) + x.shape[3:])


def _build_tiles(q, k, v, scores, segments, th: BlockedThresholds, cfg: _Config) -> _Tiles:
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    B, w = cfg.block_size, cfg.window
    nb = -(-seq // B)

    qb = _blocks(q.astype(jnp.float32), nb, B).reshape(batch, nb, B, kv_heads, group, head_dim)
    qb = qb.transpose(0, 3, 1, 2, 4, 5)
    query_pos = jnp.arange(nb * B, dtype=jnp.int32).reshape(nb, B)
    contiguous = (jnp.arange(nb, dtype=jnp.int32)[:, None] * B - w + 1
                  + jnp.arange(w + B - 1, dtype=jnp.int32)[None, :])  # [nb, w + B - 1]
    key_pos = jnp.broadcast_to(contiguous, (batch, kv_heads) + contiguous.shape)
    if cfg.topk > 0:
        key_pos = jnp.concatenate([key_pos, th.anchors], axis=-1)
    key_valid = (key_pos >= 0) & (key_pos < seq)
    safe_pos = jnp.where(key_valid, key_pos, 0)

    def heads_first(x):  # [b, seq, hkv, ...] -> [b, hkv, seq, ...]
        return jnp.moveaxis(x, 2, 1)

    k_tile = _gather_rows(heads_first(k.astype(jnp.float32)), safe_pos)
    v_tile = _gather_rows(heads_first(v.astype(jnp.float32)), safe_pos)
    u_tile = _gather_rows(heads_first(scores), safe_pos)
    seg_tile = _gather_rows(jnp.broadcast_to(segments[:, None, :], (batch, kv_heads, seq)), safe_pos)

    def query_side(x, fill):  # [b, seq, hkv] -> [b, hkv, nb, B, 1]
        return _blocks(x, nb, B, fill).transpose(0, 3, 1, 2)[..., None]

    seg_q = _blocks(segments, nb, B, -1)[:, None, :, :, None]  # [b, 1, nb, B, 1]

    i = query_pos[None, None, :, :, None]
    j = key_pos[:, :, :, None, :]
    same_doc = key_valid[:, :, :, None, :] & (seg_q == seg_tile[:, :, :, None, :]) & (i < seq)
    in_window = same_doc & (j <= i) & (j > i - w)
    if cfg.topk > 0:
        tau = query_side(th.tau, jnp.inf)
        theta = query_side(th.theta, jnp.inf)
        theta_pos = query_side(th.theta_pos, seq)
        u_j = u_tile[:, :, :, None, :]
        selected = same_doc & (j <= i - w) & is_selected(u_j, j, theta, theta_pos)
        gap = u_j - tau
        gates = jnp.where(in_window, 1.0, jnp.where(selected, jnp.clip(gap, 0.0, 1.0), 0.0))
        fractional = selected & (gap > 0.0) & (gap < 1.0)
    else:
        selected = fractional = jnp.zeros_like(in_window)
        gates = in_window.astype(jnp.float32)
    return _Tiles(qb, k_tile, v_tile, key_pos, in_window | selected, gates, fractional)


def _logits(t: _Tiles, cfg: _Config):
    s = jnp.einsum("zhcbgd,zhcld->zhcbgl", t.q, t.k) * cfg.scale
    if cfg.gate == "logit":
        # Selected gates are > 0 (the top-k lie inside the SPARSEK support); the floor only guards log(0).
        s = s + jnp.log(jnp.maximum(t.gates, jnp.finfo(jnp.float32).tiny))[:, :, :, :, None, :]
    return jnp.where(t.allowed[:, :, :, :, None, :], s, -jnp.inf)


def _unblock(x, seq):
    """[b, hkv, nb, B, G, d] -> [b, seq, hkv * G, d]."""
    b, h, nb, B, g, d = x.shape
    return x.transpose(0, 2, 3, 1, 4, 5).reshape(b, nb * B, h * g, d)[:, :seq]


def _thresholds(scores, segments, cfg: _Config) -> BlockedThresholds | None:
    if cfg.topk == 0:  # plain sliding window: nothing to select
        return None
    return blocked_thresholds(scores, segments, topk=cfg.topk, window=cfg.window,
                              buffer_size=cfg.buffer_size, block_size=cfg.block_size,
                              implementation="pallas_gpu" if cfg.path == "pallas_gpu" else "xla",
                              interpret=cfg.interpret)


def _materialized_scores(scores):
    """float32 scores computed once. The selection compares scores for equality (``u_j == theta_i`` picks
    the k-th key itself); if XLA fused the scores' producer into several consumers (thresholds, tiles,
    kernel inputs), each copy could round differently (e.g. an FMA in one fusion only) and a key would miss
    its own threshold. The barrier makes every consumer read the same buffer."""
    return lax.optimization_barrier(lax.stop_gradient(scores.astype(jnp.float32)))


def _forward(q, k, v, scores, segments, cfg: _Config):
    """scores: the output of ``_materialized_scores``."""
    th = _thresholds(scores, segments, cfg)
    if cfg.path in ("pallas_gpu", "pallas_tpu"):
        kernel_forward = _pallas_forward if cfg.path == "pallas_gpu" else _tpu_forward
        out, lse = kernel_forward(q, k, v, scores, segments, th, cfg)
        return out, lse, th
    t = _build_tiles(q, k, v, scores, segments, th, cfg)
    s = _logits(t, cfg)
    row_max = jnp.max(s, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    e = jnp.exp(s - row_max)  # exp(-inf) = 0 off the pattern
    total = jnp.sum(e, axis=-1, keepdims=True)
    probs = e / jnp.where(total > 0, total, 1.0)  # a query with no key outputs 0
    if cfg.gate == "value":
        probs = probs * t.gates[:, :, :, :, None, :]
    out = jnp.einsum("zhcbgl,zhcld->zhcbgd", probs, t.v)
    lse = jnp.where(total > 0, row_max + jnp.log(jnp.where(total > 0, total, 1.0)), 0.0)[..., 0]
    return out, lse, th


class _KernelLayout(NamedTuple):
    """The arrays of ``sparsek_kernels.gpu`` (see ``sparsek_forward``): padded keys, anchors and per-row data."""

    k: jax.Array
    v: jax.Array
    u: jax.Array
    seg: jax.Array
    anchors: jax.Array
    query_pos: jax.Array
    query_seg: jax.Array
    tau: jax.Array
    theta: jax.Array
    theta_pos: jax.Array


class _TileShape(NamedTuple):
    num_blocks: int    # query blocks covering seq
    padded_blocks: int  # rounded up to whole super-blocks of the key-major backward
    rows: int          # block_size * group
    tile_rows: int     # rows rounded up: to a power of two (Triton tiles) or to a multiple of 8 (TPU sublanes)


def _tile_shape(seq, group, cfg: _Config) -> _TileShape:
    num_blocks = -(-seq // cfg.block_size)
    padded = -(-num_blocks // cfg.blocks_per_group) * cfg.blocks_per_group
    rows = cfg.block_size * group
    tile_rows = -(-rows // 8) * 8 if cfg.path == "pallas_tpu" else 1 << (rows - 1).bit_length()
    return _TileShape(num_blocks, padded, rows, tile_rows)


def _to_tiles(x, ts: _TileShape, cfg: _Config, kv_heads):
    """[b, seq, q_heads, d] -> [b, kv_heads, padded_blocks, tile_rows, d] (padding rows are zero)."""
    batch, _, q_heads, head_dim = x.shape
    x = _blocks(x, ts.padded_blocks, cfg.block_size)
    x = x.reshape(batch, ts.padded_blocks, cfg.block_size, kv_heads, q_heads // kv_heads, head_dim)
    x = x.transpose(0, 3, 1, 2, 4, 5).reshape(batch, kv_heads, ts.padded_blocks, ts.rows, head_dim)
    return jnp.pad(x, [(0, 0)] * 3 + [(0, ts.tile_rows - ts.rows), (0, 0)])


def _from_tiles(x, ts: _TileShape, seq, group):
    """[b, kv_heads, padded_blocks, tile_rows, (d)] -> blocked [b, kv_heads, num_blocks, B, group, (d)]."""
    b, h = x.shape[:2]
    x = x[:, :, :ts.num_blocks, :ts.rows]
    return x.reshape((b, h, ts.num_blocks, ts.rows // group, group) + x.shape[4:])


def _rows_to_tiles(x, ts: _TileShape, fill):
    """Blocked per-row values [b, kv_heads, num_blocks, B, group] -> [b, kv_heads, padded_blocks, tile_rows]."""
    b, h = x.shape[:2]
    x = x.reshape(b, h, ts.num_blocks, ts.rows)
    return jnp.pad(x, [(0, 0), (0, 0), (0, ts.padded_blocks - ts.num_blocks), (0, ts.tile_rows - ts.rows)],
                   constant_values=fill)


def _kernel_layout(k, v, scores, segments, th, cfg: _Config, ts: _TileShape, group, dtype, *, left=None,
                   length=None) -> _KernelLayout:
    """Keys padded by ``left`` rows (default the window) on the left and to ``length`` rows in all (default:
    past the last padded block plus a key step), so every contiguous block a kernel reads is in bounds."""
    batch, seq, kv_heads, _ = k.shape
    B, w, bk = cfg.block_size, cfg.window, cfg.block_k
    left = w if left is None else left
    length = w + ts.padded_blocks * B + bk if length is None else length
    right = length - left - seq
    pad_keys = lambda x, value=0: jnp.pad(jnp.moveaxis(x, 1, 2), [(0, 0), (0, 0), (left, right)]
                                          + [(0, 0)] * (x.ndim - 3), constant_values=value)
    per_head = lambda x: jnp.broadcast_to(x[:, :, None], (batch, seq, kv_heads))

    def per_row(x, fill):  # [b, seq, hkv] -> [b, hkv, padded_blocks, tile_rows]
        x = jnp.repeat(_blocks(x, ts.padded_blocks, B, fill).transpose(0, 3, 1, 2), group, axis=-1)
        return jnp.pad(x, [(0, 0)] * 3 + [(0, ts.tile_rows - ts.rows)], constant_values=fill)

    if cfg.topk > 0:
        tau, theta, theta_pos = per_row(th.tau, jnp.inf), per_row(th.theta, jnp.inf), per_row(th.theta_pos, seq)
        anchors = th.anchors
    else:
        tau = theta = jnp.full((batch, kv_heads, ts.padded_blocks, ts.tile_rows), jnp.inf, jnp.float32)
        theta_pos = jnp.full(tau.shape, seq, jnp.int32)
        anchors = jnp.zeros((batch, kv_heads, ts.num_blocks, 0), jnp.int32)
    extra = -anchors.shape[-1] % bk or (bk if anchors.shape[-1] == 0 else 0)
    anchors = jnp.pad(anchors, [(0, 0), (0, 0), (0, ts.padded_blocks - ts.num_blocks), (0, extra)],
                      constant_values=-1)
    return _KernelLayout(pad_keys(k.astype(dtype)), pad_keys(v.astype(dtype)), pad_keys(scores),
                         pad_keys(per_head(segments), -1), anchors,
                         per_row(per_head(jnp.arange(seq, dtype=jnp.int32)[None, :].repeat(batch, 0)), seq),
                         per_row(per_head(segments), -2), tau, theta, theta_pos)


def _kernel_options(cfg: _Config, seq):
    return dict(seq=seq, window=cfg.window, block_q=cfg.block_size, block_k=cfg.block_k, scale=cfg.scale,
                gate_mode=cfg.gate, interpret=cfg.interpret)


def _pallas_forward(q, k, v, scores, segments, th, cfg: _Config):
    """Runs ``sparsek_kernels.gpu.sparsek_forward``; returns the output and log-sum-exp in the blocked layout
    ``[b, hkv, nb, B, G, (d)]`` of the XLA path."""
    from sparsek_kernels.gpu import sparsek_forward

    seq, kv_heads = q.shape[1], k.shape[2]
    group = q.shape[2] // kv_heads
    ts = _tile_shape(seq, group, cfg)
    lay = _kernel_layout(k, v, scores, segments, th, cfg, ts, group, q.dtype)
    out, lse = sparsek_forward(_to_tiles(q, ts, cfg, kv_heads), *lay, **_kernel_options(cfg, seq))
    return _from_tiles(out, ts, seq, group), _from_tiles(lse, ts, seq, group)


def _backward_rows(q, d_out, out, lse, ts: _TileShape, cfg: _Config, kv_heads):
    """Query-side inputs of the backward kernels: q and dO tiles, log-sum-exp and ``D_i = dO_i . o_i``
    (``[b, hkv, padded_blocks, tile_rows]``)."""
    batch, _, q_heads, head_dim = q.shape
    group = q_heads // kv_heads
    do_blocked = _blocks(d_out.astype(jnp.float32), ts.num_blocks, cfg.block_size).reshape(
        batch, ts.num_blocks, cfg.block_size, kv_heads, group, head_dim).transpose(0, 3, 1, 2, 4, 5)
    return (_to_tiles(q, ts, cfg, kv_heads), _to_tiles(d_out.astype(q.dtype), ts, cfg, kv_heads),
            _rows_to_tiles(lse, ts, 0.0), _rows_to_tiles(jnp.sum(do_blocked * out, axis=-1), ts, 0.0))


def _sum_backward(dq, gsum, partials, contiguous_start, group_anchors, th, scores, segments, cfg: _Config,
                  ts: _TileShape, group):
    """dq, dk, dv and the scores' gradient from the kernels' outputs: ``dq`` and ``gsum`` in tiles, and the
    key-major kernel's per (super-block, slot) partial sums of dk, dv and du. Slot ``s`` of super-block ``g``
    is key ``contiguous_start[g] + s`` below the contiguous slot count, then the super-block's anchors."""
    batch, seq, kv_heads = scores.shape
    num_contiguous = partials[0].shape[3] - group_anchors.shape[-1]
    contiguous = contiguous_start[:, None] + jnp.arange(num_contiguous, dtype=jnp.int32)[None, :]
    key_pos = jnp.concatenate([jnp.broadcast_to(contiguous, (batch, kv_heads) + contiguous.shape), group_anchors],
                              axis=-1)
    key_pos = jnp.where((key_pos >= 0) & (key_pos < seq), key_pos, -1)
    dk, dv, direct = (_scatter_add(p, key_pos, seq) for p in partials)
    gsum = jnp.sum(_from_tiles(gsum, ts, seq, group), axis=-1)  # [b, hkv, nb, B]: summed over the group
    d_scores = _scores_gradient(direct, gsum, th, scores, segments, cfg)
    return _unblock(_from_tiles(dq, ts, seq, group), seq), dk, dv, d_scores


def _pallas_backward(q, k, v, scores, segments, out, lse, th, d_out, cfg: _Config):
    """dq, dk, dv and the scores' gradient from the two GPU backward kernels (docs/kernels.md)."""
    from sparsek_kernels.gpu import sparsek_backward_keys, sparsek_backward_queries

    seq, kv_heads = q.shape[1], k.shape[2]
    group = q.shape[2] // kv_heads
    ts = _tile_shape(seq, group, cfg)
    lay = _kernel_layout(k, v, scores, segments, th, cfg, ts, group, q.dtype)
    q_tiles, do_tiles, lse_tiles, delta = _backward_rows(q, d_out, out, lse, ts, cfg, kv_heads)
    options = _kernel_options(cfg, seq)
    dq, gsum = sparsek_backward_queries(q_tiles, *lay, do_tiles, lse_tiles, delta, **options)
    m = cfg.blocks_per_group
    group_anchors = lay.anchors[:, :, ::m]
    partials = sparsek_backward_keys(q_tiles, *lay[:4], group_anchors, *lay[5:], do_tiles, lse_tiles, delta,
                                     blocks_per_group=m, **options)
    starts = jnp.arange(ts.padded_blocks // m, dtype=jnp.int32) * (cfg.block_size * m) - cfg.window + 1
    return _sum_backward(dq, gsum, partials, starts, group_anchors, th, scores, segments, cfg, ts, group)


def _tpu_layout(q, k, v, scores, segments, th, cfg: _Config):
    """Arrays of ``sparsek_kernels.tpu``: aligned padded keys, per-block gathered anchors, per-row columns."""
    from sparsek_kernels import tpu

    seq, kv_heads = q.shape[1], k.shape[2]
    group = q.shape[2] // kv_heads
    ts = _tile_shape(seq, group, cfg)
    B, w, bk, m = cfg.block_size, cfg.window, cfg.block_k, cfg.blocks_per_group
    left = -(-w // bk) * bk
    first = lambda i0: tpu.first_block(i0, window=w, left_pad=left, block_k=bk)
    blocks_needed = max(first((ts.padded_blocks - 1) * B) + tpu.contiguous_blocks(w, B, bk),
                        first((ts.padded_blocks // m - 1) * B * m) + tpu.contiguous_blocks(w, B * m, bk))
    length = max(blocks_needed * bk, -(-(left + seq) // bk) * bk)
    lay = _kernel_layout(k, v, scores, segments, th, cfg, ts, group, q.dtype, left=left, length=length)
    column = lambda x: x[..., None]

    def anchor_arrays(anchors):  # [b, hkv, n, A] -> gathered keys, values [.., A, d] and vectors [.., 1, A]
        safe = jnp.maximum(anchors, 0)
        heads_first = lambda x: jnp.moveaxis(x, 1, 2)
        kv = [_gather_rows(heads_first(x.astype(q.dtype)), safe) for x in (k, v)]
        vectors = [_gather_rows(x, safe)[..., None, :] for x in
                   (heads_first(scores), jnp.broadcast_to(segments[:, None, :], (q.shape[0], kv_heads, seq)))]
        return (*kv, *vectors, anchors[..., None, :])

    shared = (lay.k, lay.v, lay.u[:, :, None, :], lay.seg[:, :, None, :])
    rows = tuple(column(x) for x in (lay.query_pos, lay.query_seg, lay.tau, lay.theta, lay.theta_pos))
    options = dict(seq=seq, window=w, block_q=B, block_k=bk, left_pad=left, scale=cfg.scale, gate_mode=cfg.gate,
                   interpret=cfg.interpret)
    return ts, group, shared, anchor_arrays, lay.anchors, rows, options


def _tpu_forward(q, k, v, scores, segments, th, cfg: _Config):
    from sparsek_kernels.tpu import sparsek_forward

    ts, group, shared, anchor_arrays, anchors, rows, options = _tpu_layout(q, k, v, scores, segments, th, cfg)
    out, lse = sparsek_forward(_to_tiles(q, ts, cfg, k.shape[2]), *shared, *anchor_arrays(anchors), *rows,
                               **options)
    seq = q.shape[1]
    return _from_tiles(out, ts, seq, group), _from_tiles(lse[..., 0], ts, seq, group)


def _tpu_backward(q, k, v, scores, segments, out, lse, th, d_out, cfg: _Config):
    """dq, dk, dv and the scores' gradient from the two TPU backward kernels (docs/kernels.md)."""
    from sparsek_kernels import tpu

    kv_heads = k.shape[2]
    ts, group, shared, anchor_arrays, anchors, rows, options = _tpu_layout(q, k, v, scores, segments, th, cfg)
    q_tiles, do_tiles, lse_tiles, delta = (x[..., None] if x.ndim == 4 else x for x in
                                           _backward_rows(q, d_out, out, lse, ts, cfg, kv_heads))
    dq, gsum = tpu.sparsek_backward_queries(q_tiles, *shared, *anchor_arrays(anchors), *rows, do_tiles, lse_tiles,
                                            delta, **options)
    m = cfg.blocks_per_group
    group_anchors = anchors[:, :, ::m]
    dk_part, dv_part, du_part = tpu.sparsek_backward_keys(
        q_tiles, *shared, *anchor_arrays(group_anchors), *rows, do_tiles, lse_tiles, delta, blocks_per_group=m,
        **options)
    left, bk = options["left_pad"], cfg.block_k
    starts = jnp.asarray([tpu.first_block(g * cfg.block_size * m, window=cfg.window, left_pad=left, block_k=bk)
                          * bk - left for g in range(ts.padded_blocks // m)], jnp.int32)
    return _sum_backward(dq, gsum[..., 0], (dk_part, dv_part, du_part[:, :, :, 0]), starts, group_anchors, th,
                         scores, segments, cfg, ts, group)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, scores, segments, cfg: _Config):
    out, _, _ = _forward(q, k, v, _materialized_scores(scores), segments, cfg)
    return _unblock(out, q.shape[1]).astype(q.dtype)


def _attention_fwd(q, k, v, scores, segments, cfg: _Config):
    scores32 = _materialized_scores(scores)
    out, lse, th = _forward(q, k, v, scores32, segments, cfg)
    # The residual is the materialised copy, so that the backward compares the very floats `th` came from.
    # A zero of the scores' dtype carries that dtype to the backward (residuals must be arrays).
    return _unblock(out, q.shape[1]).astype(q.dtype), (q, k, v, scores32, segments, out, lse, th,
                                                        jnp.zeros((), scores.dtype))


def _scatter_add(tile_values, key_pos, seq):
    """Sums [b, hkv, nb, L, ...] tile values into [b, hkv, seq, ...] by key position (empty slots dropped)."""
    b, h = key_pos.shape[:2]
    flat_pos = jnp.where((key_pos >= 0) & (key_pos < seq), key_pos, seq).reshape(b, h, -1)
    values = tile_values.reshape((b, h, flat_pos.shape[-1]) + tile_values.shape[4:])
    scatter = lambda vals, pos: jnp.zeros((seq + 1,) + vals.shape[1:], vals.dtype).at[pos].add(vals)[:seq]
    return jax.vmap(jax.vmap(scatter))(values, flat_pos)


def _scores_gradient(direct, gsum, th, scores, segments, cfg: _Config):
    """``du_l = sum_i [l in M_i] G_il - sum_i [l in M_i] Gbar_i`` (docs/xla_attention.md).

    direct: ``[b, hkv, seq]`` the first sum (gate gradients of fractional pairs, summed per key);
    gsum: ``[b, hkv, nb, B]`` per query, the gate gradients over its fractional keys (summed over the
    group's heads). Returns ``[b, seq, hkv]`` float32.
    """
    if cfg.gate == "none" or cfg.topk == 0:
        return jnp.zeros(scores.shape, jnp.float32)
    batch, seq, kv_heads = scores.shape
    num_fractional = _blocks(th.num_fractional, gsum.shape[2], cfg.block_size, 1).transpose(0, 3, 1, 2)
    gbar = (gsum / jnp.maximum(num_fractional, 1)).reshape(batch, kv_heads, -1)[:, :, :seq]
    through_tau = fractional_range_sums(gbar, jnp.moveaxis(scores.astype(jnp.float32), 2, 1),
                                        jnp.moveaxis(th.tau, 2, 1), segments, cfg.window)
    return jnp.moveaxis(direct - through_tau, 1, 2)


def _xla_backward(q, k, v, scores, segments, out, lse, th, d_out, cfg: _Config):
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    nb = -(-seq // cfg.block_size)
    t = _build_tiles(q, k, v, scores.astype(jnp.float32), segments, th, cfg)
    s = _logits(t, cfg)
    probs = jnp.exp(s - lse[..., None])  # 0 off the pattern (s = -inf)
    do = _blocks(d_out.astype(jnp.float32), nb, cfg.block_size).reshape(
        batch, nb, cfg.block_size, kv_heads, q_heads // kv_heads, head_dim).transpose(0, 3, 1, 2, 4, 5)
    gates = t.gates[:, :, :, :, None, :]
    do_v = jnp.einsum("zhcbgd,zhcld->zhcbgl", do, t.v)
    delta = jnp.sum(do * out, axis=-1, keepdims=True)  # D_i = dO_i . o_i
    weights = probs * gates if cfg.gate == "value" else probs
    d_logits = probs * ((gates * do_v if cfg.gate == "value" else do_v) - delta)
    dq = jnp.einsum("zhcbgl,zhcld->zhcbgd", d_logits, t.k) * cfg.scale
    dk_tile = jnp.einsum("zhcbgl,zhcbgd->zhcld", d_logits, t.q) * cfg.scale
    dv_tile = jnp.einsum("zhcbgl,zhcbgd->zhcld", weights, do)
    dk = _scatter_add(dk_tile, t.key_pos, seq)
    dv = _scatter_add(dv_tile, t.key_pos, seq)
    # dL/dg_ij on fractional pairs, summed over the query heads that share the KV head's gates.
    if cfg.gate == "value":
        d_gates = jnp.sum(probs * do_v, axis=4)
    else:  # logit: s += log g, so dL/dg = dS / g
        d_gates = jnp.sum(d_logits, axis=4) / jnp.where(t.fractional, t.gates, 1.0)
    d_gates = jnp.where(t.fractional, d_gates, 0.0)  # [b, hkv, nb, B, L]
    direct = _scatter_add(jnp.sum(d_gates, axis=3), t.key_pos, seq)  # sum_i [l in M_i] G_il
    d_scores = _scores_gradient(direct, jnp.sum(d_gates, axis=4), th, scores, segments, cfg)
    return _unblock(dq, seq), dk, dv, d_scores


def _attention_bwd(cfg: _Config, residuals, d_out):
    q, k, v, scores, segments, out, lse, th, scores_dtype = residuals
    backward = {"pallas_gpu": _pallas_backward, "pallas_tpu": _tpu_backward}.get(cfg.path, _xla_backward)
    dq, dk, dv, d_scores = backward(q, k, v, scores, segments, out, lse, th, d_out, cfg)
    dk = jnp.moveaxis(dk, 1, 2).astype(k.dtype)
    dv = jnp.moveaxis(dv, 1, 2).astype(v.dtype)
    return dq.astype(q.dtype), dk, dv, d_scores.astype(scores_dtype.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def xla_sparsek_attention(q, k, v, scores, segment_ids=None, *, topk: int, window: int, gate: str,
                          scale: float, block_size: int = DEFAULT_BLOCK_SIZE, buffer_size: int | None = None,
                          path: str = "xla", interpret: bool = False, block_k: int | None = None,
                          blocks_per_group: int = 16):
    """Blocked SparseK attention (see the module docstring); arguments as in ``sparsek_attention``,
    already validated. ``block_size`` queries share one gathered tile; ``buffer_size`` is the thresholds'
    bounded buffer (default ``default_buffer_size``). ``path="pallas_gpu"`` / ``"pallas_tpu"`` runs the forward
    and backward passes as the Pallas GPU / TPU kernels (``interpret=True``: in interpret mode on any
    backend), whose key-major
    backward groups ``blocks_per_group`` query blocks per super-block; ``block_k`` keys per kernel step."""
    batch, seq = q.shape[:2]
    if block_k is None:  # TPU blocks are 128 lanes wide; Triton steps of 32 keys measured best on the H200
        block_k = 128 if path == "pallas_tpu" else 32
    segments = (jnp.zeros((batch, seq), jnp.int32) if segment_ids is None
                else jnp.asarray(segment_ids, jnp.int32))
    if buffer_size is None:
        buffer_size = default_buffer_size(max(topk, 1), seq)
    cfg = _Config(topk=topk, window=window, gate=gate, scale=float(scale), block_size=block_size,
                  buffer_size=buffer_size, path=path, interpret=interpret, block_k=block_k,
                  blocks_per_group=blocks_per_group)
    return _attention(q, k, v, scores, segments, cfg)
