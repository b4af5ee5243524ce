"""Per-query SparseK thresholds over growing candidate prefixes, in time linear in the sequence
(``prefix_thresholds``), and what the blocked attention reads of them (``blocked_thresholds``: thresholds,
tie positions and each query block's anchors), with their custom VJP.

The algorithm (docs/operator.md): the keys are cut into chunks; each chunk's buffer, the top ``R`` keys before
it in its document, comes from an exclusive scan of per-chunk summaries; then one lane per chunk replays the
chunk key by key (an event simulation). The steps live in ``sparsek_kernels``: the shared math in
``simulation``, the plain-XLA path in ``thresholds_xla`` and the Pallas GPU kernels, their twins, in
``thresholds_pallas``; this module prepares their inputs and picks the twin (``threshold_steps``).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sparsek_jax import validation
from sparsek_jax.block_sizes import BlockSizes
from sparsek_kernels import simulation, thresholds_pallas, thresholds_xla
from sparsek_kernels.common import count_leading, is_selected

__all__ = ["ThresholdInfo", "prefix_thresholds", "default_buffer_size", "is_selected", "resolve_buffer_size"]


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


def resolve_buffer_size(buffer_size: int | None, *, topk: int, seq: int | None, name: str = "buffer_size"):
    """The buffer size to use: ``buffer_size`` if it holds the ``min(topk, seq)`` best scores a query selects
    (at least 1; with ``seq=None``, meaning any length, ``topk``), else a ``ValueError`` naming ``name``;
    ``None`` gives ``default_buffer_size(topk, seq)`` (``None`` again when ``seq`` is unknown)."""
    if buffer_size is None:
        return None if seq is None else default_buffer_size(topk, seq)
    buffer_size = validation.check_nonnegative_int(name, buffer_size)
    least, rule = (max(topk, 1), "topk") if seq is None else (min(max(topk, 1), seq), "min(topk, seq)")
    if buffer_size < least:
        raise ValueError(f"{name}: expected None or at least {rule}={least}, received {buffer_size}")
    return buffer_size


def _sorted_desc(scores, pos):
    """Sorts by (score, position), descending, along the last axis."""
    neg_scores, neg_pos = lax.sort((-scores, -pos), dimension=-1, num_keys=2)
    return -neg_scores, -neg_pos


class BlockedThresholds(NamedTuple):
    """Everything the blocked attention needs from the thresholds (internal to the fast paths).

    tau, theta, theta_pos, num_fractional, exact: ``[batch, seq, kv_heads]`` as in ``prefix_thresholds``.
    anchors: int32 ``[batch, kv_heads, ceil(seq / block_size), min(topk, seq)]``: for the query block
      starting at ``i0 = c * block_size``, the positions of its first query's selected keys ``S_{i0}``
      (``-1`` for empty slots). Every key a query of the block selects is either here or among the
      ``block_size - 1`` candidates that enter after ``i0``.
    """

    tau: jax.Array
    theta: jax.Array
    theta_pos: jax.Array
    num_fractional: jax.Array
    exact: jax.Array
    anchors: jax.Array


class _Chunks(NamedTuple):
    """The sorted lists and per-chunk scalars of every lane (rows x chunks, flattened)."""

    lists: simulation.Lists
    info: simulation.LaneInfo
    chunk_cut: simulation.Cut
    start_cut: simulation.Cut
    a_pos: jax.Array    # [rows, chunks, R]
    q_z: jax.Array      # [rows, chunks, C]
    q_pos: jax.Array
    q_seg: jax.Array


class ThresholdSteps(NamedTuple):
    """The heavy steps, in plain XLA (``sparsek_kernels.thresholds_xla``) or as Pallas GPU kernels (their twins
    in ``sparsek_kernels.thresholds_pallas``), and the small prefix scans: rolled on the XLA path (CPU and TPU
    compile one program for every length), work-efficient with the kernels."""

    exclusive_scan: Callable
    cut_states: Callable
    lanes: Callable
    prefix_scan: Callable


def threshold_steps(implementation: str, interpret: bool,
                    launch: thresholds_pallas.Launch = thresholds_pallas.DEFAULT_LAUNCH) -> ThresholdSteps:
    """The steps of ``implementation`` (``"xla"`` or ``"pallas_gpu"``); ``launch``: the kernels' launch
    parameters (ignored by ``"xla"``)."""
    if implementation == "pallas_gpu":
        return ThresholdSteps(
            functools.partial(thresholds_pallas.pallas_exclusive_scan, interpret=interpret,
                              num_warps=launch.scan_warps),
            functools.partial(thresholds_pallas.pallas_cut_states, interpret=interpret,
                              num_warps=launch.cut_state_warps),
            functools.partial(thresholds_pallas.pallas_lanes, interpret=interpret,
                              lanes_per_program=launch.lanes_per_program, num_warps=launch.lane_warps),
            lax.associative_scan)
    return ThresholdSteps(thresholds_xla.xla_exclusive_scan, thresholds_xla.xla_cut_states, thresholds_xla.xla_lanes,
                          thresholds_xla.doubling_scan)


def prepare_chunks(scores, segments, *, topk: int, buffer_size: int, chunk: int,
                    backend: ThresholdSteps = threshold_steps("xla", False)) -> _Chunks:
    """Sorted chunk lists, start buffers (an exclusive scan of per-chunk top-R summaries), document
    counts and the cut states every lane starts from. scores float32 [rows, seq], segments int32 [rows, seq]."""
    rows, seq = scores.shape
    R, C = buffer_size, chunk
    num_chunks = -(-seq // C)
    pad = num_chunks * C - seq
    pos = jnp.broadcast_to(jnp.arange(num_chunks * C, dtype=jnp.int32), (rows, num_chunks * C))
    valid = pos < seq
    z = jnp.pad(scores, [(0, 0), (0, pad)], constant_values=-jnp.inf)
    seg = jnp.pad(segments, [(0, 0), (0, pad)], constant_values=-1)
    pos = jnp.where(valid, pos, -1)
    chunked = lambda x: x.reshape(rows, num_chunks, C)
    starts = jnp.arange(num_chunks, dtype=jnp.int32) * C
    with jax.named_scope("sort_chunks"):
        q_z, q_pos = _sorted_desc(chunked(z), chunked(pos))
        q_seg = jnp.where(q_pos >= 0, jnp.take_along_axis(chunked(seg), jnp.maximum(q_pos - starts[:, None], 0),
                                                          axis=2), -1)

    # Per-chunk summaries: the top R keys of the chunk's last document, then an exclusive scan.
    with jax.named_scope("start_buffers"):
        last = jnp.minimum(starts + C, seq) - 1
        last_seg = seg[:, last]                                             # [rows, chunks]
        in_last = (q_pos >= 0) & (q_seg == last_seg[..., None])
        width = max(R, C)
        dest = jnp.where(in_last, jnp.cumsum(in_last, axis=2) - 1, width)
        place = lambda x, fill: jax.vmap(jax.vmap(lambda v, d: jnp.full((width,), fill, x.dtype).at[d].set(
            v, mode="drop")))(x, dest)
        summary_z, summary_pos = place(q_z, -jnp.inf), place(q_pos, -1)
        change = (seg[:, 1:] != seg[:, :-1]) & valid[:, 1:]
        chunk_change = jnp.pad(change, [(0, 0), (0, 1)]).reshape(rows, num_chunks, C)[:, :, :C - 1]
        docs = jnp.stack([seg[:, starts], last_seg, jnp.any(chunk_change, axis=-1).astype(jnp.int32),
                          jnp.zeros_like(last_seg)], axis=-1)
        summary = simulation.Summaries(summary_z[..., :R], summary_pos[..., :R],
                                       jnp.max(summary_z[..., R:], axis=-1, initial=-jnp.inf, keepdims=True), docs)
        buffers = backend.exclusive_scan(summary)
        a_z, a_pos, a_dropped, a_doc = buffers.z, buffers.pos, buffers.dropped[..., 0], buffers.docs[..., 1]
        a_count = jnp.sum(a_pos >= 0, axis=-1, dtype=jnp.int32)

    # Keys of the current document before each position; where each chunk's first cut begins.
    with jax.named_scope("document_counts"):
        doc_start = backend.prefix_scan(jnp.maximum, jnp.where(jnp.pad(change, [(0, 0), (1, 0)]), pos, 0), axis=1)
        local = pos - doc_start                                               # [rows, padded seq]
        count0 = jnp.where(starts > 0, local[:, jnp.maximum(starts - 1, 0)] + 1, 0)
        begins = chunked(valid & (local == topk))
        cut_pos = jnp.where(jnp.any(begins, axis=2), starts + jnp.argmax(begins, axis=2).astype(jnp.int32), -1)

    # The cut state at each chunk's start and at its first cut.
    with jax.named_scope("cut_states"):
        cut_doc = jnp.take_along_axis(seg, jnp.maximum(cut_pos, 0), axis=1)
        scalars = jnp.stack([a_count, a_doc, cut_pos, cut_doc], axis=-1).reshape(rows * num_chunks, 4)
        lists_of_chunks = (x.reshape((rows * num_chunks,) + x.shape[2:]) for x in (a_z, a_pos, q_z, q_pos, q_seg))
        states = backend.cut_states(*lists_of_chunks, scalars, k=topk)
        chunk_cut, start_cut = (jax.tree.map(lambda x: x.reshape(rows, num_chunks), s) for s in states)

    flat = lambda x: x.reshape(-1)
    lists = simulation.Lists(flat(a_z), flat(a_pos), flat(q_z), flat(q_pos), flat(q_seg), flat(z), flat(seg))
    length = jnp.broadcast_to(jnp.minimum(C, seq - starts), (rows, num_chunks))
    info = simulation.LaneInfo(flat(jnp.broadcast_to(starts, (rows, num_chunks))), flat(length), flat(a_count),
                          flat(a_doc), flat(a_dropped), flat(count0), flat(cut_pos))
    return _Chunks(lists, info, jax.tree.map(flat, chunk_cut), jax.tree.map(flat, start_cut), a_pos, q_z, q_pos,
                   q_seg)


def _anchor_lists(ch: _Chunks, theta, theta_pos, segments, anchor_top, *, block_size: int, anchor_offset: int,
                  anchor_count: int):
    """Per key block ``b``: the selected keys of the prefix ending at its anchor row ``b * B + anchor_offset``,
    ``[rows, key_blocks, anchor_count]`` (-1 for empty slots): the first ``anchor_top`` keys of the chunk's
    start buffer, then the chunk's arrived keys that rank at or above ``(theta, theta_pos)``."""
    rows, num_chunks, C = ch.q_z.shape
    per_chunk = C // block_size
    key_blocks = num_chunks * per_chunk
    row_pos = jnp.arange(key_blocks, dtype=jnp.int32) * block_size + anchor_offset
    seq = theta.shape[1]
    at_row = lambda x, fill: jnp.where(row_pos < seq, jnp.take(x, jnp.minimum(row_pos, seq - 1), axis=1), fill)
    th, th_pos, row_seg = at_row(theta, jnp.inf), at_row(theta_pos, seq), at_row(segments, -3)
    # Every key block reads its chunk's lists: a broadcast (which XLA fuses into the consumers), not a gather.
    per_block = lambda x: jnp.broadcast_to(x[:, :, None], (rows, num_chunks, per_chunk) + x.shape[2:]).reshape(
        (rows, key_blocks) + x.shape[2:])
    q_z, q_pos, q_seg = (per_block(x) for x in (ch.q_z, ch.q_pos, ch.q_seg))   # [rows, key_blocks, C]
    chosen = ((q_pos >= 0) & (q_pos <= row_pos[:, None]) & (q_seg == row_seg[..., None])
              & is_selected(q_z, q_pos, th[..., None], th_pos[..., None]))
    anchor_top = jnp.where(row_pos < seq, anchor_top, 0)  # rows past the sequence were never emitted
    slot = jnp.arange(anchor_count, dtype=jnp.int32)
    from_buffer = per_block(ch.a_pos[:, :, :anchor_count])
    anchors = jnp.where(slot < anchor_top[..., None], from_buffer, -1)
    dest = jnp.where(chosen, anchor_top[..., None] + jnp.cumsum(chosen, axis=2) - 1, anchor_count)
    return jax.vmap(jax.vmap(lambda row, d, p: row.at[d].set(p, mode="drop")))(anchors, dest, q_pos)


@functools.partial(jax.jit, static_argnames=("topk", "window", "buffer_size", "block_size", "scan_block",
                                             "implementation", "interpret", "with_anchors", "launch"))
def blocked_thresholds(scores, segments, *, topk, window, buffer_size, block_size, scan_block,
                       implementation="xla", interpret=False, with_anchors=True,
                       launch: thresholds_pallas.Launch = thresholds_pallas.DEFAULT_LAUNCH) -> BlockedThresholds:
    """Thresholds of every query plus per-query-block anchors. scores float32 ``[batch, seq, kv_heads]``,
    segments int32 ``[batch, seq]``, ``topk >= 1``, ``buffer_size >= min(topk, seq)`` (raised to
    ``topk + 1`` inside where smaller: a buffer must hold the k-th key and the next). ``block_size``: queries
    per attention block (one anchor list each); ``scan_block``: keys per chunk (one lane each), a multiple of
    ``block_size``. ``implementation``: ``"xla"`` or ``"pallas_gpu"`` (the
    Pallas GPU kernels; ``interpret=True``: interpret mode; ``launch``: their launch parameters).
    ``with_anchors=False`` leaves ``anchors`` None."""
    batch, seq, kv_heads = scores.shape
    if scan_block % block_size:
        raise ValueError(f"scan_block: expected a multiple of block_size={block_size}, received {scan_block}")
    num_blocks = -(-seq // block_size)
    anchor_count = min(topk, seq)
    if batch * seq * kv_heads == 0:
        shape = (batch, seq, kv_heads)
        return BlockedThresholds(jnp.full(shape, -jnp.inf), jnp.full(shape, -jnp.inf), jnp.full(shape, -1, jnp.int32),
                                 jnp.zeros(shape, jnp.int32), jnp.ones(shape, bool),
                                 jnp.zeros((batch, kv_heads, num_blocks, anchor_count), jnp.int32)
                                 if with_anchors else None)
    # Query block c starts at i0 = c B; its candidates are the key prefix t = i0 - window, which sits at
    # the same offset of key block c - shift for every c.
    anchor_offset = (-window) % block_size
    shift = (window + anchor_offset) // block_size
    rows = batch * kv_heads
    # -0.0 and 0.0 compare equal but sort apart; one zero keeps the (score, position) order a total order.
    u = jnp.moveaxis(scores, 2, 1).reshape(rows, seq)
    u = jnp.where(u == 0.0, 0.0, u)
    seg = jnp.broadcast_to(segments[:, None, :], (batch, kv_heads, seq)).reshape(rows, seq)
    R = max(buffer_size, min(topk + 1, seq))
    backend = threshold_steps(implementation, interpret, launch)
    ch = prepare_chunks(u, seg, topk=topk, buffer_size=R, chunk=scan_block, backend=backend)
    with jax.named_scope("lanes"):
        out = backend.lanes(ch.lists, ch.info, ch.chunk_cut, ch.start_cut, k=topk, buffer_size=R, chunk=scan_block,
                            block=block_size, anchor_offset=anchor_offset)
    per_key = lambda x: x.reshape(rows, -1)[:, :seq]
    tau, theta, theta_pos, num_fractional, exact = (per_key(x) for x in out[:5])
    anchors = None
    if with_anchors:
        with jax.named_scope("anchor_lists"):
            anchors = _anchor_lists(ch, theta, theta_pos, seg, out.anchor_top.reshape(rows, -1),
                                    block_size=block_size, anchor_offset=anchor_offset, anchor_count=anchor_count)
            anchors = anchors.reshape(batch, kv_heads, -1, anchor_count)
            anchors = jnp.concatenate([jnp.full((batch, kv_heads, shift, anchor_count), -1, jnp.int32), anchors],
                                      axis=2)[:, :, :num_blocks]

    # Query i reads key prefix t = i - window, if that key exists and is in i's document.
    source = jnp.arange(seq) - window
    has_candidates = (source >= 0)[None, :] & (
        jnp.take(segments, jnp.maximum(source, 0), axis=1) == segments)  # [batch, seq]
    if with_anchors:
        anchors = jnp.where(has_candidates[:, ::block_size][:, None, :, None], anchors, -1)
    empty_values = (-jnp.inf, -jnp.inf, -1, 0, True)

    def per_query(stat, empty):
        stat = stat.reshape(batch, kv_heads, seq)
        shifted = jnp.take(stat, jnp.maximum(source, 0), axis=2)  # [batch, kv_heads, seq]
        shifted = jnp.where(has_candidates[:, None, :], shifted, jnp.asarray(empty, shifted.dtype))
        return jnp.moveaxis(shifted, 1, 2)

    with jax.named_scope("shift_to_queries"):
        tau, *rest = (per_query(s, e) for s, e in zip((tau, theta, theta_pos, num_fractional, exact), empty_values))
        tau = running_max_within_documents(tau, segments, scan=backend.prefix_scan)
    return BlockedThresholds(tau, *rest, anchors)


def document_index(segments):
    """int32 ``[batch, seq]``: 0 for the first document of a row, +1 at every change of segment id."""
    change = jnp.concatenate([jnp.zeros_like(segments[:, :1]), segments[:, 1:] != segments[:, :-1]], axis=1)
    return jnp.cumsum(change.astype(jnp.int32), axis=1)


def running_max_within_documents(values, segments, *, scan=lax.associative_scan):
    """Running maximum along ``seq`` of ``[batch, seq, heads]`` values, restarting at each document.

    Mathematically ``tau`` never decreases within a document; recomputing it from a different candidate
    set can round one ulp lower. The running maximum restores the exact monotonicity that the backward
    pass relies on (it binary-searches ``tau``) at a cost of at most an ulp.
    """
    docs = jnp.broadcast_to(document_index(segments)[:, :, None], values.shape)

    def combine(a, b):
        (doc_a, val_a), (doc_b, val_b) = a, b
        return doc_b, jnp.where(doc_a == doc_b, jnp.maximum(val_a, val_b), val_b)

    return scan(combine, (docs, values), axis=1)[1]


def fractional_range_sums(gbar, scores, tau, segments, window):
    """``sum_i [l in M_i] gbar_i`` for every key ``l``. gbar, scores, tau: [b, hkv, seq]; segments [b, seq].

    The queries with ``l`` among their candidates are ``[l + window, end of l's document)``; along them tau
    never decreases, so ``0 < u_l - tau_i < 1`` holds on one contiguous sub-range, found by binary search.
    """
    b, h, seq = scores.shape
    docs = document_index(segments)
    # End of each position's document: first index whose document index is larger.
    positions = jnp.arange(seq, dtype=jnp.int32)
    end = jax.vmap(lambda d: jnp.searchsorted(d, d, side="right"))(docs).astype(jnp.int32)  # [b, seq]
    start = jnp.broadcast_to(jnp.minimum(positions + window, end)[:, None, :], (b, h, seq))
    end = jnp.broadcast_to(end[:, None, :], (b, h, seq))
    tau_at = lambda i: jnp.take_along_axis(tau, jnp.minimum(i, seq - 1), axis=2)
    steps = int(seq).bit_length() + 1
    lo = count_leading(lambda i: scores - tau_at(i) >= 1.0, start, end, steps)
    hi = count_leading(lambda i: scores - tau_at(i) > 0.0, start, end, steps)
    prefix = jnp.concatenate([jnp.zeros((b, h, 1), gbar.dtype), jnp.cumsum(gbar, axis=2)], axis=2)
    return jnp.take_along_axis(prefix, hi, axis=2) - jnp.take_along_axis(prefix, lo, axis=2)


def prefix_thresholds(scores: jax.Array, *, topk: int, window: int, segment_ids: jax.Array | None = None,
                      buffer_size: int | None = None, chunk_size: int | None = None, return_info: bool = False,
                      implementation: str = "auto", interpret: bool = False):
    """SparseK thresholds ``tau_i`` and ``theta_i`` of every query over its candidate keys.

    Query ``i``'s candidates are ``C_i = {j : j <= i - window}`` (same segment when ``segment_ids`` is
    given; segments must be contiguous runs, as packing produces).

    Args:
      scores: ``[batch, seq, kv_heads]`` key scores ``u`` (any float dtype; float32 inside). Finite: concrete
        arrays with a non-finite entry are rejected; under a trace such a row gets NaN thresholds.
      topk: budget ``k >= 0`` (Python int).
      window: sliding-window length ``w >= 0``; the window's keys are not candidates.
      segment_ids: optional int ``[batch, seq]`` document ids, contiguous runs (see ``sparsek_attention``).
      buffer_size: ``R >= topk``, the bounded buffer of top scores (default ``default_buffer_size``).
      chunk_size: keys per chunk (one lane of the event simulation each; default 256, at most ``seq``).
      return_info: also return a ``ThresholdInfo``.
      implementation: ``"xla"``, ``"pallas_gpu"`` (the GPU kernels; ``interpret=True`` runs them in Pallas
        interpret mode on any backend) or ``"auto"`` (``pallas_gpu`` on GPUs, ``xla`` elsewhere).
      interpret: Pallas interpret mode for ``implementation="pallas_gpu"``.

    Returns:
      ``(tau, theta)``, float32 ``[batch, seq, kv_heads]`` each, or ``(tau, theta, info)``.
      ``tau_i`` is the SPARSEK threshold of ``u[C_i]`` with budget ``topk`` (gates are
      ``clip(u_j - tau_i, 0, 1)``); ``theta_i`` the ``topk``-th largest score of ``C_i``. Both are ``-inf``
      when ``|C_i| <= topk`` (every candidate is selected with gate 1) and ``+inf`` when ``topk = 0``.
      Both are non-decreasing along ``seq`` within a document. Differentiable in reverse mode (a custom
      VJP; ``jax.jvp`` is not supported): ``d tau_i / d u_l`` is ``1 / |M_i|`` on the fractional keys
      ``M_i`` (0 where ``M_i`` is empty: ``tau_i`` then sits on a flat piece of ``f``, at the ``topk + 1``-th
      score, and no gate moves with it), ``d theta_i / d u_l`` is 1 on the k-th key.
    """
    topk, window = validation.check_selection_args(scores, topk, window, segment_ids)
    implementation = validation.resolve_implementation(implementation, ("auto", "xla", "pallas_gpu"))
    batch, seq, kv_heads = scores.shape
    if chunk_size is None:
        chunk_size = max(1, min(BlockSizes.default("xla").threshold_chunk, seq))
    chunk_size = validation.check_nonnegative_int("chunk_size", chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, received {chunk_size}")
    buffer_size = resolve_buffer_size(buffer_size, topk=topk, seq=seq)

    shape = (batch, seq, kv_heads)
    if topk == 0 or seq == 0:
        tau = jnp.full(shape, jnp.inf, jnp.float32)
        info = ThresholdInfo(jnp.full(shape, seq, jnp.int32), jnp.zeros(shape, jnp.int32),
                             jnp.ones(shape, bool))
        return (tau, tau, info) if return_info else (tau, tau)

    segments = (jnp.zeros((batch, seq), jnp.int32) if segment_ids is None
                else document_index(jnp.asarray(segment_ids, jnp.int32)))
    options = _Options(topk, window, buffer_size, chunk_size, implementation, interpret)
    tau, theta, theta_pos, num_fractional, exact = _differentiable_thresholds(scores, segments, options)
    bad = validation.nonfinite_rows(scores)[:, None, :]  # the finite-scores contract, broken: NaN
    tau, theta = (jnp.where(bad, jnp.nan, x) for x in (tau, theta))
    if return_info:
        return tau, theta, ThresholdInfo(theta_pos, num_fractional, exact)
    return tau, theta


class _Options(NamedTuple):
    topk: int
    window: int
    buffer_size: int
    chunk_size: int
    implementation: str
    interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _differentiable_thresholds(scores, segments, options: _Options):
    th = blocked_thresholds(jnp.asarray(scores, jnp.float32), segments, topk=options.topk, window=options.window,
                            buffer_size=options.buffer_size, block_size=options.chunk_size,
                            scan_block=options.chunk_size, implementation=options.implementation,
                            interpret=options.interpret, with_anchors=False)
    return th.tau, th.theta, th.theta_pos, th.num_fractional, th.exact


def _thresholds_fwd(scores, segments, options: _Options):
    out = _differentiable_thresholds(scores, segments, options)
    return out, (scores, segments, out)


def _thresholds_bwd(options: _Options, residuals, cotangents):
    """``d tau_i / d u_l = [l in M_i] / |M_i|`` (the SPARSEK VJP through the closed form) and
    ``d theta_i / d u_l = [l = theta_pos_i]``; the integer outputs carry no gradient."""
    scores, segments, (tau, theta, theta_pos, num_fractional, _) = residuals
    g_tau, g_theta = cotangents[0], cotangents[1]
    batch, seq, heads = scores.shape
    gbar = jnp.where(jnp.isfinite(tau) & (num_fractional > 0), g_tau / jnp.maximum(num_fractional, 1), 0.0)
    heads_first = lambda x: jnp.moveaxis(x, 2, 1)
    through_tau = fractional_range_sums(heads_first(gbar), heads_first(jnp.asarray(scores, jnp.float32)),
                                        heads_first(tau), segments, options.window)
    chosen = jnp.isfinite(theta) & (theta_pos >= 0) & (theta_pos < seq)
    target = jnp.where(chosen, theta_pos, seq)  # seq: dropped
    scatter = lambda g, t: jnp.zeros((seq + 1,), jnp.float32).at[t].add(g)[:seq]
    through_theta = jax.vmap(jax.vmap(scatter))(heads_first(jnp.where(chosen, g_theta, 0.0)), heads_first(target))
    d_scores = jnp.moveaxis(through_tau + through_theta, 1, 2)
    return d_scores.astype(scores.dtype), None


_differentiable_thresholds.defvjp(_thresholds_fwd, _thresholds_bwd)
