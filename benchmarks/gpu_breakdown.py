"""Where the thresholds' time goes on the GPU, stage by stage, and what the whole SparseK forward costs.

    python -m benchmarks.gpu_breakdown [--seqs 8192 65536 131072] [--scan-blocks 256 512]

bf16 inputs, 12 heads, head_dim 64, batch x seq = 65,536 tokens, topk = window = 1024, median of 5. Stages of
``blocked_thresholds(..., implementation="pallas_gpu")`` (see docs/kernels.md, "Thresholds"):

- prepare: chunk sort, per-chunk summaries and their associative scan (Pallas merge kernel), the cut-state
  kernel (``prepare`` includes it; ``cut_states`` is that kernel alone);
- lanes: the event-simulation kernel;
- total: everything, with the anchor lists and the shift to queries.

Also the compile time of forward+backward of the attention at the longest lengths. Writes
benchmarks/results/gpu_breakdown.json.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp

import sparsek_jax as sk
from benchmarks import reporting
from benchmarks.gpu_attention import make_inputs, time_ms
from sparsek_kernels import thresholds_pallas as lanes
from sparsek_jax import thresholds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 65536, 131072])
    parser.add_argument("--scan-blocks", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--topk", type=int, default=1024)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (a smoke test on CPU)")
    args = parser.parse_args(argv)
    k = args.topk
    rows = []
    for seq in args.seqs:
        q, kk, v, u = make_inputs(seq, 12, 12, 64, tokens=seq if args.interpret else None)
        segments = jnp.zeros(u.shape[:2], jnp.int32)
        buffer = thresholds.default_buffer_size(k, seq)
        row_u = jnp.moveaxis(u, 2, 1).reshape(-1, seq)
        row_seg = jnp.zeros(row_u.shape, jnp.int32)
        row = {"seq": seq, "batch": q.shape[0]}
        for chunk in args.scan_blocks:
            backend = thresholds.threshold_steps("pallas_gpu", args.interpret)
            prepare = jax.jit(functools.partial(thresholds.prepare_chunks, topk=k, buffer_size=buffer, chunk=chunk,
                                                backend=backend))
            row[f"C{chunk}_prepare_ms"] = time_ms(prepare, row_u, row_seg, repeats=5)
            ch = prepare(row_u, row_seg)
            flat = lambda x: x.reshape((-1,) + x.shape[2:])
            scalars = jnp.zeros((flat(ch.q_z).shape[0], 4), jnp.int32).at[:, 0].set(ch.info.a_count).at[:, 2].set(
                ch.info.cut_pos)
            cut_states = jax.jit(functools.partial(lanes.pallas_cut_states, k=k, interpret=args.interpret))
            a_z = ch.lists.a_z.reshape(-1, buffer)
            row[f"C{chunk}_cut_states_ms"] = time_ms(cut_states, a_z, flat(ch.a_pos), flat(ch.q_z), flat(ch.q_pos),
                                                     flat(ch.q_seg), scalars, repeats=5)
            run_lanes = jax.jit(functools.partial(lanes.pallas_lanes, k=k, buffer_size=buffer, chunk=chunk,
                                                  block=args.block_size, anchor_offset=0,
                                                  interpret=args.interpret))
            row[f"C{chunk}_lanes_ms"] = time_ms(run_lanes, ch.lists, ch.info, ch.chunk_cut, ch.start_cut, repeats=5)
            total = jax.jit(functools.partial(thresholds.blocked_thresholds, topk=k, window=args.window,
                                              buffer_size=buffer, block_size=args.block_size, scan_block=chunk,
                                              implementation="pallas_gpu", interpret=args.interpret))
            start = time.perf_counter()
            total.lower(u, segments).compile()
            row[f"C{chunk}_compile_s"] = time.perf_counter() - start
            row[f"C{chunk}_total_ms"] = time_ms(total, u, segments, repeats=5)
            print(row, flush=True)
        attention = functools.partial(sk.sparsek_attention, topk=k, window=args.window, implementation="pallas_gpu",
                                      interpret=args.interpret)
        forward = jax.jit(attention)
        row["fwd_total_ms"] = time_ms(forward, q, kk, v, u, repeats=5)
        if seq >= 65536:
            both = jax.jit(jax.grad(lambda *a: jnp.sum(attention(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3)))
            start = time.perf_counter()
            both.lower(q, kk, v, u).compile()
            row["fwdbwd_compile_s"] = time.perf_counter() - start
        print(row, flush=True)
        rows.append(row)
        reporting.write_json("gpu_breakdown", vars(args), rows)


if __name__ == "__main__":
    main()
