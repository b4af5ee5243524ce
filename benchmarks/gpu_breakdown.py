"""Where SparseK's time goes: the thresholds (per scan block and buffer size) and the whole forward.

    python -m benchmarks.gpu_breakdown [--seqs 8192 65536] [--scan-blocks 64 128 256]

bf16, 12 heads, head_dim 64, batch x seq = 65,536 tokens, topk = window = 1024, median of 5.
Writes benchmarks/results/gpu_breakdown.json.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import sparsek_jax as sk
from benchmarks import reporting
from benchmarks.gpu_attention import make_inputs, time_ms
from sparsek_jax.thresholds import blocked_thresholds, default_buffer_size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 65536])
    parser.add_argument("--scan-blocks", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--topk", type=int, default=1024)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=64)
    args = parser.parse_args(argv)
    rows = []
    for seq in args.seqs:
        q, k, v, u = make_inputs(seq, 12, 12, 64)
        segments = jnp.zeros(u.shape[:2], jnp.int32)
        row = {"seq": seq, "batch": q.shape[0]}
        for buffer in (default_buffer_size(args.topk, seq), args.topk + 64):
            for scan_block in args.scan_blocks:
                thresholds = jax.jit(lambda u: blocked_thresholds(
                    u, segments, topk=args.topk, window=args.window, buffer_size=buffer,
                    block_size=args.block_size, scan_block=scan_block))
                row[f"thresholds_R{buffer}_T{scan_block}_ms"] = time_ms(thresholds, u, repeats=5)
                print(row, flush=True)
        for impl in ("pallas_gpu", "xla"):
            f = jax.jit(lambda q, k, v, u: sk.sparsek_attention(q, k, v, u, topk=args.topk, window=args.window,
                                                                implementation=impl))
            row[f"{impl}_fwd_total_ms"] = time_ms(f, q, k, v, u, repeats=5)
        print(row, flush=True)
        rows.append(row)
        reporting.write_json("gpu_breakdown", vars(args), rows)


if __name__ == "__main__":
    main()
