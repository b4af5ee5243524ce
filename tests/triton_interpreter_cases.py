"""The Triton attention kernels run by Triton's interpreter, against the XLA path: output and dq, dk, dv, dscores.

Triton interprets only if ``TRITON_INTERPRET=1`` is set before it is first imported, so this runs in a process of
its own (``tests/test_triton.py`` starts it):

    TRITON_INTERPRET=1 XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/triton_interpreter_cases.py 0 3

Each argument is an index into ``CASES`` or ``end_to_end``. A case gives both backends the same thresholds, from
a per-query sort in NumPy (compiling the blocked thresholds would take most of a case's time), and compares their
forward, backward and the scores' gradient that the custom VJP builds from them. ``end_to_end`` runs the public
function with ``implementation="triton", interpret=True`` (blocked thresholds and all) under ``jax.jit`` and
``jax.vjp``, split over a 2 x 2 mesh of CPU devices (batch and KV heads), against the dense reference unsplit.
Prints one line per case; exits 1 on a mismatch.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import sparsek_jax as sk
from builders import assert_matches_reference, attention_inputs, value_and_grads
from oracles import bisect_threshold
from sparsek_jax import blocked
from sparsek_jax.thresholds import BlockedThresholds, document_index, resolve_buffer_size
from test_pallas_gpu import CASES as PALLAS_CASES

# (seq, q_heads, kv_heads, topk, window, gate, block, ties, segmented, tile_rows): the Pallas GPU kernels' cases
# with 16-row tiles, then a window long enough for unmasked band steps in every kernel, with 3 query heads per KV
# head, tiles that cut through queries and span several anchor blocks, ties, and "long" documents: one per
# sequence in the first row (unmasked steps), two in the second (bands across the cut fall back to masks).
CASES = [case + (16,) for case in PALLAS_CASES] + [(96, 3, 1, 6, 40, "value", 8, True, "long", 32)]
STEP = 16  # keys per forward step and the backward's step


def _config(implementation, seq, head_dim, topk, window, gate, block, tile_rows):
    blocks = sk.BlockSizes(block_q=block, tile_rows=tile_rows, block_k=STEP, backward_block_k=STEP)
    return blocked._Config(topk, window, gate, head_dim ** -0.5, implementation,
                           blocks.resolve(implementation, seq), resolve_buffer_size(None, topk=topk, seq=seq),
                           implementation == "triton")


@functools.partial(jax.jit, static_argnums=0)
def _backend_gradients(cfg, q, k, v, scores, segments, th, cotangent):
    """The custom VJP's steps after the thresholds: the backend's forward and backward, the scores' gradient."""
    backend = blocked._backend(cfg)
    selection = blocked._selection(th, scores, cfg)
    out, lse = backend.forward(q, k, v, scores, segments, selection, backend.options)
    dq, dk, dv, direct, gsum = backend.backward(q, k, v, scores, segments, selection, out, lse, cotangent,
                                                backend.options)
    return out, (dq, dk, dv, blocked._scores_gradient(direct, gsum, th, scores, segments, cfg))


def _sorted_thresholds(u, segments, *, topk, window, block):
    """What the blocked thresholds give, from each query's own sort of its candidates (``j <= i - window``, same
    document): ``tau`` by float64 bisection (its running maximum within a document, as the thresholds keep it),
    ``(theta, theta_pos)`` the ``topk``-th candidate by (score, position) when there are more, the anchors the
    candidates each block's first query selects."""
    u, docs = np.asarray(u, np.float32), np.asarray(segments)
    batch, seq, heads = u.shape
    tau = np.full(u.shape, -np.inf, np.float32)
    theta = np.full(u.shape, -np.inf, np.float32)
    theta_pos = np.full(u.shape, -1, np.int32)
    fractional = np.zeros(u.shape, np.int32)
    anchors = np.full((batch, heads, -(-seq // block), min(topk, seq)), -1, np.int32)
    for b in range(batch):
        for h in range(heads):
            for i in range(seq):
                candidates = [j for j in range(i - window + 1) if docs[b, j] == docs[b, i]]
                ranked = sorted(candidates, key=lambda j: (u[b, j, h], j), reverse=True)
                tau[b, i, h] = np.float32(bisect_threshold(u[b, candidates, h], topk))
                if i and docs[b, i - 1] == docs[b, i]:
                    tau[b, i, h] = max(tau[b, i, h], tau[b, i - 1, h])
                if len(ranked) > topk:
                    theta[b, i, h], theta_pos[b, i, h] = u[b, ranked[topk - 1], h], ranked[topk - 1]
                gap = u[b, candidates, h] - tau[b, i, h]
                fractional[b, i, h] = np.sum((gap > 0) & (gap < 1))
                if i % block == 0:
                    anchors[b, h, i // block, :len(ranked[:topk])] = ranked[:topk]
    arrays = tau, theta, theta_pos, fractional, np.ones(u.shape, bool), anchors
    return BlockedThresholds(*(jnp.asarray(x) for x in arrays))


def _inputs(index, seq, q_heads, kv_heads, ties, segmented):
    rng = np.random.default_rng(int(os.environ.get("SPARSEK_TEST_SEED", "0")) + index)
    q, k, v, u, seg = attention_inputs(rng, 2, seq, q_heads, kv_heads, 8, ties=ties, segmented=segmented is True)
    if segmented == "long":
        seg = jnp.asarray([[0] * seq, [0] * (2 * seq // 3) + [1] * (seq - 2 * seq // 3)], jnp.int32)
    return q, k, v, u, seg, jnp.asarray(rng.normal(size=q.shape).astype(np.float32))


def run_case(index: int):
    seq, q_heads, kv_heads, topk, window, gate, block, ties, segmented, tile_rows = CASES[index]
    q, k, v, u, seg, cotangent = _inputs(index, seq, q_heads, kv_heads, ties, segmented)
    segments = jnp.zeros(q.shape[:2], jnp.int32) if seg is None else document_index(seg)
    configs = [_config(impl, seq, q.shape[3], topk, window, gate, block, tile_rows) for impl in ("triton", "xla")]
    th = _sorted_thresholds(u, segments, topk=topk, window=window, block=block) if topk else None
    got, want = (_backend_gradients(cfg, q, k, v, u, segments, th, cotangent) for cfg in configs)
    assert_matches_reference(got, want)


def run_end_to_end():
    seq, q_heads, kv_heads, topk, window, gate, block, ties, segmented, tile_rows = CASES[0]
    q, k, v, u, seg, cotangent = _inputs(0, seq, q_heads, kv_heads, ties, True)
    options = dict(topk=topk, window=window, gate=gate, segment_ids=seg)
    attention = lambda implementation, **extra: (lambda q, k, v, u: sk.sparsek_attention(
        q, k, v, u, implementation=implementation, **options, **extra))
    mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        got = value_and_grads(attention("triton", interpret=True, mesh_axes=sk.MeshAxes(batch="data", heads="tensor"),
                                        block_sizes=sk.BlockSizes(block_q=block, tile_rows=tile_rows, block_k=STEP,
                                                                  backward_block_k=STEP)),
                              q, k, v, u, cotangent)
    assert_matches_reference(got, value_and_grads(attention("reference"), q, k, v, u, cotangent))


def main(names):
    failed = False
    for name in names:
        try:
            run_end_to_end() if name == "end_to_end" else run_case(int(name))
            print(f"{name}: ok", flush=True)
        except Exception:  # report every case, then fail
            failed = True
            print(f"{name}: FAILED {CASES[int(name)] if name.isdigit() else ''}\n{traceback.format_exc()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
