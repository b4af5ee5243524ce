"""Per-query SparseK thresholds over growing candidate prefixes, in O(n (T + log R) log R).

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

The keys are scanned in blocks of ``T``. Every block's buffer (top R before it) comes from an associative
scan of per-block top-R summaries, merged by counting ranks. Then each position of a block sees the sorted
buffer plus the block's keys up to itself; nothing per position is materialised: counts over the buffer are
binary searches, counts over the block masked sums over its ``T`` keys, sums over the buffer come from
float-float prefix sums. ``tau`` is found as in the operator's ``threshold_of_sorted`` (binary search for
the linear piece, closed form on it), ``theta`` by rank counting (``_block_statistics``). Memory is
``O(n R / T)`` per row of scores, time ``O(n (T + log R) log R)``, all positions in parallel.

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


def _count_leading(predicate, length: int, shape, *, rolled: bool = False):
    """Number of leading indices ``i`` in ``[0, length)`` where ``predicate(i)`` holds, for a predicate that
    is true on a prefix; ``predicate`` maps an int32 index array of ``shape`` to bool.

    A binary search of ``bit_length(length)`` steps. Unrolled (default) for cheap predicates, so that XLA
    fuses the gathers; ``rolled=True`` (a loop) for costly ones, which keeps the program small. Searches
    inside a rolled predicate must be unrolled: nested device loops are slow on GPUs.
    """
    def step(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        holds = predicate(jnp.minimum(mid, max(length - 1, 0))) & (mid < hi)
        return jnp.where(holds, mid + 1, lo), jnp.where(holds, hi, mid)

    bounds = (jnp.zeros(shape, jnp.int32), jnp.full(shape, length, jnp.int32))
    num_steps = int(length).bit_length()
    if rolled:
        return lax.fori_loop(0, num_steps, step, bounds)[0]
    for i in range(num_steps):
        bounds = step(i, bounds)
    return bounds[0]


def _compensated_cumsum(x):
    """Exclusive prefix sums of float32 ``x`` [m] as a float-float pair (hi, lo) of length m + 1.

    A range sum ``hi[b] - hi[a] + (lo[b] - lo[a])`` then keeps its accuracy even after a long run of
    large scores (the keys above the threshold): plain float32 prefix sums would lose ~1e-3 there.
    """
    def two_sum(a, b):
        (a_hi, a_lo), (b_hi, b_lo) = a, b
        s = a_hi + b_hi
        v = s - a_hi
        err = (a_hi - (s - v)) + (b_hi - v)
        return s, a_lo + b_lo + err

    hi, lo = lax.associative_scan(two_sum, (x, jnp.zeros_like(x)))
    zero = jnp.zeros((1,), x.dtype)
    return jnp.concatenate([zero, hi]), jnp.concatenate([zero, lo])


def _sorted_desc(scores, pos):
    """Sorts by (score, position), descending, along the last axis."""
    neg_scores, neg_pos = lax.sort((-scores, -pos), dimension=-1, num_keys=2)
    return -neg_scores, -neg_pos


def _merge_summaries(a, b):
    """Associative combine of two prefix summaries (a before b), batched over leading axes.

    A summary is (scores [R], positions [R], dropped, first_segment, last_segment, reset): the top R keys
    of the range's last document sorted by (score, position) descending (padding ``-inf`` / ``-1`` last),
    the largest score cut from them, and whether a document starts inside. The two sorted lists are merged
    by counting ranks (every key of b is newer, so it wins ties): ``O(R log R)``, no sort.
    """
    a_scores, a_pos, a_dropped, a_first, a_last, a_reset = a
    b_scores, b_pos, b_dropped, b_first, b_last, b_reset = b
    buffer_size = a_scores.shape[-1]
    lead = a_scores.shape[:-1]
    flat = lambda x: x.reshape((-1, buffer_size))

    def merge(a_scores, a_pos, b_scores, b_pos):
        index = jnp.arange(buffer_size, dtype=jnp.int32)
        search = functools.partial(jnp.searchsorted, method="scan_unrolled")
        a_dest = index + search(-b_scores, -a_scores, side="right")   # b keys with a score >= a's
        b_dest = index + search(-a_scores, -b_scores, side="left")    # a keys with a score > b's
        dest = jnp.concatenate([a_dest, b_dest])
        scores = jnp.full((2 * buffer_size,), -jnp.inf, jnp.float32).at[dest].set(
            jnp.concatenate([a_scores, b_scores]), mode="drop")
        pos = jnp.full((2 * buffer_size,), -1, jnp.int32).at[dest].set(jnp.concatenate([a_pos, b_pos]),
                                                                        mode="drop")
        return scores, pos

    scores, pos = jax.vmap(merge)(flat(a_scores), flat(a_pos), flat(b_scores), flat(b_pos))
    scores, pos = scores.reshape(lead + (2 * buffer_size,)), pos.reshape(lead + (2 * buffer_size,))
    dropped = jnp.maximum(jnp.maximum(a_dropped, b_dropped), scores[..., buffer_size])
    boundary = b_reset | (a_last != b_first)  # b starts (or contains) a new document: a is not its past
    keep_b = lambda x, y: jnp.where(boundary.reshape(boundary.shape + (1,) * (x.ndim - boundary.ndim)), y, x)
    return (keep_b(scores[..., :buffer_size], b_scores), keep_b(pos[..., :buffer_size], b_pos),
            jnp.where(boundary, b_dropped, dropped), a_first, b_last, a_reset | boundary)


class _Block(NamedTuple):
    """One scan block: the buffer before it and its own keys (the rows are the block's key positions)."""

    buffer_scores: jax.Array   # [R] descending by (score, position); -inf padding last
    buffer_pos: jax.Array      # [R] int32, -1 padding
    dropped: jax.Array         # [] largest score ever cut from the buffer (-inf if none)
    buffer_segment: jax.Array  # [] document of the buffer (the last document before the block)
    new_scores: jax.Array      # [T] the block's keys sorted by (score, position) descending; -inf if invalid
    new_pos: jax.Array         # [T]
    new_segment: jax.Array     # [T]
    row_pos: jax.Array         # [T] the rows (key prefixes t) in position order
    row_segment: jax.Array     # [T]


def _block_statistics(blk: _Block, *, topk: int, anchor_rows: tuple[int, ...], anchor_count: int):
    """Statistics of the prefixes ending at each key of one block, without forming any per-row list.

    Row ``a`` sees the buffer (if in the buffer's document) and the block keys up to itself in its document.
    Every count over the buffer is a binary search in the sorted buffer; every count over the block is a
    masked sum over its ``T`` keys. So a row costs ``O(T + log R)`` per evaluation of
    ``f(t) = sum_j clip(z_j - t, 0, 1)``, and ``tau`` is found as in ``operator.threshold_of_sorted``: the
    largest breakpoint ``b`` (a ``z`` or ``z - 1``, from the buffer or the block) with ``f(b) > k`` by binary
    search in each sorted list, then the closed form on the linear piece after it.
    """
    k = topk
    buffer_size, rows = blk.buffer_scores.shape[0], blk.row_pos.shape[0]
    shape = (rows,)
    buf_valid = blk.buffer_pos >= 0
    buf_z = blk.buffer_scores
    buf_minus_one = jnp.where(buf_valid, buf_z - 1.0, -jnp.inf)
    buf_count = jnp.sum(buf_valid, dtype=jnp.int32)
    new_valid = blk.new_pos >= 0
    new_z = blk.new_scores
    new_minus_one = jnp.where(new_valid, new_z - 1.0, -jnp.inf)
    sees = blk.buffer_segment == blk.row_segment                                          # [a]
    visible = (new_valid[None, :] & (blk.new_segment[None, :] == blk.row_segment[:, None])
               & (blk.new_pos[None, :] <= blk.row_pos[:, None]))                          # [a, t]
    num_visible = jnp.where(sees, buf_count, 0) + jnp.sum(visible, axis=1, dtype=jnp.int32)
    has_cut = num_visible > k

    # Sums are taken relative to a score near the threshold, in float-float prefix sums over the buffer.
    center = jnp.where(buf_count > 0, buf_z[jnp.clip(jnp.minimum(k, buf_count) - 1, 0, buffer_size - 1)],
                       jnp.max(jnp.where(new_valid, new_z, -jnp.inf), initial=0.0))
    center = jnp.where(jnp.isfinite(center), center, 0.0)
    sum_hi, sum_lo = _compensated_cumsum(jnp.where(buf_valid, buf_z - center, 0.0))

    def buffer_count(values, predicate, shape=shape):  # leading buffer entries where predicate holds
        return _count_leading(lambda i: predicate(values[i]), buffer_size, shape)

    def fractional_terms(t, *, upper_inclusive):
        """|U|, |M| and sum_M (z - center) of each row's visible keys at thresholds t [..., a].

        ``U = {z - 1 > t}`` is the partition on the piece just above ``t``; evaluating ``f(t)`` itself,
        keys with ``z - 1 = t`` go to U too (``upper_inclusive``): their term is then exactly 1, where the
        unclipped ``z - t`` of a prefix sum could round above 1 and make a flat ``f = k`` look ``> k``.
        """
        in_upper = jnp.greater_equal if upper_inclusive else jnp.greater
        b_above = jnp.where(sees, buffer_count(buf_z, lambda z: z > t, t.shape), 0)
        b_upper = jnp.where(sees, buffer_count(buf_minus_one, lambda z: in_upper(z, t), t.shape), 0)
        n_above = visible & (new_z > t[..., None])
        n_upper = visible & in_upper(new_minus_one, t[..., None])
        n_mid = n_above & ~n_upper
        num_upper = b_upper + jnp.sum(n_upper, axis=-1, dtype=jnp.int32)
        num_mid = b_above - b_upper + jnp.sum(n_mid, axis=-1, dtype=jnp.int32)
        sum_mid = ((sum_hi[b_above] - sum_hi[b_upper]) + (sum_lo[b_above] - sum_lo[b_upper])
                   + jnp.sum(jnp.where(n_mid, new_z - center, 0.0), axis=-1))
        return num_upper, num_mid, sum_mid

    def f(t):
        num_upper, num_mid, sum_mid = fractional_terms(t, upper_inclusive=True)
        return num_upper + sum_mid - num_mid * (t - center)

    lowest = jnp.minimum(jnp.min(jnp.where(buf_valid, buf_minus_one, jnp.inf), initial=jnp.inf),
                         jnp.min(jnp.where(new_valid, new_minus_one, jnp.inf), initial=jnp.inf)) - 1.0
    lowest = jnp.where(jnp.isfinite(lowest), lowest, 0.0)

    # The largest breakpoint with f > k, by one binary search per sorted list (z and z - 1, of the buffer
    # and of the block), run side by side; shorter lists are padded with `lowest`, which changes nothing.
    width = max(buffer_size, rows)
    pad = lambda x, valid: jnp.pad(jnp.where(valid, x, lowest), (0, width - x.shape[0]), constant_values=lowest)
    points = jnp.stack([pad(buf_z, buf_valid), pad(buf_minus_one, buf_valid), pad(new_z, new_valid),
                        pad(new_minus_one, new_valid)])  # [4, width], each descending
    list_index = jnp.arange(4)[:, None]
    first = _count_leading(lambda i: f(points[list_index, i]) <= k, width, (4, rows), rolled=True)
    start = jnp.max(jnp.where(first < width, points[list_index, jnp.minimum(first, width - 1)], lowest), axis=0)
    num_upper, num_mid, sum_mid = fractional_terms(start, upper_inclusive=False)
    # On (start, next breakpoint]: f(t) = |U| + sum_M (z - t) = k, solved relative to the center.
    tau = center + (sum_mid + num_upper - k) / jnp.where(has_cut & (num_mid > 0), num_mid, 1)
    tau = jnp.where(has_cut, tau, -jnp.inf)

    # theta: the k-th visible key in (score, position) order. Buffer key r ranks r + (visible block keys
    # with a score >= its own: they are newer); if no buffer key has rank k - 1, a block key has.
    def buffer_rank(r):
        return r + jnp.sum(visible & (new_z >= buf_z[r][:, None]), axis=1, dtype=jnp.int32)

    r_star = _count_leading(lambda r: buffer_rank(r) < k - 1, buffer_size, shape, rolled=True)
    r_safe = jnp.minimum(r_star, buffer_size - 1)
    buffer_hit = sees & (r_star < buf_count) & (buffer_rank(r_safe) == k - 1)
    up_to = jnp.cumsum(visible, axis=1, dtype=jnp.int32)  # visible block keys ranked at or above t

    def ranked_through(t):  # visible keys ranked at or above block key t (inclusive)
        above = jnp.where(sees, buffer_count(buf_z, lambda z: z > new_z[t]), 0)
        return above + jnp.take_along_axis(up_to, t[:, None], axis=1)[:, 0]

    t_star = jnp.minimum(_count_leading(lambda t: ranked_through(t) < k, rows, shape, rolled=True), rows - 1)
    theta = jnp.where(has_cut, jnp.where(buffer_hit, buf_z[r_safe], new_z[t_star]), -jnp.inf)
    theta_pos = jnp.where(has_cut, jnp.where(buffer_hit, blk.buffer_pos[r_safe], blk.new_pos[t_star]), -1)

    # |M| at tau, with the same float test as the attention's gates (0 < u - tau < 1).
    b_fractional = (buffer_count(buf_z, lambda z: z > tau) - buffer_count(buf_z, lambda z: z - tau >= 1.0))
    gap = new_z[None, :] - tau[:, None]
    num_fractional = (jnp.where(sees, b_fractional, 0)
                      + jnp.sum(visible & (gap > 0.0) & (gap < 1.0), axis=1, dtype=jnp.int32))
    exact = jnp.where(sees, blk.dropped, -jnp.inf) <= tau

    # Anchors of the rows that start query blocks: the selected buffer prefix, then the selected block keys.
    a = jnp.asarray(anchor_rows, jnp.int32)
    if anchor_rows:
        chosen = lambda z, p: is_selected(z, p, theta[a], theta_pos[a])
        from_buffer = jnp.where(sees[a], _count_leading(
            lambda r: chosen(buf_z[r], blk.buffer_pos[r]) & buf_valid[r], buffer_size, a.shape), 0)
        from_block = visible[a] & is_selected(new_z, blk.new_pos, theta[a][:, None], theta_pos[a][:, None])
        slot = jnp.arange(anchor_count, dtype=jnp.int32)
        anchors = jnp.where(slot < from_buffer[:, None], blk.buffer_pos[jnp.minimum(slot, buffer_size - 1)], -1)
        dest = jnp.where(from_block, from_buffer[:, None] + jnp.cumsum(from_block, axis=1, dtype=jnp.int32) - 1,
                         anchor_count)
        anchors = jax.vmap(lambda row, d: row.at[d].set(blk.new_pos, mode="drop"))(anchors, dest)
    else:
        anchors = jnp.zeros((0, anchor_count), jnp.int32)
    return (tau, theta, theta_pos, num_fractional, exact), anchors


def _prefix_stats_row(scores, segments, *, topk: int, buffer_size: int, block_size: int, scan_block: int,
                      anchor_offset: int, anchor_count: int):
    """Statistics of every key prefix of one row. scores float32 [n], segments int32 [n].

    Keys are scanned in blocks of ``scan_block`` (a multiple of ``block_size``). Every block's buffer (the top
    R keys before it, in its document) comes from an associative scan of per-block top-R summaries (depth
    log(blocks)); then every block is independent (``_block_statistics``). Besides the per-position
    statistics, each ``block_size`` sub-block emits the positions of the top ``anchor_count`` keys of the
    prefix ending at its row ``anchor_offset`` (the attention's per-query-block candidate list).
    """
    n = scores.shape[0]
    num_blocks = -(-n // scan_block)
    pad = num_blocks * scan_block - n
    positions = jnp.arange(n + pad, dtype=jnp.int32)
    valid = positions < n
    scores = jnp.pad(scores, (0, pad))
    segments = jnp.pad(segments, (0, pad), constant_values=-1)
    block_scores, block_pos, block_segments, block_valid = (
        x.reshape(num_blocks, scan_block) for x in (scores, positions, segments, valid))

    # Per-block summaries: the block's keys of its last document, top R, sorted.
    in_last_doc = block_valid & (block_segments == block_segments[:, -1:])
    summary_scores, summary_pos = _sorted_desc(jnp.where(in_last_doc, block_scores, -jnp.inf),
                                               jnp.where(in_last_doc, block_pos, -1))
    width = max(buffer_size, scan_block)
    summary_scores = jnp.pad(summary_scores, [(0, 0), (0, width - scan_block)], constant_values=-jnp.inf)
    summary_pos = jnp.pad(summary_pos, [(0, 0), (0, width - scan_block)], constant_values=-1)
    summary = (summary_scores[:, :buffer_size], summary_pos[:, :buffer_size],
               jnp.max(summary_scores[:, buffer_size:], axis=-1, initial=-jnp.inf),
               block_segments[:, 0], block_segments[:, -1],
               jnp.any(block_segments[:, 1:] != block_segments[:, :-1], axis=-1))
    inclusive = lax.associative_scan(_merge_summaries, summary, axis=0)
    empty = (jnp.full((1, buffer_size), -jnp.inf, jnp.float32), jnp.full((1, buffer_size), -1, jnp.int32),
             jnp.full((1,), -jnp.inf, jnp.float32), jnp.full((1,), -2, jnp.int32), jnp.full((1,), -2, jnp.int32),
             jnp.zeros((1,), bool))
    buffers = tuple(jnp.concatenate([e, x[:-1]], axis=0) for e, x in zip(empty, inclusive))  # before each block

    # The block's own keys in (score, position) order, with their document ids.
    new_scores, new_pos = _sorted_desc(jnp.where(block_valid, block_scores, -jnp.inf),
                                       jnp.where(block_valid, block_pos, -1))
    new_segment = jnp.take_along_axis(block_segments, jnp.maximum(new_pos - block_pos[:, :1], 0), axis=1)
    blocks = _Block(buffers[0], buffers[1], buffers[2], buffers[4], new_scores, new_pos, new_segment,
                    jnp.where(block_valid, block_pos, n), block_segments)
    anchor_rows = tuple(range(anchor_offset, scan_block, block_size))
    stats, anchors = jax.vmap(functools.partial(_block_statistics, topk=topk, anchor_rows=anchor_rows,
                                                anchor_count=anchor_count))(blocks)
    return tuple(x.reshape(-1)[:n] for x in stats), anchors.reshape(-1, anchor_count)


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


@functools.partial(jax.jit, static_argnames=("topk", "window", "buffer_size", "block_size", "scan_block"))
def blocked_thresholds(scores, segments, *, topk, window, buffer_size, block_size,
                       scan_block=None) -> BlockedThresholds:
    """Thresholds of every query plus per-query-block anchors. scores float32 ``[batch, seq, kv_heads]``,
    segments int32 ``[batch, seq]``, ``1 <= topk``, ``topk <= buffer_size`` unless ``topk >= seq``.
    ``block_size``: queries per attention block (one anchor list each); ``scan_block``: keys per scan block,
    a multiple of ``block_size``, by default ``block_size`` itself: on the H200 at 64k tokens
    (benchmarks/results/gpu_breakdown.json) 64 keys took 25 ms, 128 keys 30 ms, 256 keys 41 ms; the
    per-position work grows with the block faster than the scan over blocks shrinks."""
    seq = scores.shape[1]
    scan_block = block_size if scan_block is None else scan_block
    if scan_block % block_size:
        raise ValueError(f"scan_block: expected a multiple of block_size={block_size}, received {scan_block}")
    num_blocks = -(-seq // block_size)
    anchor_count = min(topk, seq)
    # Query block c starts at i0 = c B; its candidates are the key prefix t = i0 - window, which sits at
    # the same offset of key block c - shift for every c.
    anchor_offset = (-window) % block_size
    shift = (window + anchor_offset) // block_size
    rows = jnp.moveaxis(scores, 2, 1)  # [batch, kv_heads, seq]
    row_fn = lambda u, s: _prefix_stats_row(u, s, topk=topk, buffer_size=buffer_size, block_size=block_size,
                                           scan_block=scan_block, anchor_offset=anchor_offset,
                                           anchor_count=anchor_count)
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
        block_size=block_size, scan_block=block_size)
    if return_info:
        return tau, theta, ThresholdInfo(theta_pos, num_fractional, exact)
    return tau, theta
