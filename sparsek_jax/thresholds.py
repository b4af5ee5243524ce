"""Per-query SparseK thresholds over growing candidate prefixes, in O(n (R + B) log(R + B)).

Query ``i`` chooses among the candidate keys ``C_i = {j <= i - window}`` of its own document. ``C_i`` is a
prefix of the key sequence, so everything is computed once per *key position* ``t`` over ``P_t = {j <= t}``
and shifted by the window: query ``i`` reads the statistics of ``t = i - window``.

Structure used (SPEC §1, points 2 and 4):
- ``theta_t``, the k-th largest score of ``P_t``, never decreases as ``t`` grows; a key that leaves the top-k
  never returns. So a buffer holding the top ``R >= k`` keys of the prefix seen so far is all the past a
  position needs for ``theta`` (exact whenever ``R >= k``).
- ``tau_t`` only depends on keys with score above ``tau_t``. The buffer is exact for ``tau_t`` when the
  largest score ever dropped from it is ``<= tau_t``: then every dropped key has gate 0. We carry that
  largest dropped score and report, per query, whether the condition held (``ThresholdInfo.exact``).

The sequence is processed in blocks of ``B`` keys; each block's buffer comes from an associative scan of
per-block top-R summaries. Each position of a block sees the buffer plus the block's keys up to itself (a ``[B, R + B]`` candidate matrix, put in order by counting ranks,
see ``_merged_rows``) and reads ``tau``/``theta`` off its ordered row with the operator's own
``threshold_of_sorted``. Memory is ``O(n R / B + 16 B (R + B))`` per row of scores (the block summaries and
16 blocks of rows at a time), time ``O(n (R + B) log(R + B))``.

Ties: keys are ordered by ``(score, position)``: among equal scores the newer key ranks higher. So the
selection ``j in S_i  <=>  (u_j, j) >= (theta_i, theta_pos_i)`` picks exactly ``min(topk, |C_i|)`` keys.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sparsek_jax import validation
from sparsek_jax.operator import threshold_of_sorted

__all__ = ["ThresholdInfo", "prefix_thresholds", "default_buffer_size", "is_selected"]


class ThresholdInfo(NamedTuple):
    """Extra per-query outputs of ``prefix_thresholds``; every field is ``[batch, seq, kv_heads]``.

    theta_pos: int32 position of the k-th ranked candidate: with ``theta`` it fixes the tie rule
      (``-1`` when every candidate is selected, ``seq`` when none is, i.e. ``topk = 0``).
    num_fractional: int32 ``|M_i|``, the number of candidates with ``0 < clip(u_j - tau_i, 0, 1) < 1``
      (inside the buffer). The backward pass of the gates divides by it.
    exact: bool, whether the bounded buffer provably gave the exact ``tau_i`` (the largest score dropped
      from the buffer is ``<= tau_i``). ``theta`` and the selection are always exact.
    """

    theta_pos: jax.Array
    num_fractional: jax.Array
    exact: jax.Array


def default_buffer_size(topk: int, seq: int) -> int:
    """Buffer size ``R`` used when none is given: room for ``topk`` plus a margin of fractional keys."""
    return max(1, min(max(2 * topk, topk + 128), seq))


def is_selected(scores_j, pos_j, theta_i, theta_pos_i):
    """``(u_j, j) >= (theta_i, theta_pos_i)``: the selection rule with newer-wins ties (broadcasting)."""
    return (scores_j > theta_i) | ((scores_j == theta_i) & (pos_j >= theta_pos_i))


def _merged_rows(buffer_scores, buffer_pos, sees_buffer, block_scores, block_pos, member):
    """Every row's candidates sorted by (score, position), descending, without sorting the rows.

    Row ``a`` holds the buffer (sorted, ``R`` entries, if ``sees_buffer[a]``) and the block keys ``b`` with
    ``member[a, b]``. Only the ``B`` block keys are sorted; each element's rank inside a row is counted (block
    keys are newer than every buffer key, so they win ties against it) and the elements are scattered to
    their ranks: ``O(B (R + B))`` per block instead of ``O(B (R + B) log(R + B))`` for a sort per row.
    Returns ``[B, R + B]`` scores (``-inf`` past the row's count) and positions (-1 there).
    """
    rows, width = member.shape[0], buffer_scores.shape[0] + member.shape[1]
    neg_scores, neg_pos, order = lax.sort((-block_scores, -block_pos, jnp.arange(rows)), num_keys=2)
    ranked_scores, ranked_pos = -neg_scores, -neg_pos  # the block, descending
    ranked_member = member[:, order]  # [a, t]: sorted block key t is in row a
    before = jnp.concatenate([jnp.zeros((rows, 1), jnp.int32), jnp.cumsum(ranked_member, axis=1, dtype=jnp.int32)],
                             axis=1)  # before[a, t] = members of row a among the t largest block keys
    buffer_valid = buffer_pos >= 0
    # Block keys ranked above buffer key r: those with score >= its score (they are newer).
    above_buffer = jnp.searchsorted(neg_scores, -buffer_scores, side="right")
    buffer_rank = jnp.arange(buffer_scores.shape[0])[None, :] + jnp.take_along_axis(
        before, jnp.broadcast_to(above_buffer[None, :], (rows, buffer_scores.shape[0])), axis=1)
    # Buffer keys ranked above sorted block key t: those with a strictly larger score.
    buffer_above = jnp.searchsorted(-jnp.where(buffer_valid, buffer_scores, -jnp.inf), -ranked_scores, side="left")
    block_rank = jnp.where(sees_buffer[:, None], buffer_above[None, :], 0) + before[:, :-1]
    buffer_rank = jnp.where(sees_buffer[:, None] & buffer_valid[None, :], buffer_rank, width)
    block_rank = jnp.where(ranked_member, block_rank, width)
    row = jnp.broadcast_to(jnp.arange(rows)[:, None], (rows, width))
    ranks = jnp.concatenate([buffer_rank, block_rank], axis=1)
    values = jnp.concatenate([jnp.broadcast_to(buffer_scores, buffer_rank.shape),
                              jnp.broadcast_to(ranked_scores, block_rank.shape)], axis=1)
    positions = jnp.concatenate([jnp.broadcast_to(buffer_pos, buffer_rank.shape),
                                 jnp.broadcast_to(ranked_pos, block_rank.shape)], axis=1)
    merged_scores = jnp.full((rows, width), -jnp.inf, jnp.float32).at[row, ranks].set(values, mode="drop")
    merged_pos = jnp.full((rows, width), -1, jnp.int32).at[row, ranks].set(positions, mode="drop")
    return merged_scores, merged_pos


def _sorted_desc(scores, pos):
    """Sorts by (score, position), descending, along the last axis."""
    neg_scores, neg_pos = lax.sort((-scores, -pos), dimension=-1, num_keys=2)
    return -neg_scores, -neg_pos


def _merge_summaries(a, b):
    """Associative combine of two prefix summaries (a before b), batched over leading axes.

    A summary is (scores [R], positions [R], dropped, first_segment, last_segment, reset): the top R keys
    of the range's last document, the largest score cut from them, and whether a document starts inside.
    """
    a_scores, a_pos, a_dropped, a_first, a_last, a_reset = a
    b_scores, b_pos, b_dropped, b_first, b_last, b_reset = b
    buffer_size = a_scores.shape[-1]
    scores, pos = _sorted_desc(jnp.concatenate([a_scores, b_scores], -1), jnp.concatenate([a_pos, b_pos], -1))
    dropped = jnp.maximum(jnp.maximum(a_dropped, b_dropped), scores[..., buffer_size])
    boundary = b_reset | (a_last != b_first)  # b starts (or contains) a new document: a is not its past
    keep_b = lambda x, y: jnp.where(boundary.reshape(boundary.shape + (1,) * (x.ndim - boundary.ndim)), y, x)
    return (keep_b(scores[..., :buffer_size], b_scores), keep_b(pos[..., :buffer_size], b_pos),
            jnp.where(boundary, b_dropped, dropped), a_first, b_last, a_reset | boundary)


def _prefix_stats_row(scores, segments, *, topk: int, buffer_size: int, block_size: int, anchor_offset: int,
                      anchor_count: int, blocks_per_step: int = 16):
    """Statistics of every key prefix of one row. scores float32 [n], segments int32 [n].

    Besides the per-position statistics, each block emits the positions of the top ``anchor_count`` keys of
    the prefix ending at its row ``anchor_offset`` (the attention's per-query-block candidate list).

    Every block's buffer (the top R keys before it, in its document) comes from an associative scan of
    per-block summaries (depth log(blocks)); the rows of ``blocks_per_step`` blocks are then processed at a
    time, so the sequential depth is ``n / (B * blocks_per_step)`` steps rather than one step per block.
    """
    n = scores.shape[0]
    num_blocks = -(-n // block_size)
    pad = num_blocks * block_size - n
    positions = jnp.arange(n + pad, dtype=jnp.int32)
    valid = positions < n
    scores = jnp.pad(scores, (0, pad))
    segments = jnp.pad(segments, (0, pad), constant_values=-1)
    blocks = tuple(x.reshape(num_blocks, block_size) for x in (scores, positions, segments, valid))
    block_scores, block_pos, block_segments, block_valid = blocks
    lower = jnp.arange(block_size)[None, :] <= jnp.arange(block_size)[:, None]

    # Per-block summaries: the block's keys of its last document, top R, sorted.
    in_last_doc = block_valid & (block_segments == block_segments[:, -1:])
    summary_scores, summary_pos = _sorted_desc(jnp.where(in_last_doc, block_scores, -jnp.inf),
                                               jnp.where(in_last_doc, block_pos, -1))
    width = max(buffer_size, block_size)
    summary_scores = jnp.pad(summary_scores, [(0, 0), (0, width - block_size)], constant_values=-jnp.inf)
    summary_pos = jnp.pad(summary_pos, [(0, 0), (0, width - block_size)], constant_values=-1)
    summary = (summary_scores[:, :buffer_size], summary_pos[:, :buffer_size],
               jnp.max(summary_scores[:, buffer_size:], axis=-1, initial=-jnp.inf),
               block_segments[:, 0], block_segments[:, -1],
               jnp.any(block_segments[:, 1:] != block_segments[:, :-1], axis=-1))
    inclusive = lax.associative_scan(_merge_summaries, summary, axis=0)
    empty = (jnp.full((1, buffer_size), -jnp.inf, jnp.float32), jnp.full((1, buffer_size), -1, jnp.int32),
             jnp.full((1,), -jnp.inf, jnp.float32), jnp.full((1,), -2, jnp.int32), jnp.full((1,), -2, jnp.int32),
             jnp.zeros((1,), bool))
    buffers = tuple(jnp.concatenate([e, x[:-1]], axis=0) for e, x in zip(empty, inclusive))  # before each block

    def block_statistics(inputs):
        (buffer_scores, buffer_pos, dropped, _, buffer_segment, _), (b_scores, b_pos, b_segments, b_valid) = inputs
        same_doc_buffer = buffer_segment == b_segments  # [B]: row a sees the buffer
        member = lower & (b_segments[None, :] == b_segments[:, None]) & b_valid[None, :]  # [a, b]
        sorted_scores, sorted_pos = _merged_rows(buffer_scores, buffer_pos, same_doc_buffer, b_scores, b_pos,
                                                 member)
        count = jnp.sum(sorted_scores > -jnp.inf, axis=1)
        tau = jax.vmap(threshold_of_sorted, in_axes=(0, None))(sorted_scores, topk)
        has_cut = count > topk
        kth = min(topk, buffer_size + block_size) - 1  # beyond the row there is never a cut
        theta = jnp.where(has_cut, sorted_scores[:, kth], -jnp.inf)
        theta_pos = jnp.where(has_cut, sorted_pos[:, kth], -1)
        gap = sorted_scores - tau[:, None]
        num_fractional = jnp.sum((gap > 0.0) & (gap < 1.0), axis=1)
        exact = jnp.where(same_doc_buffer, dropped, -jnp.inf) <= tau
        anchors = sorted_pos[anchor_offset, :anchor_count]
        return (tau, theta, theta_pos, num_fractional, exact), anchors

    stats, anchors = lax.map(block_statistics, (buffers, blocks), batch_size=min(blocks_per_step, num_blocks))
    return tuple(x.reshape(-1)[:n] for x in stats), anchors


class BlockedThresholds(NamedTuple):
    """Everything the blocked attention needs from the thresholds (internal to the fast paths).

    tau, theta, theta_pos, num_fractional, exact: ``[batch, seq, kv_heads]`` as in ``prefix_thresholds``.
    anchors: int32 ``[batch, kv_heads, ceil(seq / block_size), min(topk, seq)]``: for the query block
      starting at ``i0 = c * block_size``, the positions of its first query's selected keys ``S_{i0}``
      (``-1`` for empty slots). Every key a query of the block selects is either here or among the
      ``block_size - 1`` candidates that enter after ``i0`` (SPEC §1, point 3).
    """

    tau: jax.Array
    theta: jax.Array
    theta_pos: jax.Array
    num_fractional: jax.Array
    exact: jax.Array
    anchors: jax.Array


@functools.partial(jax.jit, static_argnames=("topk", "window", "buffer_size", "block_size"))
def blocked_thresholds(scores, segments, *, topk, window, buffer_size, block_size) -> BlockedThresholds:
    """Thresholds of every query plus per-query-block anchors. scores float32 ``[batch, seq, kv_heads]``,
    segments int32 ``[batch, seq]``, ``1 <= topk``, ``topk <= buffer_size`` unless ``topk >= seq``."""
    seq = scores.shape[1]
    num_blocks = -(-seq // block_size)
    anchor_count = min(topk, seq)
    # Query block c starts at i0 = c B; its candidates are the key prefix t = i0 - window, which sits at
    # the same offset of key block c - shift for every c.
    anchor_offset = (-window) % block_size
    shift = (window + anchor_offset) // block_size
    rows = jnp.moveaxis(scores, 2, 1)  # [batch, kv_heads, seq]
    row_fn = lambda u, s: _prefix_stats_row(u, s, topk=topk, buffer_size=buffer_size, block_size=block_size,
                                           anchor_offset=anchor_offset, anchor_count=anchor_count)
    stats, anchors = jax.vmap(jax.vmap(row_fn, in_axes=(0, None)), in_axes=(0, 0))(rows, segments)
    anchors = jnp.concatenate([jnp.full(anchors.shape[:2] + (shift, anchor_count), -1, jnp.int32),
                               anchors], axis=2)[:, :, :num_blocks]

    # Query i reads key prefix t = i - window, if that key exists and is in i's document.
    source = jnp.arange(seq) - window
    has_candidates = (source >= 0)[None, :] & (
        jnp.take(segments, jnp.maximum(source, 0), axis=1) == segments)  # [batch, seq]
    empty_values = (-jnp.inf, -jnp.inf, -1, 0, True)

    def per_query(stat, empty):
        shifted = jnp.take(stat, jnp.maximum(source, 0), axis=2)  # [batch, kv_heads, seq]
        shifted = jnp.where(has_candidates[:, None, :], shifted, jnp.asarray(empty, shifted.dtype))
        return jnp.moveaxis(shifted, 1, 2)

    tau, *rest = (per_query(s, e) for s, e in zip(stats, empty_values))
    return BlockedThresholds(running_max_within_documents(tau, segments), *rest, anchors)


def document_index(segments):
    """int32 ``[batch, seq]``: 0 for the first document of a row, +1 at every change of segment id."""
    change = jnp.concatenate([jnp.zeros_like(segments[:, :1]), segments[:, 1:] != segments[:, :-1]], axis=1)
    return jnp.cumsum(change.astype(jnp.int32), axis=1)


def running_max_within_documents(values, segments):
    """Running maximum along ``seq`` of ``[batch, seq, heads]`` values, restarting at each document.

    Mathematically ``tau`` never decreases within a document; recomputing it from a different candidate
    set can round one ulp lower. The running maximum restores the exact monotonicity that the backward
    pass relies on (it binary-searches ``tau``) at a cost of at most an ulp.
    """
    docs = jnp.broadcast_to(document_index(segments)[:, :, None], values.shape)

    def combine(a, b):
        (doc_a, val_a), (doc_b, val_b) = a, b
        return doc_b, jnp.where(doc_a == doc_b, jnp.maximum(val_a, val_b), val_b)

    return lax.associative_scan(combine, (docs, values), axis=1)[1]


def prefix_thresholds(scores: jax.Array, *, topk: int, window: int, segment_ids: jax.Array | None = None,
                      buffer_size: int | None = None, block_size: int = 128, return_info: bool = False):
    """SparseK thresholds ``tau_i`` and ``theta_i`` of every query over its candidate keys.

    Query ``i``'s candidates are ``C_i = {j : j <= i - window}`` (same segment when ``segment_ids`` is
    given; segments must be contiguous runs, as packing produces).

    Args:
      scores: ``[batch, seq, kv_heads]`` key scores ``u`` (any float dtype; float32 inside; finite).
      topk: budget ``k >= 0`` (Python int).
      window: sliding-window length ``w >= 0``; the window's keys are not candidates.
      segment_ids: optional int ``[batch, seq]`` document ids.
      buffer_size: ``R >= topk``, the bounded buffer of top scores (default ``default_buffer_size``).
      block_size: keys per scan step ``B``.
      return_info: also return a ``ThresholdInfo``.

    Returns:
      ``(tau, theta)``, float32 ``[batch, seq, kv_heads]`` each, or ``(tau, theta, info)``.
      ``tau_i`` is the SPARSEK threshold of ``u[C_i]`` with budget ``topk`` (gates are
      ``clip(u_j - tau_i, 0, 1)``); ``theta_i`` the ``topk``-th largest score of ``C_i``. Both are ``-inf``
      when ``|C_i| <= topk`` (every candidate is selected with gate 1) and ``+inf`` when ``topk = 0``.
      Both are non-decreasing along ``seq`` within a document.
    """
    topk, window = validation.check_selection_args(scores, topk, window, segment_ids)
    batch, seq, kv_heads = scores.shape
    block_size = validation.check_nonnegative_int("block_size", block_size)
    if block_size < 1:
        raise ValueError(f"block_size: expected a positive int, received {block_size}")
    if buffer_size is None:
        buffer_size = default_buffer_size(topk, seq)
    buffer_size = validation.check_nonnegative_int("buffer_size", buffer_size)
    if buffer_size < min(max(topk, 1), seq):
        raise ValueError(f"buffer_size: expected at least min(topk, seq)={min(topk, seq)}, received {buffer_size}")

    shape = (batch, seq, kv_heads)
    if topk == 0 or seq == 0:
        tau = jnp.full(shape, jnp.inf, jnp.float32)
        info = ThresholdInfo(jnp.full(shape, seq, jnp.int32), jnp.zeros(shape, jnp.int32),
                             jnp.ones(shape, bool))
        return (tau, tau, info) if return_info else (tau, tau)

    segments = (jnp.zeros((batch, seq), jnp.int32) if segment_ids is None
                else jnp.asarray(segment_ids, jnp.int32))
    tau, theta, theta_pos, num_fractional, exact, _ = blocked_thresholds(
        jnp.asarray(scores, jnp.float32), segments, topk=topk, window=window, buffer_size=buffer_size,
        block_size=block_size)
    if return_info:
        return tau, theta, ThresholdInfo(theta_pos, num_fractional, exact)
    return tau, theta
