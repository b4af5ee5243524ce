"""The thresholds' event simulation over chunks of keys, written once on arrays of lanes: the lane state and its
step (``lane_step``, ``run_lanes``), the state a lane starts from (``cut_state``), and the summaries the
buffers are scanned from. One lane walks one chunk key by key, keeping counts of the gate-1 and fractional
keys, a float-float sum and pointers into two sorted lists; docs/operator.md derives it.

Nothing here launches anything: ``thresholds_xla`` runs these functions on all lanes at once in plain XLA,
``thresholds_pallas`` inside Pallas GPU kernels (a block of lanes per program, reading and writing refs).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sparsek_kernels.common import count_leading

NEG_INF = float("-inf")


class Lists(NamedTuple):
    """What the lanes read, flattened to one axis per field (lane ``l`` owns ``[l * width, (l + 1) * width)``).

    a_z, a_pos: the start buffer ``A`` of each lane, ``[lanes * R]``: top ``R`` keys of the document before the
      chunk, sorted by (score, position) descending, padding ``-inf`` / ``-1``.
    q_z, q_pos, q_seg: the chunk's keys sorted the same way, ``[lanes * C]`` (padding ``-inf`` / ``-1``).
    key_z, key_seg: the chunk's keys in position order, ``[lanes * C]``.
    """

    a_z: jax.Array
    a_pos: jax.Array
    q_z: jax.Array
    q_pos: jax.Array
    q_seg: jax.Array
    key_z: jax.Array
    key_seg: jax.Array


class LaneInfo(NamedTuple):
    """Per-lane scalars, each ``[lanes]``."""

    start: jax.Array      # int32 position of the chunk's first key
    length: jax.Array     # int32 valid keys in the chunk
    a_count: jax.Array    # int32 valid entries of A
    a_doc: jax.Array      # int32 document (segment id) of A; -2 when there is no past
    a_dropped: jax.Array  # float32 largest score ever cut from A (-inf if none)
    count0: jax.Array     # int32 keys of document a_doc before the chunk (not capped at R)
    cut_pos: jax.Array    # int32 position of the first key in the chunk that starts a cut, or -1


class Cut(NamedTuple):
    """The part of a lane's state that exists once a document has more than ``k`` candidates (``[lanes]``)."""

    tau: jax.Array
    c0: jax.Array         # centre of the sums (an integer value)
    n_upper: jax.Array    # |U| among visible keys
    n_mid: jax.Array      # |M| among visible keys
    sum_hi: jax.Array     # sum over M of (z - c0): float-float pair
    sum_lo: jax.Array
    a_upper: jax.Array    # #{A: z - 1 > tau}
    a_above: jax.Array    # #{A: z > tau} (U and M)
    q_upper: jax.Array    # #{Q (all entries): z - 1 > tau}
    q_above: jax.Array    # #{Q (all entries): z > tau}
    a_top: jax.Array      # A[:a_top] are top-k members
    q_top: jax.Array      # Q[:q_top] rank at or above theta (members once arrived)
    theta: jax.Array
    theta_pos: jax.Array


class State(NamedTuple):
    """A lane's state (every field ``[lanes]``): where it is in its chunk and what the thresholds of the
    current key prefix depend on. Each of the three machines (tau, theta, the fractional count) has a flag
    that says whether it has settled for position ``t``; the lane emits ``t`` once all three have."""

    t: jax.Array          # position being processed (after its arrival), or the next to arrive
    ready: jax.Array      # waiting for the arrival of key t
    doc: jax.Array        # segment id of the current document
    a_vis: jax.Array      # A belongs to the current document
    count: jax.Array      # keys of the current document so far (not capped)
    cut: Cut              # meaningful once is_cut
    is_cut: jax.Array     # the document has more than k keys: there is a threshold
    tau_done: jax.Array
    removals: jax.Array   # members still to pop from the top-k
    theta_done: jax.Array
    a_frac: jax.Array     # #{A: z - tau >= 1} (the float test of the attention's gates)
    q_frac: jax.Array     # #{Q: z - tau >= 1}
    q_adjust: jax.Array   # arrived Q keys counted as fractional beyond the state's M, minus those not
    frac_done: jax.Array


class Outputs(NamedTuple):
    """What the lanes emit: per position ``[lanes, C]`` and per anchor row ``[lanes, C // block]``."""

    tau: jax.Array
    theta: jax.Array
    theta_pos: jax.Array
    num_fractional: jax.Array
    exact: jax.Array
    anchor_top: jax.Array  # entries of A among the selected keys of each anchor row


def two_sum(hi, lo, x):
    """(hi, lo) + x as a float-float pair (Knuth's TwoSum; exact error term, no multiplications)."""
    s = hi + x
    bb = s - hi
    err = (hi - (s - bb)) + (x - bb)
    return s, lo + err


def _split_terms(x, mask):
    """Float32 ``x`` where ``mask`` (0 elsewhere) split into three terms whose sums barely depend on the order
    of summation: a multiple of 2**-10, a multiple of 2**-21 and a remainder below 2**-21. For terms in [0, 2)
    and up to 8192 of them (R + C <= 8192) the sums of the first two are exact in float32 (``ExactSums``); the
    remainders' sum rounds, and there the kernels' decisions may differ from XLA's in the last bits."""
    x = jnp.where(mask, x, 0.0)
    hi = jnp.floor(x * 1024.0) * (1.0 / 1024.0)
    rest = x - hi
    mid = jnp.floor(rest * 2097152.0) * (1.0 / 2097152.0)
    return hi, mid, rest - mid


# ``exact_sums(terms)``: the sums over the last axis of same-shaped int32 or float32 terms whose sums are exact
# (counts, the first two split terms), so in any order and grouping. A kernel sums each one (``sum_each``); the
# XLA path stacks them into one reduction per dtype (``thresholds_xla.sum_stacked``: XLA compiles a kernel per
# reduction).
ExactSums = Callable[[tuple], tuple]


def sum_each(terms: tuple) -> tuple:
    """``ExactSums`` one reduction per term."""
    return tuple(jnp.sum(t, axis=-1) for t in terms)


def _leading(predicate, length: int, shape):
    """Number of leading indices ``i < length`` where ``predicate(i)`` holds (true on a prefix)."""
    return count_leading(predicate, jnp.zeros(shape, jnp.int32), jnp.full(shape, length, jnp.int32),
                         int(length).bit_length())


def _pick(values, index):
    """values[index] for a vector ``values`` [m] and an int array ``index`` [...], as a masked reduction
    (no gather: the same code lowers in Triton, where values live in registers)."""
    iota = lax.broadcasted_iota(jnp.int32, index.shape + values.shape, index.ndim)
    hit = iota == index[..., None]
    if jnp.issubdtype(values.dtype, jnp.floating):
        return jnp.max(jnp.where(hit, values, -jnp.inf), axis=-1)
    return jnp.max(jnp.where(hit, values, jnp.iinfo(values.dtype).min), axis=-1)


def cut_state(a_z, a_pos, a_valid, q_z, q_pos, q_valid, q_vis, *, k: int, exact_sums: ExactSums = sum_each) -> Cut:
    """The lane state for a visible set ``V = A[a_valid] + Q[q_vis]`` of more than ``k`` keys (one chunk).

    ``a_*`` [R] and ``q_*`` [C] are sorted by (score, position) descending; ``a_valid`` marks the entries of A
    that are visible (a prefix), ``q_valid`` the real entries of Q (a prefix) and ``q_vis`` those in ``V``;
    ``q_vis=None``: no key of Q is visible (a chunk's start), which drops Q from every search.
    ``theta`` is found by two rank searches (with Q invisible it is ``A[k - 1]``), ``tau`` by binary searches
    run side by side over the breakpoint lists of the visible keys (``z`` and ``z - 1`` of A, and of Q: the
    largest breakpoint ``b`` with ``f(b) > k``), then the closed form on the linear piece after it. Every
    ``f(b) > k`` decision sums clipped terms on exact grids (``_split_terms``); ``exact_sums`` sums what is exact.
    """
    R, C = a_z.shape[0], q_z.shape[0]
    iq = jnp.arange(C, dtype=jnp.int32)
    a_count = jnp.sum(a_valid, dtype=jnp.int32)
    with_q = q_vis is not None
    one = (1,)

    if with_q:
        # theta: the visible key of rank k - 1. A key of Q outranks a key of A at equal score (it is newer).
        def rank_a(i):  # rank of A[i] among V
            z = _pick(a_z, i)
            return i + jnp.sum(q_vis[None, :] & (q_z[None, :] >= z[:, None]), axis=1, dtype=jnp.int32)

        def rank_q(j):  # visible keys ranked above Q[j]
            z = _pick(q_z, j)
            return (jnp.sum(q_vis[None, :] & (iq[None, :] < j[:, None]), axis=1, dtype=jnp.int32)
                    + jnp.sum(a_valid[None, :] & (a_z[None, :] > z[:, None]), axis=1, dtype=jnp.int32))

        i_star = _leading(lambda i: rank_a(i) < k - 1, R, one)
        from_a = (i_star < a_count) & (rank_a(jnp.minimum(i_star, R - 1)) == k - 1)
        j_star = _leading(lambda j: rank_q(j) < k - 1, C, one)
        j_vis = jnp.min(jnp.where(q_vis & (iq >= j_star), iq, C), keepdims=True)
        theta = jnp.where(from_a, _pick(a_z, jnp.minimum(i_star, R - 1)), _pick(q_z, jnp.minimum(j_vis, C - 1)))
        theta_pos = jnp.where(from_a, _pick(a_pos, jnp.minimum(i_star, R - 1)),
                              _pick(q_pos, jnp.minimum(j_vis, C - 1)))
    else:
        last = jnp.full(one, min(k, R) - 1, jnp.int32)
        theta, theta_pos = _pick(a_z, last), _pick(a_pos, last)

    def sums(x, valid, b):  # visible keys at or above b + 1, and the split sums of the fractional x - b
        t = jnp.clip(x[None, :] - b[:, None], 0.0, 1.0)
        hi, mid, lo = _split_terms(t, valid[None, :] & (t > 0.0) & (t < 1.0))
        ones, h, m = exact_sums(((valid[None, :] & (t == 1.0)).astype(jnp.int32), hi, mid))
        return ones, (h, m, jnp.sum(lo, axis=-1))

    # tau: f(b) = sum_V clip(z - b, 0, 1), compared with k on exact grids.
    def f_minus_k(b):  # b [P] -> [P], with the sign (and zero) of f(b) - k exact
        ones, (h, m, l) = sums(a_z, a_valid, b)
        if with_q:
            q_ones, (hq, mq, lq) = sums(q_z, q_vis, b)
            ones, h, m, l = ones + q_ones, h + hq, m + mq, l + lq
        excess = (h - (k - ones).astype(jnp.float32)) + m
        return excess + l

    f_above_k = lambda b: f_minus_k(b) > 0.0

    # Descending lists of breakpoints (z and z - 1 of A, and of Q), searched side by side. Invalid entries are
    # set to the lowest value, where f > k holds anyway, so they never move a search.
    lowest = jnp.min(jnp.where(a_valid, a_z, jnp.inf))
    if with_q:
        lowest = jnp.minimum(lowest, jnp.min(jnp.where(q_vis, q_z, jnp.inf)))
    lowest = lowest - 2.0
    a_list = jnp.where(a_valid, a_z, lowest)
    if with_q:  # Q's keys are breakpoints when one is visible (the lists stay sorted: all of Q or none)
        q_list = jnp.where(q_valid & (jnp.max(q_vis.astype(jnp.int32)) > 0), q_z, lowest)
    width = max(R, C) if with_q else R
    lists = 4 if with_q else 2
    which = jnp.arange(lists, dtype=jnp.int32)  # z of A, z - 1 of A[, z of Q, z - 1 of Q]

    def points(i):  # i [lists] -> the lists' values at i (no slicing: it does not lower in Triton)
        va = jnp.where(i < R, _pick(a_list, jnp.minimum(i, R - 1)), lowest)
        if with_q:
            vq = jnp.where(i < C, _pick(q_list, jnp.minimum(i, C - 1)), lowest)
            va = jnp.where(which < 2, va, vq)
        return va - jnp.where(which % 2 == 1, 1.0, 0.0)

    first = _leading(lambda i: ~f_above_k(points(i)), width, (lists,))
    start = jnp.max(points(first))
    c0 = jnp.floor(start)

    def partition(t):  # visible |U|, |M| and the split sums of z - c0 over M at threshold t
        def counts_and_sums(z, valid):
            upper = valid & (z - 1.0 > t)
            mid = valid & (z > t) & ~upper
            hi, mi, lo = _split_terms(z - c0, mid)
            n_upper, n_mid, h, m = exact_sums((upper.astype(jnp.int32), mid.astype(jnp.int32), hi, mi))
            return n_upper, n_mid, (h, m, jnp.sum(lo))

        n_upper, n_mid, sa = counts_and_sums(a_z, a_valid)
        if with_q:
            q_upper, q_mid, sq = counts_and_sums(q_z, q_vis)
            n_upper, n_mid, sa = n_upper + q_upper, n_mid + q_mid, tuple(x + y for x, y in zip(sa, sq))
        s = sa[0]                      # exact
        hi = s + sa[1]
        lo = ((s - hi) + sa[1]) + sa[2]
        return n_upper, n_mid, hi, lo

    n_upper, n_mid, hi, lo = partition(start)
    root = c0 + ((n_upper - k).astype(jnp.float32) + hi + lo) / jnp.maximum(n_mid, 1).astype(jnp.float32)
    # Where f = k at the next visible breakpoint the root is that breakpoint exactly (a lane lands on it, and
    # the fractional count must be taken at it), whatever the rounded closed form says; so is a root that
    # rounded past it.
    # (A key's lower breakpoint z - 1, if above start, is its smaller one: one minimum per list.)
    above = lambda z, valid: jnp.min(jnp.where(valid & (z - 1.0 > start), z - 1.0,
                                               jnp.where(valid & (z > start), z, jnp.inf)))
    next_point = above(a_z, a_valid)
    if with_q:
        next_point = jnp.minimum(next_point, above(q_z, q_vis))
    on_next = (f_minus_k(jnp.broadcast_to(next_point, (1,))) == 0.0) | (root >= next_point)
    # No fractional key after start: f is flat there and start is its left end, the smallest valid tau (only
    # reached when z - 1 rounds to z, at scores beyond 2**24, so that no breakpoint has f > k).
    tau = jnp.where(n_mid == 0, start, jnp.where(on_next, next_point, jnp.maximum(root, start)))
    n_upper, n_mid, hi, lo = partition(tau)
    above_theta = lambda z, p: (z > theta) | ((z == theta) & (p >= theta_pos))
    pointers = lambda z, p, valid: exact_sums(tuple((valid & m).astype(jnp.int32) for m in (
        z - 1.0 > tau, z > tau, above_theta(z, p))))
    (a_upper, a_above, a_top), (q_upper, q_above, q_top) = pointers(a_z, a_pos, a_valid), pointers(q_z, q_pos, q_valid)
    scalar = lambda x: jnp.max(x)  # [1] -> scalar
    return Cut(tau=tau, c0=c0, n_upper=n_upper, n_mid=n_mid, sum_hi=hi, sum_lo=lo, a_upper=a_upper,
               a_above=a_above, q_upper=q_upper, q_above=q_above, a_top=a_top, q_top=q_top, theta=scalar(theta),
               theta_pos=scalar(theta_pos))


# The lists a lane reads and their fields, as ``Lists`` names them (``a_z``, ``a_pos``, ``q_z``, ...).
LIST_FIELDS = {"a": ("z", "pos"), "q": ("z", "pos", "seg"), "key": ("z", "seg")}


def list_widths(buffer_size: int, chunk: int) -> dict[str, int]:
    """Entries of each list per lane: ``R`` of A, ``C`` of Q and of the keys."""
    return {"a": buffer_size, "q": chunk, "key": chunk}


def lane_reads(lists: Lists, lane, buffer_size: int, chunk: int) -> Callable:
    """``load(requests)`` for the lanes ``lane`` (an iota): each request ``(list, fields, index)`` (``list`` one
    of ``LIST_FIELDS``, ``index`` a per-lane int32 array, clamped into range) gives the tuple of those fields of
    each lane's entry. One load per field and request: the kernels' reads from refs."""
    width = list_widths(buffer_size, chunk)

    def load(requests):
        return tuple(tuple(getattr(lists, f"{name}_{field}")[
            lane * width[name] + jnp.clip(index, 0, width[name] - 1)] for field in fields)
            for name, fields, index in requests)

    return load


def _lower_candidate(a_ok, az, q_ok, qz):
    """Whether Q's candidate ranks below A's (Q keys are newer than A keys: they win ties)."""
    return q_ok & (~a_ok | (qz < az))


def initial_state(info: LaneInfo, chunk_cut: Cut, *, k: int) -> State:
    """The state of each lane before its chunk's first key: the document before the chunk, cut or not."""
    is_cut = info.count0 > k
    zero = jnp.zeros_like(info.start)
    return State(t=info.start, ready=jnp.ones_like(is_cut), doc=info.a_doc, a_vis=info.a_count > 0,
                 count=info.count0, cut=chunk_cut, is_cut=is_cut, tau_done=jnp.ones_like(is_cut), removals=zero,
                 theta_done=jnp.ones_like(is_cut), a_frac=chunk_cut.a_upper, q_frac=chunk_cut.q_upper,
                 q_adjust=zero, frac_done=~is_cut)


def _restart_sum_if_empty(c: Cut, entering, z) -> Cut:
    """Where a key of score ``z`` is about to enter an empty M, restart the sum centred on it: the old centre
    can be far away after tau has jumped (past a masked-looking score), and ``z - c0`` would round."""
    fresh = entering & (c.n_mid == 0)
    zero = jnp.zeros_like(c.sum_hi)
    return c._replace(c0=jnp.where(fresh, jnp.floor(z), c.c0), sum_hi=jnp.where(fresh, zero, c.sum_hi),
                      sum_lo=jnp.where(fresh, zero, c.sum_lo))


def lane_step(s: State, info: LaneInfo, start_cut: Cut, load: Callable, *, k: int, q_len: int):
    """One event of every lane (all fields ``[lanes]``). Returns ``(state, emit)``; ``emit`` marks lanes that
    finished position ``t`` (the state's ``t`` has then moved on; ``emitted_values`` reads what to write).
    ``q_len`` is the length ``C`` of each lane's Q; ``load`` reads the lists (see ``lane_reads``).

    An iteration takes the arrival of the next key (if the lane is waiting for one), then makes at most one
    move in each of three independent machines: ``tau`` (settle on the current piece or cross one
    breakpoint), the fractional count (move the float-test boundary by one key) and ``theta`` (pop one key
    from the bottom of the top-k). Every read is at pointers of the incoming state, so all of an iteration's
    loads are independent (one ``load`` call); a lane whose cut state is replaced by the arrival (a cut begins)
    starts its machines at the next iteration.
    """
    incoming = s.cut
    offset = s.t - info.start
    active = offset < info.length

    # Loads, all at the incoming pointers.
    fa_index = jnp.where(s.ready | ~s.tau_done, incoming.a_upper, s.a_frac)
    fq_index = jnp.where(s.ready | ~s.tau_done, incoming.q_upper, s.q_frac)
    Q = LIST_FIELDS["q"]
    ((x, x_seg), (az_above,), (az_up,), (q_above_z, q_above_pos, q_above_seg), (q_up_z, q_up_pos, q_up_seg),
     (fa_above,), (fa_at,), fq_above, fq_at, a1, a2, q1, q2) = load((
        ("key", ("z", "seg"), offset), ("a", ("z",), incoming.a_above - 1), ("a", ("z",), incoming.a_upper - 1),
        ("q", Q, incoming.q_above - 1), ("q", Q, incoming.q_upper - 1), ("a", ("z",), fa_index - 1),
        ("a", ("z",), fa_index), ("q", Q, fq_index - 1), ("q", Q, fq_index), ("a", ("z", "pos"), incoming.a_top - 1),
        ("a", ("z", "pos"), incoming.a_top - 2), ("q", Q, incoming.q_top - 1), ("q", Q, incoming.q_top - 2)))

    # --- arrival of key t -------------------------------------------------------------------------------------
    arrive = s.ready & active
    t = s.t
    new_doc = arrive & (x_seg != s.doc)
    doc = jnp.where(new_doc, x_seg, s.doc)
    a_vis = s.a_vis & ~new_doc
    count = jnp.where(arrive, jnp.where(new_doc, 1, s.count + 1), s.count)
    was_cut = s.is_cut & ~new_doc
    starts = arrive & ~was_cut & (count == k + 1)
    precomputed = starts & (t == info.cut_pos)
    slow = starts & ~precomputed
    # A cut that is not precomputed climbs from -inf: every visible key in U, every pointer at its list's end.
    full = lambda v: jnp.full_like(count, v)
    a_all = jnp.where(a_vis, info.a_count, 0)
    slow_cut = Cut(tau=jnp.full_like(x, NEG_INF), c0=jnp.floor(x), n_upper=count, n_mid=full(0),
                   sum_hi=jnp.zeros_like(x), sum_lo=jnp.zeros_like(x), a_upper=a_all, a_above=a_all,
                   q_upper=full(q_len), q_above=full(q_len), a_top=a_all, q_top=full(q_len),
                   theta=jnp.full_like(x, NEG_INF), theta_pos=full(-1))
    choose = lambda m, a, b: jax.tree.map(lambda u, v: jnp.where(m, u, v), a, b)
    c = choose(precomputed, start_cut, choose(slow, slow_cut, incoming))
    replaced = precomputed | slow
    is_cut = was_cut | starts
    # A newcomer in a running cut joins U or M (or is dead at or below tau) and may enter the top-k.
    joins = arrive & was_cut
    upper = joins & (x - 1.0 > c.tau)
    mid = joins & ~upper & (x > c.tau)
    moved = upper | mid
    c = _restart_sum_if_empty(c, mid, x)
    hi, lo = two_sum(c.sum_hi, c.sum_lo, jnp.where(mid, x - c.c0, 0.0))
    c = c._replace(n_upper=c.n_upper + upper, n_mid=c.n_mid + mid, sum_hi=hi, sum_lo=lo)
    enters_top = joins & (x >= c.theta)
    tau_done = jnp.where(arrive, ~moved & ~slow, s.tau_done)
    theta_done = jnp.where(arrive, ~enters_top & ~slow, s.theta_done)
    removals = jnp.where(arrive, enters_top.astype(jnp.int32) + slow, s.removals)
    frac_done = jnp.where(arrive, ~moved & ~replaced & s.frac_done, s.frac_done)
    a_frac = jnp.where(replaced, c.a_upper, s.a_frac)
    q_frac = jnp.where(replaced, c.q_upper, s.q_frac)
    q_adjust = jnp.where(replaced, 0, s.q_adjust)
    working = is_cut & ~replaced

    def visible(pos, seg):
        return (pos >= 0) & (pos <= t) & (seg == doc)

    # --- tau: settle on the current piece, or cross one breakpoint --------------------------------------------
    in_tau = working & ~tau_done
    inf = jnp.inf
    cand_am = jnp.where(a_vis & (c.a_above > c.a_upper), az_above, inf)
    cand_au = jnp.where(a_vis & (c.a_upper > 0), az_up - 1.0, inf)
    cand_qm = jnp.where(c.q_above > c.q_upper, q_above_z, inf)
    cand_qu = jnp.where(c.q_upper > 0, q_up_z - 1.0, inf)
    nb = jnp.minimum(jnp.minimum(cand_am, cand_au), jnp.minimum(cand_qm, cand_qu))
    numerator = ((c.n_upper - k).astype(jnp.float32) + c.sum_hi) + c.sum_lo
    root = c.c0 + numerator / jnp.maximum(c.n_mid, 1).astype(jnp.float32)
    # Breakpoints at or below tau (keys that arrived exactly there, or ties) are crossed before settling, so
    # the pointers always count exactly the keys above tau.
    on_piece = (c.n_mid > 0) & (root < nb)
    flat = (c.n_mid == 0) & (c.n_upper <= k)
    settle = in_tau & (nb > c.tau) & (on_piece | flat)
    cross = in_tau & ~settle
    e_am = cross & (cand_am == nb)
    e_au = cross & ~e_am & (cand_au == nb)
    e_qm = cross & ~e_am & ~e_au & (cand_qm == nb)
    e_qu = cross & ~e_am & ~e_au & ~e_qm
    qm_counts = e_qm & visible(q_above_pos, q_above_seg)
    qu_counts = e_qu & visible(q_up_pos, q_up_seg)
    c = _restart_sum_if_empty(c, e_au | qu_counts, jnp.where(e_au, az_up, q_up_z))
    delta = jnp.where(e_am, c.c0 - az_above, jnp.where(e_au, az_up - c.c0, jnp.where(
        qm_counts, c.c0 - q_above_z, jnp.where(qu_counts, q_up_z - c.c0, 0.0))))
    hi, lo = two_sum(c.sum_hi, c.sum_lo, delta)
    tau = jnp.where(settle & on_piece, jnp.maximum(root, c.tau), jnp.where(cross, nb, c.tau))
    c = c._replace(tau=tau, sum_hi=hi, sum_lo=lo, n_upper=c.n_upper - e_au - qu_counts,
                   n_mid=c.n_mid - e_am + e_au - qm_counts + qu_counts, a_above=c.a_above - e_am,
                   a_upper=c.a_upper - e_au, q_above=c.q_above - e_qm, q_upper=c.q_upper - e_qu)
    tau_done = tau_done | settle
    # Keep the sum's centre near tau, so that every term z - c0 is small and rounds little (tau can climb far,
    # past masked-looking scores): where M is empty the sum restarts at floor(tau); otherwise it shifts by
    # |M| times an integer, exactly.
    finite = jnp.isfinite(c.tau)
    centre = jnp.where(finite, jnp.floor(c.tau), c.c0)
    restart = finite & (c.n_mid == 0) & (centre != c.c0)
    shift = finite & (c.n_mid > 0) & (jnp.abs(centre - c.c0) >= 4.0)
    hi, lo = two_sum(c.sum_hi, c.sum_lo, jnp.where(shift, c.n_mid.astype(jnp.float32) * (c.c0 - centre), 0.0))
    c = c._replace(c0=jnp.where(restart | shift, centre, c.c0), sum_hi=jnp.where(restart, 0.0, hi),
                   sum_lo=jnp.where(restart, 0.0, lo))
    a_frac = jnp.where(settle, c.a_upper, a_frac)
    q_frac = jnp.where(settle, c.q_upper, q_frac)
    q_adjust = jnp.where(settle, 0, q_adjust)
    frac_done = frac_done & ~settle

    # --- fractional count: where the attention's test (z - tau < 1) and the state's (z - 1 <= tau) differ ----
    checking = working & tau_done & ~frac_done & (a_frac == fa_index) & (q_frac == fq_index)
    a_down = checking & a_vis & (a_frac > 0) & (fa_above - c.tau < 1.0)
    a_up = checking & a_vis & ~a_down & (a_frac < c.a_above) & (fa_at - c.tau >= 1.0)
    q_down = checking & (q_frac > 0) & (fq_above[0] - c.tau < 1.0)
    q_up = checking & ~q_down & (q_frac < c.q_above) & (fq_at[0] - c.tau >= 1.0)
    a_frac = a_frac - a_down + a_up
    q_frac = q_frac - q_down + q_up
    q_adjust = q_adjust + (q_down & visible(*fq_above[1:])) - (q_up & visible(*fq_at[1:]))
    frac_done = frac_done | (checking & ~(a_down | a_up | q_down | q_up))

    # --- theta: pop the lowest key of the top-k (or skip a key of Q outside the visible set), then settle -----
    in_theta = working & ~theta_done
    a_ok1, a_ok2 = a_vis & (c.a_top >= 1), a_vis & (c.a_top >= 2)
    q_ok1, q_ok2 = c.q_top >= 1, c.q_top >= 2
    q_low = _lower_candidate(a_ok1, a1[0], q_ok1, q1[0])
    member = ~q_low | visible(q1[1], q1[2])
    pop = in_theta & ((removals > 0) | ~member)
    pop_q, pop_a = pop & q_low, pop & ~q_low
    removals = removals - (pop & member & (removals > 0))
    # After a pop the list that lost its bottom key offers its second-lowest key.
    a_ok, a_z, a_pos = (jnp.where(pop_a, u, v) for u, v in zip((a_ok2,) + a2, (a_ok1,) + a1))
    q_ok, q_z, q_pos, q_seg = (jnp.where(pop_q, u, v) for u, v in zip((q_ok2,) + q2, (q_ok1,) + q1))
    q_low = _lower_candidate(a_ok, a_z, q_ok, q_z)
    settled = in_theta & (removals == 0) & (~q_low | visible(q_pos, q_seg))
    c = c._replace(a_top=c.a_top - pop_a, q_top=c.q_top - pop_q,
                   theta=jnp.where(settled, jnp.where(q_low, q_z, a_z), c.theta),
                   theta_pos=jnp.where(settled, jnp.where(q_low, q_pos, a_pos), c.theta_pos))
    theta_done = theta_done | settled

    # --- emit position t once everything has settled ----------------------------------------------------------
    busy = arrive | (~s.ready & active)
    emit = busy & (~is_cut | (tau_done & theta_done & frac_done & ~replaced))
    state = State(t=jnp.where(emit, t + 1, t), ready=emit | (s.ready & ~arrive), doc=doc, a_vis=a_vis,
                  count=count, cut=c, is_cut=is_cut, tau_done=tau_done, removals=removals,
                  theta_done=theta_done, a_frac=a_frac, q_frac=q_frac, q_adjust=q_adjust, frac_done=frac_done)
    return state, emit


def emitted_values(state: State, info: LaneInfo):
    """(tau, theta, theta_pos, num_fractional, exact, a_top) of the position a lane just emitted."""
    s, c = state, state.cut
    cut = s.is_cut
    a_fractional = jnp.where(s.a_vis, c.a_above - s.a_frac, 0)
    q_mid_visible = c.n_mid - jnp.where(s.a_vis, c.a_above - c.a_upper, 0)
    num_fractional = jnp.where(cut, a_fractional + q_mid_visible + s.q_adjust, 0)
    return (jnp.where(cut, c.tau, NEG_INF), jnp.where(cut, c.theta, NEG_INF), jnp.where(cut, c.theta_pos, -1),
            num_fractional, ~(cut & s.a_vis & (info.a_dropped > c.tau)),
            jnp.where(s.a_vis, jnp.where(cut, c.a_top, info.a_count), 0))


def run_lanes(lists: Lists, info: LaneInfo, chunk_cut: Cut, start_cut: Cut, store: Callable, outputs, *, k: int,
              buffer_size: int, chunk: int, block: int, anchor_offset: int, load: Callable | None = None):
    """Runs every lane to the end of its chunk (``L = info.start.shape[0]`` lanes).

    ``lists`` holds flat arrays (XLA) or refs (a kernel): lane ``l`` reads A at ``[l * R, (l + 1) * R)`` and Q
    and its keys at ``[l * C, (l + 1) * C)``. ``store(outputs, slot, anchor_slot, values)`` writes the emitted
    ``values`` (tau, theta, theta_pos, num_fractional, exact, a_top) at flat slots of ``[L * (C + 1)]`` and
    ``[L * (C // block + 1)]`` outputs (the last slot of each lane is a sink for lanes that emit nothing) and
    returns the new ``outputs``: the XLA driver carries arrays, the kernel writes refs and carries nothing.
    ``load``: a ``lane_reads``-like factory for the lanes' reads (default ``lane_reads``).
    """
    lane = lax.iota(jnp.int32, info.start.shape[0])
    R, C = buffer_size, chunk
    rows = C // block

    load = (load or lane_reads)(lists, lane, R, C)

    def body(carry):
        state, outputs = carry
        offset = state.t - info.start
        state, emit = lane_step(state, info, start_cut, load, k=k, q_len=C)
        anchor = emit & (offset % block == anchor_offset)
        slot = lane * (C + 1) + jnp.where(emit, offset, C)
        anchor_slot = lane * (rows + 1) + jnp.where(anchor, offset // block, rows)
        return state, store(outputs, slot, anchor_slot, emitted_values(state, info))

    def cond(carry):
        state, _ = carry
        return jnp.max((state.t - info.start < info.length).astype(jnp.int32)) > 0  # (no reduce_or in Triton)

    return lax.while_loop(cond, body, (initial_state(info, chunk_cut, k=k), outputs))[1]


def unflatten_outputs(out: Outputs, lanes: int, C: int, rows: int) -> Outputs:
    """Flat ``[>= lanes * (C + 1)]`` outputs -> ``[lanes, C]`` and ``[lanes, rows]``, sinks dropped."""
    per_position = lambda x: x[:lanes * (C + 1)].reshape(lanes, C + 1)[:, :C]
    return Outputs(*(per_position(x) for x in out[:4]), per_position(out.exact).astype(bool),
                   out.anchor_top[:lanes * (rows + 1)].reshape(lanes, rows + 1)[:, :rows])


CUT_FLOATS = ("tau", "c0", "sum_hi", "sum_lo", "theta")
CUT_INTS = ("n_upper", "n_mid", "a_upper", "a_above", "q_upper", "q_above", "a_top", "q_top", "theta_pos")


def unpack_scalars(scalars, exact_sums: ExactSums = sum_each):
    """The four int32 scalars of a chunk, (a_count, a_doc, cut_pos, cut_doc), from a [4] vector (masked sums:
    Triton cannot slice)."""
    return exact_sums(tuple(jnp.where(lax.iota(jnp.int32, 4) == n, scalars, 0) for n in range(4)))


def chunk_cut_state(a_z, a_pos, q_z, q_pos, q_seg, scalars, *, at_cut: bool, k: int,
                    exact_sums: ExactSums = sum_each) -> Cut:
    """``cut_state`` of one chunk at its start (``at_cut=False``: the buffer alone) or at its first cut
    (``at_cut=True``: the buffer if it is in that document, and the chunk's keys of that document up to the
    cut). ``scalars`` = (a_count, a_doc, cut_pos, cut_doc), int32 [4]."""
    a_count, a_doc, cut_pos, cut_doc = unpack_scalars(scalars, exact_sums)
    ia = lax.iota(jnp.int32, a_z.shape[0])
    q_valid = q_pos >= 0
    state = functools.partial(cut_state, k=k, exact_sums=exact_sums)
    if not at_cut:
        return state(a_z, a_pos, ia < a_count, q_z, q_pos, q_valid, None)
    a_valid = (ia < a_count) & (a_doc == cut_doc)
    q_vis = q_valid & (q_pos <= cut_pos) & (q_seg == cut_doc)
    return state(a_z, a_pos, a_valid, q_z, q_pos, q_valid, q_vis)


class Summaries(NamedTuple):
    """Prefix summaries of chunks, ``[rows, n, ...]``: the top ``R`` keys of the range's last document sorted
    by (score, position) descending (``z``, ``pos``; padding ``-inf`` / ``-1``), ``dropped`` ``[rows, n, 1]``
    the largest score cut from them, and ``docs`` int32 ``[rows, n, 4]``: the document of the range's first
    and last key, whether a document starts inside, and 0."""

    z: jax.Array
    pos: jax.Array
    dropped: jax.Array
    docs: jax.Array
