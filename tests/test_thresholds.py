import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsek_jax as sk
from builders import random_scores, random_segments
from oracles import bisect_threshold, topk_newest_first


def dense_expectations(u, topk, window, segments):
    """tau, theta, the selected set and candidates per query by brute force (float64 bisection)."""
    u = np.asarray(u, np.float64)
    batch, seq, heads = u.shape
    seg = np.zeros((batch, seq), int) if segments is None else np.asarray(segments)
    tau = np.full(u.shape, np.nan)
    theta = np.full(u.shape, np.nan)
    selected = np.zeros((batch, heads, seq, seq), bool)
    for b in range(batch):
        for h in range(heads):
            for i in range(seq):
                cand = [j for j in range(i - window + 1) if seg[b, j] == seg[b, i]]
                tau[b, i, h] = bisect_threshold(u[b, cand, h], topk) if topk else np.inf
                top = topk_newest_first(u[b, :, h], cand, topk)
                selected[b, h, i, list(top)] = True
                theta[b, i, h] = (min(u[b, j, h] for j in top) if len(cand) > topk else -np.inf) if topk else np.inf
    return tau, theta, selected


CASES = [  # (seq, heads, topk, window, ties, segments, block_size)
    (45, 2, 5, 3, False, False, 8),
    (64, 1, 1, 0, False, True, 16),
    (37, 2, 6, 0, True, False, 7),
    (50, 2, 4, 9, True, True, 16),
    (23, 1, 40, 2, False, False, 8),   # topk larger than every prefix
    (30, 2, 3, 40, False, False, 8),   # window longer than the sequence: no candidates
    (40, 1, 0, 4, False, False, 8),    # topk = 0: nothing selected
]


@pytest.mark.parametrize("seq, heads, topk, window, ties, segmented, block", CASES)
def test_matches_brute_force(rng, seq, heads, topk, window, ties, segmented, block):
    u = random_scores(rng, 2, seq, heads, ties=ties)
    segments = random_segments(rng, 2, seq) if segmented else None
    tau, theta, info = sk.prefix_thresholds(u, topk=topk, window=window, segment_ids=segments,
                                            buffer_size=seq, chunk_size=block, return_info=True)
    exp_tau, exp_theta, exp_selected = dense_expectations(u, topk, window, segments)
    np.testing.assert_allclose(np.asarray(tau), exp_tau, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(theta), exp_theta.astype(np.float32))
    assert bool(info.exact.all())
    # The (theta, theta_pos) rule reproduces the selected set exactly, ties included.
    j = np.arange(seq)
    th = np.moveaxis(np.asarray(theta), 1, 2)[..., None]
    tp = np.moveaxis(np.asarray(info.theta_pos), 1, 2)[..., None]
    uu = np.moveaxis(np.asarray(u), 1, 2)[:, :, None, :]
    seg = np.zeros((2, seq), int) if segments is None else np.asarray(segments)
    cand = (j[None, :] <= j[:, None] - window)[None, None] & (seg[:, None, :, None] == seg[:, None, None, :])
    selected = cand & np.asarray(sk.is_selected(uu, j, th, tp))
    np.testing.assert_array_equal(selected, exp_selected)
    # The dense pattern agrees too.
    pattern = sk.attention_pattern(u, topk=topk, window=window, segment_ids=segments)
    np.testing.assert_array_equal(np.asarray(pattern.selected), exp_selected)
    # num_fractional counts the candidates with 0 < u - tau < 1, the float32 test of the gates, at the tau
    # returned (ties put scores exactly on tau and tau + 1).
    tau_q = np.moveaxis(np.asarray(tau), 1, 2)  # [batch, heads, queries]
    gap = (uu - tau_q[..., None]).astype(np.float32)
    expected = np.where(np.isfinite(tau_q), (cand & (gap > 0) & (gap < 1)).sum(-1), 0)
    np.testing.assert_array_equal(np.moveaxis(np.asarray(info.num_fractional), 1, 2), expected)


@pytest.mark.parametrize("ties", [False, True])
def test_monotone_counts_and_support(rng, ties):
    seq, topk, window = 96, 7, 5
    u = random_scores(rng, 2, seq, 3, ties=ties)
    segments = random_segments(rng, 2, seq)
    tau, theta, info = sk.prefix_thresholds(u, topk=topk, window=window, segment_ids=segments,
                                            chunk_size=32, return_info=True)
    tau, theta, seg = np.asarray(tau), np.asarray(theta), np.asarray(segments)
    same_doc = (seg[:, 1:] == seg[:, :-1])[..., None]
    assert np.all((tau[:, 1:] >= tau[:, :-1]) | ~same_doc), "tau must not decrease within a document"
    assert np.all((theta[:, 1:] >= theta[:, :-1]) | ~same_doc), "theta must not decrease within a document"
    pattern = sk.attention_pattern(u, topk=topk, window=window, segment_ids=segments)
    j = np.arange(seq)
    cand = (j[None, :] <= j[:, None] - window)[None, None] & (seg[:, None, :, None] == seg[:, None, None, :])
    np.testing.assert_array_equal(np.asarray(pattern.selected).sum(-1),
                                  np.broadcast_to(np.minimum(topk, cand.sum(-1)), (2, 3, seq)))
    # The top-k lie inside the SPARSEK support: every selected key has a positive gate.
    gates = np.asarray(pattern.gates)
    assert np.all(gates[np.asarray(pattern.selected)] > 0)


def test_bounded_buffer_reports_inexact(rng):
    # Scores within a narrow band: many fractional gates, so a small buffer must lose keys above tau.
    seq, topk = 128, 4
    u = jnp.asarray(rng.uniform(0, 0.5, size=(1, seq, 1)).astype(np.float32))
    tau, _, info = sk.prefix_thresholds(u, topk=topk, window=0, buffer_size=6, chunk_size=16, return_info=True)
    exp_tau, _, _ = dense_expectations(u, topk, 0, None)
    exact = np.asarray(info.exact)
    assert not exact.all(), "a 6-key buffer cannot hold a support of ~10 keys"
    finite = np.isfinite(exp_tau)
    np.testing.assert_allclose(np.asarray(tau)[exact & finite], exp_tau[exact & finite], atol=2e-5)
    # A position slope keeps the support near topk: the same buffer is then exact everywhere.
    u_slope = u + 0.25 * jnp.arange(seq, dtype=jnp.float32)[None, :, None]
    _, _, info = sk.prefix_thresholds(u_slope, topk=topk, window=0, buffer_size=6, chunk_size=16,
                                      return_info=True)
    assert bool(info.exact.all())


def test_jit_vmap_grad(rng):
    u = random_scores(rng, 2, 33, 2)
    fn = lambda x: sk.prefix_thresholds(x, topk=4, window=3, chunk_size=8)
    tau, _, info = sk.prefix_thresholds(u, topk=4, window=3, chunk_size=8, return_info=True)
    # vmapped and differentiated, each under jit (one program each, rather than op by op).
    mapped = jax.jit(jax.vmap(lambda x: fn(x[None])[0][0]))(u)
    np.testing.assert_array_equal(mapped, tau)
    # d tau_i / d u_l = [l in M_i] / |M_i|: each row of the Jacobian sums to 1 where some candidate has a
    # fractional gate, and to 0 where none has (tau on a flat piece of f).
    jac = jax.jit(jax.jacrev(lambda x: fn(x)[0][0, :, 0]))(u)[:, 0, :, 0]
    fractional = np.asarray(info.num_fractional)[0, :, 0] > 0
    np.testing.assert_allclose(np.asarray(jac).sum(-1), np.where(fractional, 1.0, 0.0), atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(scores=jnp.ones((4, 3))), r"scores: expected a rank-3 array \[batch, seq, kv_heads\], received shape \(4, 3\)"),
    (dict(topk=-1), "topk: expected a non-negative int, received -1"),
    (dict(window=2.5), r"window: expected a non-negative Python int, received 2.5"),
    (dict(segment_ids=jnp.zeros((1, 5), jnp.int32)), r"segment_ids: expected shape \(1, 8\)"),
    (dict(segment_ids=jnp.zeros((1, 8))), "segment_ids: expected an integer array"),
    (dict(buffer_size=2), r"buffer_size: expected None or at least min\(topk, seq\)=3, received 2"),
    (dict(scores=jnp.ones((1, 8, 2), jnp.int32)), "scores: expected a floating-point array"),
])
def test_bad_input(kwargs, match):
    args = dict(scores=jnp.ones((1, 8, 2)), topk=3, window=1)
    args.update(kwargs)
    scores = args.pop("scores")
    with pytest.raises(ValueError, match=match):
        sk.prefix_thresholds(scores, **args)


@pytest.mark.parametrize("window", [0, 13])
def test_scan_block_does_not_change_results(rng, window):
    # Scan blocks spanning several query blocks emit one anchor list per query block, the same lists. The
    # windows give anchor rows at a block's first row and at its fourth (13 = 2 * 8 - 3), two blocks later.
    from sparsek_jax.thresholds import blocked_thresholds
    u = random_scores(rng, 2, 75, 2, ties=True)
    segments = random_segments(rng, 2, 75)
    run = lambda scan_block: blocked_thresholds(u, segments, topk=6, window=window, buffer_size=12, block_size=8,
                                                scan_block=scan_block)
    one, three = run(8), run(24)
    # theta and the selection are exact with any buffer; tau wherever both runs report it exact (the
    # bounded buffer drops different keys when it is cut at different places).
    for name in ("theta", "theta_pos"):
        np.testing.assert_array_equal(np.asarray(getattr(one, name)), np.asarray(getattr(three, name)), err_msg=name)
    both_exact = np.asarray(one.exact & three.exact)
    assert both_exact.mean() > 0.5
    np.testing.assert_allclose(np.asarray(one.tau)[both_exact], np.asarray(three.tau)[both_exact], atol=1e-6)
    sets = lambda x: [sorted(p for p in row if p >= 0) for row in np.asarray(x).reshape(-1, x.shape[-1])]
    assert sets(one.anchors) == sets(three.anchors)


def test_flat_stretches_give_the_smallest_tau(rng):
    # Widely spread scores leave gaps of more than 1 below the k-th largest: f = k on a whole interval, and
    # tau must be its left end. The breakpoint z - 1 of the k-th key sits at the interval's right end, where
    # an unclipped z - t would round just above 1; this once made the scan return the right end.
    fn = jax.jit(lambda u: sk.prefix_thresholds(u, topk=4, window=0, chunk_size=8))
    for draw in range(6):
        u = jnp.asarray((rng.normal(size=(2, 24, 1)) * 3 + 0.3 * np.arange(24)[None, :, None]).astype(np.float32))
        tau, _ = fn(u)
        exp_tau, _, _ = dense_expectations(u, 4, 0, None)
        np.testing.assert_allclose(np.asarray(tau), exp_tau, atol=2e-5, err_msg=f"draw {draw}")
    # The case that exposed it (exact float32 values): k = 4 over the first ten keys, f = 4 on
    # [0.8396, 0.9688]; 1.9688 - 0.9688 rounds to just above 1.
    # (Padded to the shape above, for the same program: later keys do not change tau at position 9.)
    u = jnp.asarray([1.9688117504119873, 0.8396244049072266, -1.7881110906600952, -1.0726420879364014,
                     0.7239075303077698, 0.19175346195697784, 3.73957896232605, -1.3926573991775513,
                     3.489962100982666, 7.291604518890381, 3.6040866374969482], jnp.float32)
    tau, _ = fn(jnp.zeros((2, 24, 1)).at[0, :11, 0].set(u))
    np.testing.assert_allclose(float(tau[0, 9, 0]), 0.8396244049072266, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("seq, batch", [(8192, 8), (65536, 1)])
def test_gpu_kernels_match_xla(seq, batch):
    # The Pallas GPU path (merge, cut-state and lane kernels) against the XLA path at real sizes: theta, its
    # position and the anchors exactly; tau and the counts to the last bits (reductions may differ in order).
    from sparsek_jax.thresholds import blocked_thresholds
    key = jax.random.key(seq)
    u = jax.random.normal(key, (batch, seq, 12)) + 1e-3 * jnp.arange(seq)[None, :, None]
    segments = jnp.zeros((batch, seq), jnp.int32)
    run = lambda impl: blocked_thresholds(u, segments, topk=1024, window=1024, buffer_size=2048, block_size=64,
                                          scan_block=256, implementation=impl)
    xla, gpu = run("xla"), run("pallas_gpu")
    for name in ("theta", "theta_pos", "anchors", "exact"):
        np.testing.assert_array_equal(np.asarray(getattr(gpu, name)), np.asarray(getattr(xla, name)), err_msg=name)
    np.testing.assert_allclose(np.asarray(gpu.tau), np.asarray(xla.tau), rtol=1e-6, atol=1e-6)
    differ = np.asarray(gpu.num_fractional) != np.asarray(xla.num_fractional)
    assert differ.mean() < 1e-4, f"num_fractional differs at {differ.sum()} of {differ.size} positions"


KERNEL_CASES = [  # (seq, heads, topk, window, ties, segmented, block, chunk, dtype)
    (45, 2, 5, 3, True, True, 8, 16, jnp.float32),     # ties, several documents per row
    (37, 1, 1, 0, False, True, 8, 24, jnp.float32),    # topk 1, window 0, a chunk of 24 (padded to 32 inside)
    (29, 2, 40, 4, False, False, 8, 8, jnp.float32),   # topk larger than every prefix
    (50, 2, 7, 6, False, True, 16, 32, jnp.bfloat16),  # bfloat16 scores, length not a multiple of any block
]


@pytest.mark.parametrize("seq, heads, topk, window, ties, segmented, block, chunk, dtype", KERNEL_CASES)
def test_pallas_kernels_match_xla_exactly(rng, seq, heads, topk, window, ties, segmented, block, chunk, dtype):
    # The three GPU kernels (summary scan, cut states, lanes) in interpret mode against the XLA path: the same
    # code, so every output is identical, anchors included; both against brute force.
    from sparsek_jax.thresholds import blocked_thresholds
    u = random_scores(rng, 2, seq, heads, ties=ties).astype(dtype).astype(jnp.float32)
    segments = random_segments(rng, 2, seq) if segmented else jnp.zeros((2, seq), jnp.int32)
    run = lambda impl: blocked_thresholds(u, segments, topk=topk, window=window, buffer_size=min(2 * topk + 4, seq),
                                          block_size=block, scan_block=chunk, implementation=impl, interpret=True)
    xla, kernels = run("xla"), run("pallas_gpu")
    for name in xla._fields:
        np.testing.assert_array_equal(np.asarray(getattr(kernels, name)), np.asarray(getattr(xla, name)),
                                      err_msg=name)
    exp_tau, exp_theta, _ = dense_expectations(u, topk, window, segments if segmented else None)
    exact = np.asarray(xla.exact) & np.isfinite(exp_tau)
    np.testing.assert_allclose(np.asarray(xla.tau)[exact], exp_tau[exact], atol=2e-5)
    np.testing.assert_array_equal(np.asarray(xla.theta), exp_theta.astype(np.float32))


def test_stacked_exact_sums_match_one_sum_per_term():
    # The XLA path stacks the sums a kernel takes one by one; int32 terms stay int32 (positions and document ids
    # beyond 2**24 would round as float32).
    from sparsek_kernels.simulation import sum_each
    from sparsek_kernels.thresholds_xla import sum_stacked
    big = jnp.asarray([[2**24 + 1, 3, -2], [7, 2**30, 0]], jnp.int32)
    halves = jnp.asarray([[0.5, 0.25, 0.0], [1.0, 0.125, 0.75]], jnp.float32)
    terms = (big, halves, big // 2, (big > 5).astype(jnp.int32))
    for got, want in zip(sum_stacked(terms), sum_each(terms)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("chunks, R", [(7, 12), (8, 16), (1, 5), (13, 3)])
def test_summary_scan_kernels_match_xla(rng, chunks, R):
    # The start buffers: the tree-scan kernels (interpret mode) against the XLA doubling scan, exactly. Chunks
    # of 6 keys with tied scores, several documents (some starting inside a chunk, some at its first key),
    # buffers that are not a power of two wide and chunk counts that are not a power of two.
    from sparsek_jax.thresholds import _sorted_desc
    from sparsek_kernels.simulation import Summaries
    from sparsek_kernels.thresholds_pallas import pallas_exclusive_scan
    from sparsek_kernels.thresholds_xla import xla_exclusive_scan
    rows, C = 3, 6
    z = (np.round(rng.normal(size=(rows, chunks * C)) * 2) / 2).astype(np.float32)
    docs = np.cumsum(rng.random((rows, chunks * C)) < 0.08, axis=1).astype(np.int32)
    pos = np.broadcast_to(np.arange(chunks * C, dtype=np.int32), (rows, chunks * C))
    chunked = lambda x: x.reshape(rows, chunks, C)
    last = chunked(docs)[:, :, -1]
    in_last = chunked(docs) == last[..., None]
    sz, spos = _sorted_desc(jnp.asarray(np.where(in_last, chunked(z), -np.inf)),
                            jnp.asarray(np.where(in_last, chunked(pos), -1)))
    width = max(R, C)
    pad = lambda x, fill: jnp.pad(x, [(0, 0), (0, 0), (0, width - C)], constant_values=fill)
    sz, spos = pad(sz, -jnp.inf), pad(spos, -1)
    starts_inside = np.any(np.diff(chunked(docs), axis=2) != 0, axis=2).astype(np.int32)
    summary = Summaries(sz[..., :R], spos[..., :R], jnp.max(sz[..., R:], axis=-1, initial=-jnp.inf, keepdims=True),
                        jnp.asarray(np.stack([chunked(docs)[:, :, 0], last, starts_inside, 0 * last], axis=-1)))
    want = xla_exclusive_scan(summary)
    got = pallas_exclusive_scan(summary, interpret=True, num_warps=4)
    # An exclusive prefix's meaning: its top keys, the largest score cut, the document of its last key.
    for name, g, w in (("z", got.z, want.z), ("pos", got.pos, want.pos), ("dropped", got.dropped, want.dropped),
                       ("document", got.docs[..., 1], want.docs[..., 1])):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)


def test_gpu_kernels_lower_to_triton(monkeypatch):
    # Every kernel of the GPU path lowers to Triton IR (no GPU needed: Pallas is told it targets sm_90), which
    # catches primitives the Triton lowering lacks before any device time is spent.
    import types
    from jax._src.pallas.triton import pallas_call_registration
    from sparsek_jax.thresholds import blocked_thresholds
    monkeypatch.setattr(pallas_call_registration, "gpu_info_lib", types.SimpleNamespace(
        get_gpu_info=lambda: types.SimpleNamespace(compute_capability="9.0")))
    f = jax.jit(lambda u, s: blocked_thresholds(u, s, topk=64, window=64, buffer_size=128, block_size=64,
                                                scan_block=256, implementation="pallas_gpu"))
    text = f.trace(jnp.zeros((2, 1024, 2)), jnp.zeros((2, 1024), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    names = ("scan_up", "scan_down", "start_states", "first_cuts", "lanes")
    missing = [n for n in names if f"sparsek_threshold_{n}" not in text]
    assert not missing, f"kernels not lowered: {missing}"


FUZZ_RUNS = int(os.environ.get("SPARSEK_FUZZ", "0"))


@pytest.mark.skipif(FUZZ_RUNS == 0, reason="fuzzing is opt-in: SPARSEK_FUZZ=<runs>")
def test_fuzz_against_brute_force():
    # Random lengths, budgets, windows, block and chunk sizes, ties, slopes and documents; every failure
    # names the draw's seed (replay with SPARSEK_TEST_SEED and SPARSEK_FUZZ).
    from sparsek_jax.thresholds import blocked_thresholds
    base = int(os.environ["SPARSEK_TEST_SEED"])
    for run in range(FUZZ_RUNS):
        seed = base + run
        rng = np.random.default_rng(seed)
        seq, heads, topk, window = int(rng.integers(5, 70)), int(rng.integers(1, 3)), int(rng.integers(1, 20)), \
            int(rng.integers(0, 12))
        block = int(rng.choice([4, 8, 16]))
        chunk = block * int(rng.integers(1, 4))
        u = rng.normal(size=(2, seq, heads)) * rng.choice([0.1, 1.0, 3.0]) + rng.choice([0, 0.02, 0.3]) * np.arange(
            seq)[None, :, None]
        if rng.random() < 0.3:
            u = np.round(u * 2) / 2
        u = jnp.asarray(u.astype(np.float32))
        segments = random_segments(rng, 2, seq) if rng.random() < 0.5 else None
        th = blocked_thresholds(u, jnp.zeros((2, seq), jnp.int32) if segments is None else segments, topk=topk,
                                window=window, buffer_size=min(2 * topk + 8, seq), block_size=block, scan_block=chunk)
        exp_tau, exp_theta, exp_selected = dense_expectations(u, topk, window, segments)
        where = f"fuzz draw seed={seed} (seq={seq}, topk={topk}, window={window}, block={block}, chunk={chunk})"
        tau, exact = np.asarray(th.tau), np.asarray(th.exact)
        np.testing.assert_array_equal(np.isfinite(tau), np.isfinite(exp_tau), err_msg=where)
        ok = exact & np.isfinite(exp_tau)
        np.testing.assert_allclose(tau[ok], exp_tau[ok], atol=3e-5, err_msg=where)
        np.testing.assert_array_equal(np.asarray(th.theta), exp_theta.astype(np.float32), err_msg=where)
        # The fractional count is taken with the attention's float test at the tau that is returned.
        seg = np.zeros((2, seq), int) if segments is None else np.asarray(segments)
        j = np.arange(seq)
        cand = (j[None, :] <= j[:, None] - window)[None] & (seg[:, :, None] == seg[:, None, :])  # [b, i, j]
        gap = np.asarray(u)[:, None, :, :] - tau[:, :, None, :]                                  # [b, i, j, h]
        want = np.sum(cand[..., None] & (gap > 0) & (gap < 1), axis=2)
        np.testing.assert_array_equal(np.asarray(th.num_fractional)[ok], np.where(np.isfinite(tau), want, 0)[ok],
                                      err_msg=where)
        for c in range(th.anchors.shape[2]):
            if c * block < seq:
                for b in range(2):
                    for h in range(heads):
                        got = {int(p) for p in np.asarray(th.anchors[b, h, c]) if p >= 0}
                        assert got == set(np.nonzero(exp_selected[b, h, c * block])[0].tolist()), where


@pytest.mark.parametrize("far", [-1e4, -1e9])
def test_far_scores_keep_tau_accurate(rng, far):
    # A masked-looking score makes tau climb a long way inside one chunk; the running sum is re-centred on
    # tau, so the closed form keeps its accuracy (it once drifted by 1.2 at -1e9 while reporting exact).
    u = rng.normal(size=(1, 64, 1)).astype(np.float32)
    u[0, 2, 0] = far
    u = jnp.asarray(u)
    tau, _, info = sk.prefix_thresholds(u, topk=2, window=0, buffer_size=8, chunk_size=16, return_info=True)
    exp_tau, _, _ = dense_expectations(u, 2, 0, None)
    ok = np.isfinite(exp_tau) & np.asarray(info.exact)
    np.testing.assert_allclose(np.asarray(tau)[ok], exp_tau[ok], atol=2e-5)


def test_fractional_count_agrees_with_tau_at_a_chunk_start():
    # tau on a breakpoint at a chunk's first key: the chunk's start state lands on it exactly, as a lane would,
    # so the count of 0 < u - tau < 1 is taken at the tau that is returned.
    u = jnp.asarray(np.array([-122.58437, 155.13582, -126.521774, 0.24619211, -113.69118, -5, -6, -7, -73.56559,
                              -8, -9, -10, -11, -12, -13, -14], np.float32)[None, :, None])
    tau, _, info = sk.prefix_thresholds(u, topk=1, window=0, chunk_size=8, return_info=True)
    t, scores = np.asarray(tau)[0, :, 0], np.asarray(u)[0, :, 0]
    want = [int(np.sum((scores[:i + 1] - t[i] > 0) & (scores[:i + 1] - t[i] < 1))) if np.isfinite(t[i]) else 0
            for i in range(16)]
    assert np.asarray(info.num_fractional)[0, :, 0].tolist() == want


@pytest.mark.parametrize("shape", [(0, 16, 2), (2, 16, 0)])
def test_empty_batch_or_heads(shape):
    tau, theta, info = sk.prefix_thresholds(jnp.ones(shape), topk=3, window=1, return_info=True)
    assert tau.shape == theta.shape == info.exact.shape == shape
    grad = jax.grad(lambda x: jnp.sum(sk.prefix_thresholds(x, topk=3, window=1)[0]))(jnp.ones(shape))
    assert grad.shape == shape


def test_gradients_reach_the_right_keys(rng):
    # d tau_i / d u is 1 / |M_i| on each fractional candidate and 0 elsewhere; d theta_i / d u is 1 on the
    # k-th key.
    u = random_scores(rng, 1, 30, 1)
    segments = jnp.asarray(np.repeat([0, 1], [12, 18])[None, :], jnp.int32)
    window, topk = 2, 3
    fn = lambda x, i: sk.prefix_thresholds(x, topk=topk, window=window, segment_ids=segments)[i][0, :, 0]
    tau, theta, info = sk.prefix_thresholds(u, topk=topk, window=window, segment_ids=segments, return_info=True)
    d_tau, d_theta = (np.asarray(jax.jacrev(lambda x: fn(x, i))(u))[:, 0, :, 0] for i in (0, 1))
    seg, scores = np.asarray(segments)[0], np.asarray(u)[0, :, 0]
    for i in range(30):
        t = float(tau[0, i, 0])
        cand = (np.arange(30) <= i - window) & (seg == seg[i])
        if np.isfinite(t):
            m = cand & (scores - t > 0) & (scores - t < 1)
            np.testing.assert_allclose(d_tau[i], np.where(m, 1.0 / max(m.sum(), 1), 0.0), atol=1e-6,
                                       err_msg=f"tau {i}")
            np.testing.assert_array_equal(d_theta[i], np.arange(30) == int(info.theta_pos[0, i, 0]))
        else:
            assert not d_tau[i].any() and not d_theta[i].any()


def test_one_buffer_size_rule_for_thresholds_attention_and_model():
    from sparsek_jax.nn import ModelConfig
    from sparsek_jax.thresholds import resolve_buffer_size

    # The buffer holds the min(topk, seq) best scores: that many is enough, one fewer is refused, everywhere.
    assert resolve_buffer_size(None, topk=8, seq=100) == sk.default_buffer_size(8, 100)
    assert resolve_buffer_size(5, topk=8, seq=5) == 5
    with pytest.raises(ValueError, match=r"buffer_size: expected None or at least min\(topk, seq\)=5, received 4"):
        resolve_buffer_size(4, topk=8, seq=5)
    u = jnp.zeros((1, 5, 1))
    q = jnp.zeros((1, 5, 1, 4))
    # Accepted (traced, not compiled: the rule is checked when tracing; test_matches_brute_force runs a buffer of
    # min(topk, seq) keys against brute force).
    jax.eval_shape(lambda u: sk.prefix_thresholds(u, topk=8, window=0, buffer_size=5), u)
    jax.eval_shape(lambda q, u: sk.sparsek_attention(q, q, q, u, topk=8, window=0, buffer_size=5), q, u)
    for call in (lambda: sk.prefix_thresholds(u, topk=8, window=0, buffer_size=4),
                 lambda: sk.sparsek_attention(q, q, q, u, topk=8, window=0, buffer_size=4)):
        with pytest.raises(ValueError, match=r"buffer_size: expected None or at least min\(topk, seq\)=5"):
            call()
    # A model config serves sequences of any length: there the rule is topk.
    ModelConfig(vocab_size=8, topk=8, buffer_size=8)
    with pytest.raises(ValueError, match="ModelConfig.buffer_size: expected None or at least topk=8, received 7"):
        ModelConfig(vocab_size=8, topk=8, buffer_size=7)
