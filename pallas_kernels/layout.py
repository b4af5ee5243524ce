"""The arrays the attention kernels read, built from the library's layout and back.

The library passes ``q [batch, seq, q_heads, head_dim]``, keys, values and scores per KV head, and the
selection (``Selection``). The kernels work on *query tiles*: the queries of one block of ``block_q``
positions and all query heads of one KV head's group, ``[batch, kv_heads, blocks, tile_rows, ...]`` with row
``r`` = query ``r // group`` of the block, head ``r % group`` (extra rows are padding). Per-row values (query
position, document, thresholds, log-sum-exp) have one layout on every backend: ``[..., tile_rows, 1]``, so
they broadcast against ``[rows, keys]`` inside a kernel without a reshape. Keys are padded on the left so
that every contiguous range a kernel reads is in bounds.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Selection(NamedTuple):
    """What the attention reads of the thresholds.

    tau, theta: float32 ``[batch, seq, kv_heads]`` per query; theta_pos: int32, same shape (the tie rule);
    anchors: int32 ``[batch, kv_heads, blocks, num_anchors]``, the keys selected by each query block's first
    query (-1: empty slot; ``num_anchors`` may be 0).
    """

    tau: jax.Array
    theta: jax.Array
    theta_pos: jax.Array
    anchors: jax.Array


def no_selection(batch: int, seq: int, kv_heads: int, num_blocks: int) -> Selection:
    """The selection of ``topk = 0``: nothing beyond the window."""
    inf = jnp.full((batch, seq, kv_heads), jnp.inf, jnp.float32)
    return Selection(inf, inf, jnp.full((batch, seq, kv_heads), seq, jnp.int32),
                     jnp.zeros((batch, kv_heads, num_blocks, 0), jnp.int32))


def blocks(x, num_blocks: int, block: int, fill=0):
    """``[batch, seq, ...] -> [batch, num_blocks, block, ...]``, padding ``seq`` with ``fill``."""
    pad = num_blocks * block - x.shape[1]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return x.reshape((x.shape[0], num_blocks, block) + x.shape[2:])


class TileShape(NamedTuple):
    seq: int
    group: int          # query heads per KV head
    block_q: int
    num_blocks: int     # query blocks covering seq
    padded_blocks: int  # rounded up to whole super-blocks of the key-major backward
    rows: int           # block_q * group
    tile_rows: int      # rows rounded up to a power of two (Triton) or to ``row_multiple`` (TPU sublanes)


def tile_shape(seq: int, group: int, *, block_q: int, blocks_per_group: int,
               row_multiple: int | None = None) -> TileShape:
    num_blocks = -(-seq // block_q)
    padded = -(-num_blocks // blocks_per_group) * blocks_per_group
    rows = block_q * group
    tile_rows = 1 << (rows - 1).bit_length() if row_multiple is None else -(-rows // row_multiple) * row_multiple
    return TileShape(seq, group, block_q, num_blocks, padded, rows, tile_rows)


def to_tiles(x, ts: TileShape, fill=0):
    """``[batch, seq, kv_heads, group, ...] -> [batch, kv_heads, padded_blocks, tile_rows, ...]``."""
    batch, _, kv_heads = x.shape[:3]
    trailing = x.shape[4:]
    x = blocks(x, ts.padded_blocks, ts.block_q, fill)          # [b, P, B, hkv, G, ...]
    x = jnp.moveaxis(x, 3, 1).reshape((batch, kv_heads, ts.padded_blocks, ts.rows) + trailing)
    return jnp.pad(x, [(0, 0)] * 3 + [(0, ts.tile_rows - ts.rows)] + [(0, 0)] * len(trailing),
                   constant_values=fill)


def from_tiles(x, ts: TileShape):
    """``[batch, kv_heads, padded_blocks, tile_rows, ...] -> [batch, seq, kv_heads * group, ...]``."""
    batch, kv_heads = x.shape[:2]
    trailing = x.shape[4:]
    x = x[:, :, :ts.num_blocks, :ts.rows].reshape((batch, kv_heads, ts.num_blocks * ts.block_q, ts.group) + trailing)
    return jnp.moveaxis(x, 1, 2)[:, :ts.seq].reshape((batch, ts.seq, kv_heads * ts.group) + trailing)


def query_tiles(x, ts: TileShape, kv_heads: int):
    """Per query head ``[batch, seq, q_heads, ...]`` -> tiles."""
    return to_tiles(x.reshape(x.shape[:2] + (kv_heads, ts.group) + x.shape[3:]), ts)


def row_tiles(x, ts: TileShape, fill):
    """Per query and KV head ``[batch, seq, kv_heads]`` (shared by the group) -> ``[..., tile_rows, 1]``."""
    x = jnp.broadcast_to(x[..., None], x.shape + (ts.group,))
    return to_tiles(x, ts, fill)[..., None]


def query_rows(segments, ts: TileShape, kv_heads: int):
    """Query positions and documents as row tiles (padding rows: position ``seq``, document -2)."""
    batch, seq = segments.shape
    per_head = lambda x: jnp.broadcast_to(x[:, :, None], (batch, seq, kv_heads))
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None], (batch, seq))
    return row_tiles(per_head(positions), ts, seq), row_tiles(per_head(segments), ts, -2)


def selection_rows(selection: Selection, ts: TileShape):
    """tau, theta, theta_pos as row tiles (padding rows select nothing)."""
    return (row_tiles(selection.tau, ts, jnp.inf), row_tiles(selection.theta, ts, jnp.inf),
            row_tiles(selection.theta_pos, ts, ts.seq))


def gather_rows(x, positions):
    """Rows of ``x [batch, seq, kv_heads, ...]`` at ``positions [batch, kv_heads, n, slots]`` (valid indices):
    ``[batch, kv_heads, n, slots, ...]``."""
    b, h, n, slots = positions.shape
    x = jnp.moveaxis(x, 2, 1)
    flat = positions.reshape((b, h, n * slots) + (1,) * (x.ndim - 3))
    return jnp.take_along_axis(x, flat, axis=2).reshape((b, h, n, slots) + x.shape[3:])


def padded_keys(x, *, left: int, length: int, fill=0):
    """``[batch, seq, kv_heads, ...] -> [batch, kv_heads, length, ...]`` with ``left`` rows of ``fill`` first."""
    right = length - left - x.shape[1]
    return jnp.pad(jnp.moveaxis(x, 2, 1), [(0, 0), (0, 0), (left, right)] + [(0, 0)] * (x.ndim - 3),
                   constant_values=fill)


def padded_anchors(anchors, ts: TileShape, multiple: int):
    """Anchors padded to ``padded_blocks`` blocks and a positive multiple of ``multiple`` slots (-1)."""
    extra = -anchors.shape[-1] % multiple or (multiple if anchors.shape[-1] == 0 else 0)
    return jnp.pad(anchors, [(0, 0), (0, 0), (0, ts.padded_blocks - ts.num_blocks), (0, extra)],
                   constant_values=-1)


def output_rows(d_out, out, lse, ts: TileShape, kv_heads: int):
    """dO tiles, and log-sum-exp and ``D_i = dO_i . o_i`` as row tiles (the backward's query side)."""
    split = lambda x: x.reshape(x.shape[:2] + (kv_heads, ts.group) + x.shape[3:])
    delta = jnp.sum(d_out.astype(jnp.float32) * out, axis=-1)
    return (query_tiles(d_out, ts, kv_heads), to_tiles(split(lse), ts)[..., None],
            to_tiles(split(delta), ts)[..., None])


def scatter_add(values, key_pos, seq: int):
    """Sums ``[batch, kv_heads, n, slots, ...]`` values into ``[batch, seq, kv_heads, ...]`` by key position
    (``key_pos [batch, kv_heads, n, slots]``; slots outside ``[0, seq)`` are dropped). Exact and deterministic
    on CPU; XLA uses atomics on GPUs."""
    b, h = key_pos.shape[:2]
    flat_pos = jnp.where((key_pos >= 0) & (key_pos < seq), key_pos, seq).reshape(b, h, -1)
    flat = values.reshape((b, h, flat_pos.shape[-1]) + values.shape[4:])
    one = lambda vals, pos: jnp.zeros((seq + 1,) + vals.shape[1:], vals.dtype).at[pos].add(vals)[:seq]
    return jnp.moveaxis(jax.vmap(jax.vmap(one))(flat, flat_pos), 1, 2)


def key_gradients(partials, slot_pos, seq: int):
    """``(dk, dv, du)`` ``[batch, seq, kv_heads, ...]`` from a key-major kernel's partial sums per
    (super-block, slot) and the key position of every slot ``[batch, kv_heads, groups, slots]``."""
    return tuple(scatter_add(p, slot_pos, seq) for p in partials)


def super_block_slots(contiguous_start, group_anchors, num_slots: int, seq: int):
    """Key position of every slot of every super-block: ``contiguous_start[g] + s`` for the contiguous slots,
    then the super-block's anchors; ``[batch, kv_heads, groups, num_slots]``, -1 where empty."""
    batch, kv_heads = group_anchors.shape[:2]
    num_contiguous = num_slots - group_anchors.shape[-1]
    contiguous = contiguous_start[:, None] + jnp.arange(num_contiguous, dtype=jnp.int32)[None, :]
    slot_pos = jnp.concatenate([jnp.broadcast_to(contiguous, (batch, kv_heads) + contiguous.shape), group_anchors],
                               axis=-1)
    return jnp.where((slot_pos >= 0) & (slot_pos < seq), slot_pos, -1)
