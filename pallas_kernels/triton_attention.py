"""SparseK attention as Triton kernels (``@triton.jit``), launched through ``jax_triton.triton_call``.

Rows and tiles. The query rows of one (batch, KV head) are its ``(query, head)`` pairs in query-major order:
row ``r`` is query ``r // group``, query head ``h * group + r % group``. A *row tile* is ``rows`` consecutive
rows (a power of two), so every KV group size fills whole tiles without padding heads, and every key loaded
serves ``rows`` rows whatever the group size. Row tile ``t`` holds queries ``i_first .. i_last``; its *anchor
block* is ``c = i_first // anchor_block`` (the thresholds give one anchor list per block of ``anchor_block``
queries: the keys selected by the block's first query ``c * anchor_block``). Every key a row of the tile
attends to is then either in the *band* ``[band_start, i_last]`` with
``band_start = max(c * anchor_block - window + 1, 0)`` (the windows and the candidates that enter after the
block's first query) or one of the block's anchors, which are all older than ``band_start``: the two sets are
disjoint and nothing is counted twice.

Masks. Inside the band, a step of ``block_k`` keys that lies in the window of every row of the tile, in one
document, needs no mask and no gate (*interior* steps: plain FlashAttention); the steps at the two edges of
the band and the anchor steps rebuild the pattern per (row, key) from positions, documents, ``u``, ``tau``,
``theta`` and ``theta_pos`` (``_pair_gates``: the rule of ``sparsek_kernels.common.pair_gates``). Softmax runs
in base 2 (``exp2``) with the scale folded into the logits; the log-sum-exp is stored in natural log.

Kernels (one program per row tile, or per key block, of each (batch, KV head); launched in runs of consecutive
tiles of each (batch, KV head) in turn, ``_program``):

- ``forward``: one program per row tile; band steps then anchor steps, one online softmax over both; value
  gating multiplies the probabilities by the gates in the output accumulator only (the denominator is the
  plain softmax's). Writes the output and the log-sum-exp in the library's layout.
- ``backward_queries``: one program per row tile, the same walk: ``dq`` and the per-row sum of gate
  gradients over fractional keys over band and anchors, ``D = dO . o`` of its rows; for the anchors also
  ``dk``, ``dv`` and the direct term of ``du``, added into float32 accumulators by atomics.
- ``backward_keys``: one program per block of ``rows`` keys, key-major over the band: it loops over the rows
  of the tiles whose band holds its keys (``backward_block_k`` rows per step), accumulates ``dk``, ``dv`` and
  ``du`` in registers, adds the anchors' part left by ``backward_queries`` and writes each key's gradient
  once. No partial sums.

Every array is addressed in the library's layout (``[batch, seq, heads, head_dim]``, ``[batch, seq, heads]``,
``[batch, seq]``), so no layout copies surround the kernels. ``head_dim`` is padded to a power of two of at
least 16 inside the kernels (masked loads). The kernels know nothing of the library above them.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from sparsek_kernels import triton_interpret

__all__ = ["Launch", "GATES", "forward", "backward_queries", "backward_keys"]

GATES = {"value": 0, "logit": 1, "none": 2}
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_FLOOR = tl.constexpr(-1.0e30)  # the running maximum's start: finite, so exp2(-inf - floor) = 0, never NaN
_TINY = tl.constexpr(1.1754943508222875e-38)  # float32 tiny: guards log2 of a zero gate
_RUN = tl.constexpr(8)  # consecutive tiles per (batch, KV head) in the launch order (``_program``)


class Launch(NamedTuple):
    """Launch parameters (sizes: powers of two, at least 16): ``rows`` per row tile; ``block_k`` keys per step
    of the forward; ``backward_block_k`` the backward's step: keys per step of ``backward_queries``, rows per
    step of ``backward_keys`` (whose programs own ``rows`` keys; at most ``rows``); Triton's ``num_warps`` and
    ``num_stages`` (software pipelining of the loads; gathered loads are pipelined only from 3 stages on)."""

    rows: int
    block_k: int
    backward_block_k: int
    num_warps: int
    num_stages: int


# -- device functions -------------------------------------------------------------------------------------------

@triton.jit
def _tile_span(t, SEQ: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, ANCHOR_BLOCK: tl.constexpr,
               WINDOW: tl.constexpr):
    """First and last query of row tile ``t``, its anchor block and the first key of its band."""
    i_first = (t * ROWS) // GROUP
    i_last = tl.minimum((t * ROWS + ROWS - 1) // GROUP, SEQ - 1)
    c = i_first // ANCHOR_BLOCK
    band_start = tl.maximum(c * ANCHOR_BLOCK - WINDOW + 1, 0)
    return i_first, i_last, c, band_start


@triton.jit
def _program(NUM_TILES: tl.constexpr, BATCH_HEADS: tl.constexpr):
    """This program's (batch, KV head) row and tile. Programs run in runs of ``_RUN`` consecutive tiles per
    (batch, KV head), every (batch, KV head) in turn: the tiles that run together share their keys in L2 (a
    band of ``window`` keys serves several consecutive tiles) and spread the anchors' atomics over many rows."""
    pid = tl.program_id(0)
    run = pid // (_RUN * BATCH_HEADS)
    tiles = tl.minimum(_RUN, NUM_TILES - run * _RUN)  # the last run may be shorter
    within = pid - run * _RUN * BATCH_HEADS
    return within // tiles, run * _RUN + within % tiles


@triton.jit
def _row_positions(h, t, SEQ: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr):
    """Per row of tile ``t`` ``[ROWS]``: its query, query head and validity."""
    r = t * ROWS + tl.arange(0, ROWS)
    i = r // GROUP
    return i, h * GROUP + r % GROUP, i < SEQ


@triton.jit
def _row_selection(b, h, i, ok, seg_ptr, tau_ptr, theta_ptr, theta_pos_ptr, SEQ: tl.constexpr,
                   HEADS_KV: tl.constexpr):
    """Per row: the query's document (-2 on padding rows, so that no key matches), ``tau``, ``theta``,
    ``theta_pos``."""
    per_kv = (b * SEQ + i) * HEADS_KV + h
    seg = tl.load(seg_ptr + b * SEQ + i, mask=ok, other=-2)
    tau = tl.load(tau_ptr + per_kv, mask=ok, other=float("inf"))
    theta = tl.load(theta_ptr + per_kv, mask=ok, other=float("inf"))
    theta_pos = tl.load(theta_pos_ptr + per_kv, mask=ok, other=SEQ)
    return seg, tau, theta, theta_pos


@triton.jit
def _offsets(b, pos, head, SEQ: tl.constexpr, HEADS: tl.constexpr):
    """Index of ``[b, pos, head]`` in a ``[batch, seq, heads]`` array (int32: tokens * heads < 2**31)."""
    return (b * SEQ + pos) * HEADS + head


@triton.jit
def _load_vectors(ptr, b, pos, head, ok, SEQ: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, CHECK: tl.constexpr):
    """Rows ``[n, BLOCK_D]`` of a ``[batch, seq, heads, HEAD_DIM]`` array (zeros where ``ok`` is false or past
    ``HEAD_DIM``; ``CHECK=False``: every row is known valid)."""
    d = tl.arange(0, BLOCK_D)
    ptrs = ptr + _offsets(b, pos, head, SEQ, HEADS).to(tl.int64)[:, None] * HEAD_DIM + d[None, :]
    if CHECK:
        return tl.load(ptrs, mask=ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    elif BLOCK_D == HEAD_DIM:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=(d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _store_vectors(ptr, x, b, pos, head, ok, SEQ: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    ptrs = ptr + _offsets(b, pos, head, SEQ, HEADS).to(tl.int64)[:, None] * HEAD_DIM + d[None, :]
    tl.store(ptrs, x, mask=ok[:, None] & (d < HEAD_DIM)[None, :])


@triton.jit
def _keys(b, h, j, ok, k_ptr, v_ptr, u_ptr, seg_ptr, SEQ: tl.constexpr, HEADS_KV: tl.constexpr,
          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK: tl.constexpr):
    """K and V rows ``[n, BLOCK_D]``, scores and documents (-1 on invalid keys) of keys ``j`` ``[n]``."""
    k = _load_vectors(k_ptr, b, j, h, ok, SEQ, HEADS_KV, HEAD_DIM, BLOCK_D, CHECK)
    v = _load_vectors(v_ptr, b, j, h, ok, SEQ, HEADS_KV, HEAD_DIM, BLOCK_D, CHECK)
    u = tl.load(u_ptr + _offsets(b, j, h, SEQ, HEADS_KV), mask=ok, other=0.0)
    seg = tl.load(seg_ptr + b * SEQ + j, mask=ok, other=-1)
    return k, v, u, seg


@triton.jit
def _pair_gates(i, seg_i, tau, theta, theta_pos, j, u_j, seg_j, WINDOW: tl.constexpr, ANCHORS: tl.constexpr):
    """Allowed pairs and gates of queries x keys (any broadcasting shapes). Window keys ``i - WINDOW < j <= i``
    have gate 1; selected candidates (``j <= i - WINDOW`` and ``(u_j, j) >= (theta_i, theta_pos_i)``) have gate
    ``clip(u_j - tau_i, 0, 1)``; nothing crosses documents. ``ANCHORS``: every key is older than every query's
    window (the anchors of a tile). Off the pattern the gate is left unmasked: the probability is 0 there."""
    selected = (seg_j == seg_i) & ((u_j > theta) | ((u_j == theta) & (j >= theta_pos)))
    gate = tl.minimum(tl.maximum(u_j - tau, 0.0), 1.0)
    if ANCHORS:
        allowed = selected
    else:
        in_window = (seg_j == seg_i) & (j <= i) & (j > i - WINDOW)
        allowed = in_window | (selected & (j <= i - WINDOW))
        gate = tl.where(in_window, 1.0, gate)
    return allowed, gate


@triton.jit
def _logits(q, k, allowed, gate, qk_scale, MASKED: tl.constexpr, GATE: tl.constexpr, PRECISION: tl.constexpr):
    """Base-2 logits ``[rows, keys]`` (``qk_scale`` = scale * log2(e)); masked steps add the log-gates for
    logit gating and set pairs off the pattern to -inf, so that their probabilities are exactly 0 and the mask
    need not stay live."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        if GATE == 1:
            s += tl.log2(tl.maximum(gate, _TINY))
        s = tl.where(allowed, s, float("-inf"))
    return s


@triton.jit
def _score_gradients(p, dp, delta, gate, MASKED: tl.constexpr, GATE: tl.constexpr):
    """``dS`` (gradient of the natural logits) and ``G`` (gradient of the gates, on fractional pairs) from
    ``p``, ``dp = dO . v`` and ``delta = dO . o`` (broadcasting). A pair is fractional (its gate moves) where
    ``0 < gate < 1`` and ``p > 0``: window keys have gate 1 and pairs off the pattern ``p = 0``. Unmasked steps
    have gate 1 throughout."""
    if MASKED and GATE == 0:  # o = sum_j P_ij g_ij v_j
        ds = p * (gate * dp - delta)
        g = tl.where((gate > 0.0) & (gate < 1.0), p * dp, 0.0)
    else:
        ds = p * (dp - delta)
        if MASKED and GATE == 1:
            fractional = (gate > 0.0) & (gate < 1.0)
            g = tl.fdiv(tl.where(fractional, ds, 0.0), tl.where(fractional, gate, 1.0))
        else:
            g = tl.zeros_like(ds)
    return ds, g


@triton.jit
def _band_steps(b, t, seg_ptr, SEQ: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr,
                ANCHOR_BLOCK: tl.constexpr, WINDOW: tl.constexpr, BLOCK_K: tl.constexpr):
    """The band of row tile ``t`` in steps of ``BLOCK_K`` keys from ``band_start``: steps ``[0, lo)`` and
    ``[hi, n)`` need the pattern, ``[lo, hi)`` lie in every row's window in one document (no mask)."""
    i_first, i_last, c, band_start = _tile_span(t, SEQ, GROUP, ROWS, ANCHOR_BLOCK, WINDOW)
    n = tl.cdiv(i_last - band_start + 1, BLOCK_K)
    lo = tl.cdiv(tl.maximum(i_last - WINDOW + 1 - band_start, 0), BLOCK_K)  # steps from here start in all windows
    hi = tl.minimum((i_first + 1 - band_start) // BLOCK_K, n)               # steps before here end by i_first
    lo = tl.minimum(lo, hi)
    # Document ids are run indices (non-decreasing): equal at both ends means one document throughout.
    one_doc = tl.load(seg_ptr + b * SEQ + tl.minimum(band_start, i_last)) == tl.load(seg_ptr + b * SEQ + i_last)
    lo = tl.where(one_doc, lo, n)
    hi = tl.where(one_doc, hi, n)
    return c, band_start, lo, hi, n


# -- forward ----------------------------------------------------------------------------------------------------

@triton.jit
def _forward_step(acc, m, l, q, i, seg_i, tau, theta, theta_pos, b, h, j, key_ok, k_ptr, v_ptr, u_ptr, seg_ptr,
                  qk_scale, SEQ: tl.constexpr, HEADS_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, WINDOW: tl.constexpr, GATE: tl.constexpr, PRECISION: tl.constexpr,
                  MASKED: tl.constexpr, ANCHORS: tl.constexpr):
    k, v, u_j, seg_j = _keys(b, h, j, key_ok, k_ptr, v_ptr, u_ptr, seg_ptr, SEQ, HEADS_KV, HEAD_DIM, BLOCK_D,
                             MASKED)
    allowed, gate = _pair_gates(i[:, None], seg_i[:, None], tau[:, None], theta[:, None], theta_pos[:, None],
                                j[None, :], u_j[None, :], seg_j[None, :], WINDOW, ANCHORS)
    s = _logits(q, k, allowed, gate, qk_scale, MASKED, GATE, PRECISION)
    m_new = tl.maximum(m, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m - m_new)
    l = l * alpha + tl.sum(p, 1)
    if MASKED and GATE == 0:
        p = p * gate  # value gating: the numerator only
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, u_ptr, seg_ptr, anchors_ptr, tau_ptr, theta_ptr, theta_pos_ptr,
                    out_ptr, lse_ptr, BATCH: tl.constexpr, SEQ: tl.constexpr, HEADS_KV: tl.constexpr,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, WINDOW: tl.constexpr,
                    ANCHOR_BLOCK: tl.constexpr, NUM_BLOCKS: tl.constexpr, NUM_ANCHORS: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, SCALE: tl.constexpr, GATE: tl.constexpr,
                    PRECISION: tl.constexpr):
    bh, t = _program((SEQ * GROUP + ROWS - 1) // ROWS, BATCH * HEADS_KV)
    b = bh // HEADS_KV
    h = bh % HEADS_KV
    heads_q: tl.constexpr = HEADS_KV * GROUP
    i, head, ok = _row_positions(h, t, SEQ, GROUP, ROWS)
    seg_i, tau, theta, theta_pos = _row_selection(b, h, i, ok, seg_ptr, tau_ptr, theta_ptr, theta_pos_ptr, SEQ,
                                                  HEADS_KV)
    q = _load_vectors(q_ptr, b, i, head, ok, SEQ, heads_q, HEAD_DIM, BLOCK_D, True)
    qk_scale = SCALE * _LOG2E
    acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
    m = tl.full((ROWS,), _FLOOR, tl.float32)
    l = tl.zeros((ROWS,), tl.float32)
    c, band_start, lo, hi, n = _band_steps(b, t, seg_ptr, SEQ, GROUP, ROWS, ANCHOR_BLOCK, WINDOW, BLOCK_K)
    offs = tl.arange(0, BLOCK_K)
    for step in range(0, lo):
        j = band_start + step * BLOCK_K + offs
        acc, m, l = _forward_step(acc, m, l, q, i, seg_i, tau, theta, theta_pos, b, h, j, j < SEQ, k_ptr, v_ptr,
                                  u_ptr, seg_ptr, qk_scale, SEQ, HEADS_KV, HEAD_DIM, BLOCK_D, WINDOW, GATE,
                                  PRECISION, True, False)
    for step in range(lo, hi):
        j = band_start + step * BLOCK_K + offs
        acc, m, l = _forward_step(acc, m, l, q, i, seg_i, tau, theta, theta_pos, b, h, j, j < SEQ, k_ptr, v_ptr,
                                  u_ptr, seg_ptr, qk_scale, SEQ, HEADS_KV, HEAD_DIM, BLOCK_D, WINDOW, GATE,
                                  PRECISION, False, False)
    for step in range(hi, n):
        j = band_start + step * BLOCK_K + offs
        acc, m, l = _forward_step(acc, m, l, q, i, seg_i, tau, theta, theta_pos, b, h, j, j < SEQ, k_ptr, v_ptr,
                                  u_ptr, seg_ptr, qk_scale, SEQ, HEADS_KV, HEAD_DIM, BLOCK_D, WINDOW, GATE,
                                  PRECISION, True, False)
    anchors = anchors_ptr + ((b * HEADS_KV + h) * NUM_BLOCKS + c) * NUM_ANCHORS
    for step in range(0, tl.cdiv(NUM_ANCHORS, BLOCK_K)):
        j = tl.load(anchors + step * BLOCK_K + offs, mask=step * BLOCK_K + offs < NUM_ANCHORS, other=-1)
        acc, m, l = _forward_step(acc, m, l, q, i, seg_i, tau, theta, theta_pos, b, h, j, j >= 0, k_ptr, v_ptr,
                                  u_ptr, seg_ptr, qk_scale, SEQ, HEADS_KV, HEAD_DIM, BLOCK_D, WINDOW, GATE,
                                  PRECISION, True, True)
    has_keys = l > 0.0
    l_safe = tl.where(has_keys, l, 1.0)
    _store_vectors(out_ptr, acc / l_safe[:, None], b, i, head, ok, SEQ, heads_q, HEAD_DIM, BLOCK_D)
    lse = tl.where(has_keys, m * _LN2 + tl.log(l_safe), 0.0)
    tl.store(lse_ptr + _offsets(b, i, head, SEQ, heads_q), lse, mask=ok)


# -- backward, query-major: dq, the rows' gate gradients, the anchors' dk/dv/du by atomics -------------------

@triton.jit
def _backward_queries_step(dq, gsum, q, do, lse2, delta, i, seg_i, tau, theta, theta_pos, b, h, j, key_ok, k_ptr,
                           v_ptr, u_ptr, seg_ptr, dk_ptr, dv_ptr, du_ptr, qk_scale, SEQ: tl.constexpr,
                           HEADS_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           WINDOW: tl.constexpr, SCALE: tl.constexpr, GATE: tl.constexpr, PRECISION: tl.constexpr,
                           MASKED: tl.constexpr, ANCHORS: tl.constexpr):
    k, v, u_j, seg_j = _keys(b, h, j, key_ok, k_ptr, v_ptr, u_ptr, seg_ptr, SEQ, HEADS_KV, HEAD_DIM, BLOCK_D,
                             MASKED)
    allowed, gate = _pair_gates(i[:, None], seg_i[:, None], tau[:, None], theta[:, None], theta_pos[:, None],
                                j[None, :], u_j[None, :], seg_j[None, :], WINDOW, ANCHORS)
    p = tl.exp2(_logits(q, k, allowed, gate, qk_scale, MASKED, GATE, PRECISION) - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds, g = _score_gradients(p, dp, delta[:, None], gate, MASKED, GATE)
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    if MASKED and GATE != 2:
        gsum += tl.sum(g, 1)
    if ANCHORS:
        # An anchor list belongs to one anchor block, and many tiles share it: their key gradients meet in
        # float32 accumulators by atomics (backward_keys adds the band's part and writes each key once).
        # Head dim x keys: M is the head dim, not the step's keys, so the products stay on wgmma (M >= 64).
        if GATE == 0:
            p = p * gate
        dv_keys = tl.dot(tl.trans(do), p.to(do.dtype), input_precision=PRECISION)
        dk_keys = tl.dot(tl.trans(q), ds.to(q.dtype), input_precision=PRECISION) * SCALE
        d = tl.arange(0, BLOCK_D)
        vectors = _offsets(b, j, h, SEQ, HEADS_KV).to(tl.int64)[None, :] * HEAD_DIM + d[:, None]
        in_bounds = key_ok[None, :] & (d < HEAD_DIM)[:, None]
        tl.atomic_add(dk_ptr + vectors, dk_keys, mask=in_bounds, sem="relaxed")
        tl.atomic_add(dv_ptr + vectors, dv_keys, mask=in_bounds, sem="relaxed")
        if GATE != 2:
            tl.atomic_add(du_ptr + _offsets(b, j, h, SEQ, HEADS_KV), tl.sum(g, 0), mask=key_ok, sem="relaxed")
    return dq, gsum


@triton.jit
def _backward_queries_kernel(q_ptr, k_ptr, v_ptr, u_ptr, seg_ptr, anchors_ptr, tau_ptr, theta_ptr, theta_pos_ptr,
                             out_ptr, do_ptr, lse_ptr, dq_ptr, gsum_ptr, delta_ptr, dk_ptr, dv_ptr, du_ptr,
                             BATCH: tl.constexpr, SEQ: tl.constexpr, HEADS_KV: tl.constexpr, GROUP: tl.constexpr,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, WINDOW: tl.constexpr,
                             ANCHOR_BLOCK: tl.constexpr, NUM_BLOCKS: tl.constexpr, NUM_ANCHORS: tl.constexpr,
                             ROWS: tl.constexpr, BLOCK_K: tl.constexpr, SCALE: tl.constexpr, GATE: tl.constexpr,
                             PRECISION: tl.constexpr):
    bh, t = _program((SEQ * GROUP + ROWS - 1) // ROWS, BATCH * HEADS_KV)
    b = bh // HEADS_KV
    h = bh % HEADS_KV
    heads_q: tl.constexpr = HEADS_KV * GROUP
    i, head, ok = _row_positions(h, t, SEQ, GROUP, ROWS)
    seg_i, tau, theta, theta_pos = _row_selection(b, h, i, ok, seg_ptr, tau_ptr, theta_ptr, theta_pos_ptr, SEQ,
                                                  HEADS_KV)
    q = _load_vectors(q_ptr, b, i, head, ok, SEQ, heads_q, HEAD_DIM, BLOCK_D, True)
    do = _load_vectors(do_ptr, b, i, head, ok, SEQ, heads_q, HEAD_DIM, BLOCK_D, True)
    out = _load_vectors(out_ptr, b, i, head, ok, SEQ, heads_q, HEAD_DIM, BLOCK_D, True)
    row = _offsets(b, i, head, SEQ, heads_q)
    delta = tl.sum(do.to(tl.float32) * out, 1)
    tl.store(delta_ptr + row, delta, mask=ok)
    lse2 = tl.load(lse_ptr + row, mask=ok, other=0.0) * _LOG2E
    qk_scale = SCALE * _LOG2E
    dq = tl.zeros((ROWS, BLOCK_D), tl.float32)
    gsum = tl.zeros((ROWS,), tl.float32)
    c, band_start, lo, hi, n = _band_steps(b, t, seg_ptr, SEQ, GROUP, ROWS, ANCHOR_BLOCK, WINDOW, BLOCK_K)
    offs = tl.arange(0, BLOCK_K)
    for step in range(0, lo):
        j = band_start + step * BLOCK_K + offs
        dq, gsum = _backward_queries_step(dq, gsum, q, do, lse2, delta, i, seg_i, tau, theta, theta_pos, b, h, j,
                                          j < SEQ, k_ptr, v_ptr, u_ptr, seg_ptr, dk_ptr, dv_ptr, du_ptr, qk_scale,
                                          SEQ, HEADS_KV, HEAD_DIM, BLOCK_D, WINDOW, SCALE, GATE, PRECISION,
                                          True, False)
    for step in range(lo, hi):
        j = band_start + step * BLOCK_K + offs
        dq, gsum = _backward_queries_step(dq, gsum, q, do, lse2, delta, i, seg_i, tau, theta, theta_pos, b, h, j,
                                          j < SEQ, k_ptr, v_ptr, u_ptr, seg_ptr, dk_ptr, dv_ptr, du_ptr, qk_scale,
                                          SEQ, HEADS_KV, HEAD_DIM, BLOCK_D, WINDOW, SCALE, GATE, PRECISION,
                                          False, False)
    for step in range(hi, n):
        j = band_start + step * BLOCK_K + offs
        dq, gsum = _backward_queries_step(dq, gsum, q, do, lse2, delta, i, seg_i, tau, theta, theta_pos, b, h, j,
                                          j < SEQ, k_ptr, v_ptr, u_ptr, seg_ptr, dk_ptr, dv_ptr, du_ptr, qk_scale,
                                          SEQ, HEADS_KV, HEAD_DIM, BLOCK_D, WINDOW, SCALE, GATE, PRECISION,
                                          True, False)
    anchors = anchors_ptr + ((b * HEADS_KV + h) * NUM_BLOCKS + c) * NUM_ANCHORS
    for step in range(0, tl.cdiv(NUM_ANCHORS, BLOCK_K)):
        j = tl.load(anchors + step * BLOCK_K + offs, mask=step * BLOCK_K + offs < NUM_ANCHORS, other=-1)
        dq, gsum = _backward_queries_step(dq, gsum, q, do, lse2, delta, i, seg_i, tau, theta, theta_pos, b, h, j,
                                          j >= 0, k_ptr, v_ptr, u_ptr, seg_ptr, dk_ptr, dv_ptr, du_ptr, qk_scale,
                                          SEQ, HEADS_KV, HEAD_DIM, BLOCK_D, WINDOW, SCALE, GATE, PRECISION,
                                          True, True)
    _store_vectors(dq_ptr, dq * SCALE, b, i, head, ok, SEQ, heads_q, HEAD_DIM, BLOCK_D)
    tl.store(gsum_ptr + row, gsum, mask=ok)


# -- backward, key-major over the band -------------------------------------------------------------------------

@triton.jit
def _backward_keys_step(dk, dv, du, k, v, j, u_j, seg_j, b, h, step, q_ptr, do_ptr, lse_ptr, delta_ptr, seg_ptr,
                        tau_ptr, theta_ptr, theta_pos_ptr, qk_scale, SEQ: tl.constexpr, HEADS_KV: tl.constexpr,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, WINDOW: tl.constexpr,
                        ANCHOR_BLOCK: tl.constexpr, ROWS: tl.constexpr, STEP: tl.constexpr, GATE: tl.constexpr,
                        PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One step of ``STEP`` rows (inside row tile ``step * STEP // ROWS``) against the program's keys, keys x
    rows (FlashAttention-2's orientation: per-row values lie along the matrix units' N axis, so steps are
    short)."""
    heads_q: tl.constexpr = HEADS_KV * GROUP
    i, head, ok = _row_positions(h, step, SEQ, GROUP, STEP)
    q = _load_vectors(q_ptr, b, i, head, ok, SEQ, heads_q, HEAD_DIM, BLOCK_D, True)
    do = _load_vectors(do_ptr, b, i, head, ok, SEQ, heads_q, HEAD_DIM, BLOCK_D, True)
    row = _offsets(b, i, head, SEQ, heads_q)
    lse2 = tl.load(lse_ptr + row, mask=ok, other=0.0) * _LOG2E
    delta = tl.load(delta_ptr + row, mask=ok, other=0.0)
    if MASKED:
        seg_i, tau, theta, theta_pos = _row_selection(b, h, i, ok, seg_ptr, tau_ptr, theta_ptr, theta_pos_ptr,
                                                      SEQ, HEADS_KV)
        allowed, gate = _pair_gates(i[None, :], seg_i[None, :], tau[None, :], theta[None, :], theta_pos[None, :],
                                    j[:, None], u_j[:, None], seg_j[:, None], WINDOW, False)
        # Keys older than the tile's band are its anchors: backward_queries took them.
        _, _, _, band_start = _tile_span((step * STEP) // ROWS, SEQ, GROUP, ROWS, ANCHOR_BLOCK, WINDOW)
        allowed = allowed & (j >= band_start)[:, None]
    else:
        allowed, gate = None, None
    p = tl.exp2(_logits(k, q, allowed, gate, qk_scale, MASKED, GATE, PRECISION) - lse2[None, :])
    dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds, g = _score_gradients(p, dp, delta[None, :], gate, MASKED, GATE)
    if MASKED and GATE == 0:
        p = p * gate
    dv += tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
    dk += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)
    if MASKED and GATE != 2:
        du += tl.sum(g, 1)
    return dk, dv, du


@triton.jit
def _backward_keys_kernel(q_ptr, k_ptr, v_ptr, u_ptr, seg_ptr, tau_ptr, theta_ptr, theta_pos_ptr, do_ptr, lse_ptr,
                          delta_ptr, dk_in_ptr, dv_in_ptr, du_in_ptr, dk_ptr, dv_ptr, du_ptr, BATCH: tl.constexpr,
                          SEQ: tl.constexpr, HEADS_KV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_D: tl.constexpr, WINDOW: tl.constexpr, ANCHOR_BLOCK: tl.constexpr,
                          ROWS: tl.constexpr, KEYS: tl.constexpr, STEP: tl.constexpr, SCALE: tl.constexpr,
                          GATE: tl.constexpr, PRECISION: tl.constexpr):
    bh, key_block = _program((SEQ + KEYS - 1) // KEYS, BATCH * HEADS_KV)
    j0 = key_block * KEYS
    b = bh // HEADS_KV
    h = bh % HEADS_KV
    num_steps: tl.constexpr = (SEQ * GROUP + STEP - 1) // STEP
    j = j0 + tl.arange(0, KEYS)
    key_ok = j < SEQ
    k, v, u_j, seg_j = _keys(b, h, j, key_ok, k_ptr, v_ptr, u_ptr, seg_ptr, SEQ, HEADS_KV, HEAD_DIM, BLOCK_D, True)
    j_last = tl.minimum(j0 + KEYS - 1, SEQ - 1)
    # Row steps whose tile's band holds one of the keys: from the first whose last query reaches j0 to the end
    # of the last tile whose band starts by j_last (anchor block c with c * ANCHOR_BLOCK - WINDOW + 1 <= j_last).
    first = (j0 * GROUP) // STEP
    blocks = (j_last + WINDOW - 1 + ANCHOR_BLOCK) // ANCHOR_BLOCK
    last = tl.minimum(tl.cdiv(blocks * GROUP * ANCHOR_BLOCK, ROWS) * (ROWS // STEP), num_steps)
    # Steps [lo, hi) see every key in the window of every row, in one document: no mask.
    lo = tl.minimum(tl.maximum(tl.cdiv((j0 + KEYS - 1) * GROUP, STEP), first), last)
    hi = tl.minimum(tl.maximum(((j0 + WINDOW) * GROUP) // STEP, lo), last)
    i_end = tl.minimum(tl.maximum(last * STEP - 1, 0) // GROUP, SEQ - 1)
    plain = (j0 + KEYS <= SEQ) & (tl.load(seg_ptr + b * SEQ + j0) == tl.load(seg_ptr + b * SEQ + i_end))
    lo = tl.where(plain, lo, last)
    hi = tl.where(plain, hi, last)
    qk_scale = SCALE * _LOG2E
    dk = tl.zeros((KEYS, BLOCK_D), tl.float32)
    dv = tl.zeros((KEYS, BLOCK_D), tl.float32)
    du = tl.zeros((KEYS,), tl.float32)
    for step in range(first, lo):
        dk, dv, du = _backward_keys_step(dk, dv, du, k, v, j, u_j, seg_j, b, h, step, q_ptr, do_ptr, lse_ptr,
                                         delta_ptr, seg_ptr, tau_ptr, theta_ptr, theta_pos_ptr, qk_scale, SEQ,
                                         HEADS_KV, GROUP, HEAD_DIM, BLOCK_D, WINDOW, ANCHOR_BLOCK, ROWS, STEP, GATE,
                                         PRECISION, True)
    for step in range(lo, hi):
        dk, dv, du = _backward_keys_step(dk, dv, du, k, v, j, u_j, seg_j, b, h, step, q_ptr, do_ptr, lse_ptr,
                                         delta_ptr, seg_ptr, tau_ptr, theta_ptr, theta_pos_ptr, qk_scale, SEQ,
                                         HEADS_KV, GROUP, HEAD_DIM, BLOCK_D, WINDOW, ANCHOR_BLOCK, ROWS, STEP, GATE,
                                         PRECISION, False)
    for step in range(hi, last):
        dk, dv, du = _backward_keys_step(dk, dv, du, k, v, j, u_j, seg_j, b, h, step, q_ptr, do_ptr, lse_ptr,
                                         delta_ptr, seg_ptr, tau_ptr, theta_ptr, theta_pos_ptr, qk_scale, SEQ,
                                         HEADS_KV, GROUP, HEAD_DIM, BLOCK_D, WINDOW, ANCHOR_BLOCK, ROWS, STEP, GATE,
                                         PRECISION, True)
    d = tl.arange(0, BLOCK_D)
    vectors = _offsets(b, j, h, SEQ, HEADS_KV).to(tl.int64)[:, None] * HEAD_DIM + d[None, :]
    in_bounds = key_ok[:, None] & (d < HEAD_DIM)[None, :]
    anchors_dk = tl.load(dk_in_ptr + vectors, mask=in_bounds, other=0.0)
    anchors_dv = tl.load(dv_in_ptr + vectors, mask=in_bounds, other=0.0)
    tl.store(dk_ptr + vectors, dk * SCALE + anchors_dk, mask=in_bounds)
    tl.store(dv_ptr + vectors, dv + anchors_dv, mask=in_bounds)
    per_key = _offsets(b, j, h, SEQ, HEADS_KV)
    tl.store(du_ptr + per_key, du + tl.load(du_in_ptr + per_key, mask=key_ok, other=0.0), mask=key_ok)


# -- launchers ----------------------------------------------------------------------------------------------------

def _launch(kernel, grid, inputs: Sequence[jax.Array], out_shapes: Sequence[jax.ShapeDtypeStruct], *, name: str,
            launch: Launch, interpret: bool, input_output_aliases: dict[int, int] | None = None,
            zeroed_outputs: Sequence[int] = (), **constexprs):
    """``jax_triton.triton_call`` (or the interpreter, ``interpret=True``), outputs as a tuple, inside a named
    scope ``name`` (profiles read by it)."""
    with jax.named_scope(name):
        if interpret:
            return triton_interpret.call(kernel, grid, inputs, out_shapes, input_output_aliases, **constexprs)
        import jax_triton

        return tuple(jax_triton.triton_call(*inputs, kernel=kernel, out_shape=list(out_shapes), grid=grid,
                                            name=name, num_warps=launch.num_warps, num_stages=launch.num_stages,
                                            input_output_aliases=input_output_aliases,
                                            zeroed_outputs=zeroed_outputs, **constexprs))


def _sizes(q, k, *, window: int, anchor_block: int, scale: float, gate: str, launch: Launch):
    """The constexprs every kernel takes."""
    batch, seq, heads_q, head_dim = q.shape
    heads_kv = k.shape[2]
    return dict(BATCH=batch, SEQ=seq, HEADS_KV=heads_kv, GROUP=heads_q // heads_kv, HEAD_DIM=head_dim,
                BLOCK_D=max(16, 1 << (head_dim - 1).bit_length()), WINDOW=window, ANCHOR_BLOCK=anchor_block,
                ROWS=launch.rows, SCALE=float(scale), GATE=GATES[gate],
                PRECISION="ieee" if q.dtype == jnp.float32 else "tf32")


def _num_tiles(q, k, launch: Launch) -> int:
    """Row tiles per (batch, KV head)."""
    return -(-q.shape[1] * (q.shape[2] // k.shape[2]) // launch.rows)


def _anchor_args(anchors):
    """The anchors as the kernels read them (at least one column, so that no operand is empty; the kernels
    read only ``NUM_ANCHORS`` columns) and their constexprs."""
    count = anchors.shape[3]
    padded = anchors if count else jnp.full(anchors.shape[:3] + (1,), -1, jnp.int32)
    return padded, dict(NUM_BLOCKS=anchors.shape[2], NUM_ANCHORS=count)


def forward(q, k, v, u, segments, anchors, tau, theta, theta_pos, *, window: int, anchor_block: int, scale: float,
            gate: str, launch: Launch, interpret: bool = False):
    """Output and log-sum-exp of SparseK attention.

    Args:
      q: ``[batch, seq, q_heads, head_dim]``; k, v: ``[batch, seq, kv_heads, head_dim]``, q's dtype.
      u: float32 scores ``[batch, seq, kv_heads]``; segments: int32 document run indices ``[batch, seq]``
        (non-decreasing along ``seq``).
      anchors: int32 ``[batch, kv_heads, ceil(seq / anchor_block), num_anchors]`` (-1: empty slot;
        ``num_anchors`` may be 0); tau, theta: float32, theta_pos: int32, ``[batch, seq, kv_heads]``.

    Returns:
      ``out [batch, seq, q_heads, head_dim]`` and ``lse [batch, seq, q_heads]``, float32 (0 for a query with
      no key).
    """
    batch = q.shape[0]
    sizes = _sizes(q, k, window=window, anchor_block=anchor_block, scale=scale, gate=gate, launch=launch)
    anchors, anchor_sizes = _anchor_args(anchors)
    return _launch(_forward_kernel, (_num_tiles(q, k, launch) * batch * k.shape[2],),
                   (q, k, v, u, segments, anchors, tau, theta, theta_pos),
                   (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(q.shape[:3], jnp.float32)),
                   name="sparsek_triton_forward", launch=launch, interpret=interpret, BLOCK_K=launch.block_k,
                   **anchor_sizes, **sizes)


def backward_queries(q, k, v, u, segments, anchors, tau, theta, theta_pos, out, d_out, lse, *, window: int,
                     anchor_block: int, scale: float, gate: str, launch: Launch, interpret: bool = False):
    """Query-major backward. Arguments as in ``forward``, plus ``out`` and ``lse`` from it and ``d_out`` (q's
    shape and dtype).

    Returns, float32: ``dq`` (q's shape); per query row ``[batch, seq, q_heads]`` the sum of its gate
    gradients over fractional keys and ``delta = dO . o``; the anchors' parts of ``dk``, ``dv`` (k's shape)
    and of the direct term of ``du`` (``[batch, seq, kv_heads]``).
    """
    batch = q.shape[0]
    sizes = _sizes(q, k, window=window, anchor_block=anchor_block, scale=scale, gate=gate, launch=launch)
    f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    anchors, anchor_sizes = _anchor_args(anchors)
    return _launch(_backward_queries_kernel, (_num_tiles(q, k, launch) * batch * k.shape[2],),
                   (q, k, v, u, segments, anchors, tau, theta, theta_pos, out, d_out, lse),
                   (f32(q.shape), f32(q.shape[:3]), f32(q.shape[:3]), f32(k.shape), f32(k.shape), f32(k.shape[:3])),
                   name="sparsek_triton_backward_queries", launch=launch, interpret=interpret,
                   zeroed_outputs=(3, 4, 5), BLOCK_K=launch.backward_block_k, **anchor_sizes, **sizes)


def backward_keys(q, k, v, u, segments, tau, theta, theta_pos, d_out, lse, delta, dk_anchors, dv_anchors,
                  du_anchors, *, window: int, anchor_block: int, scale: float, gate: str, launch: Launch,
                  interpret: bool = False):
    """Key-major backward over the band: ``dk``, ``dv`` (k's shape) and the direct term of ``du``
    (``[batch, seq, kv_heads]``), float32, each the band's part plus the anchors' (``backward_queries``),
    written in place of the anchors' arrays."""
    batch, seq = q.shape[:2]
    sizes = _sizes(q, k, window=window, anchor_block=anchor_block, scale=scale, gate=gate, launch=launch)
    f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    return _launch(_backward_keys_kernel, (-(-seq // launch.rows) * batch * k.shape[2],),
                   (q, k, v, u, segments, tau, theta, theta_pos, d_out, lse, delta, dk_anchors, dv_anchors,
                    du_anchors),
                   (f32(k.shape), f32(k.shape), f32(k.shape[:3])),
                   name="sparsek_triton_backward_keys", launch=launch, interpret=interpret,
                   input_output_aliases={11: 0, 12: 1, 13: 2}, KEYS=launch.rows, STEP=launch.backward_block_k,
                   **sizes)
