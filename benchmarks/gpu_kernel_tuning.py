"""Tile sizes of the Pallas GPU kernels: forward and forward+backward at one length, per variant.

    python -m benchmarks.gpu_kernel_tuning --seq 65536 --variants 64,64,8 64,32,8 128,64,4

A variant is ``block_q,block_k,blocks_per_group[,num_warps,num_stages]`` (the fields of ``sk.BlockSizes``:
queries per tile, keys per kernel step, query blocks per super-block of the key-major backward, Triton launch
parameters; left out: the defaults). bf16, 12 heads, head_dim 64, batch x seq = 65,536, topk = window =
1024, median of 5, everything included. Writes benchmarks/results/gpu_kernel_tuning.json.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import reporting
from benchmarks.gpu_attention import make_inputs, time_ms
import sparsek_jax as sk


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--variants", nargs="+", default=["64,64,8", "64,32,8", "128,64,4"])
    parser.add_argument("--topk", type=int, default=1024)
    parser.add_argument("--window", type=int, default=1024)
    args = parser.parse_args(argv)
    q, k, v, u = make_inputs(args.seq, 12, 12, 64)
    rows = []
    for variant in args.variants:
        fields = ("block_q", "block_k", "blocks_per_group", "num_warps", "num_stages")
        blocks = sk.BlockSizes(**dict(zip(fields, (int(x) for x in variant.split(",")))))
        f = lambda q, k, v, u: sk.sparsek_attention(q, k, v, u, topk=args.topk, window=args.window,
                                                    implementation="pallas_gpu", block_sizes=blocks)
        row = {"variant": variant, "seq": args.seq}
        row["fwd_ms"] = time_ms(jax.jit(f), q, k, v, u, repeats=5)
        both = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3)))
        row["fwdbwd_ms"] = time_ms(both, q, k, v, u, repeats=5)
        print(row, flush=True)
        rows.append(row)
        reporting.write_json("gpu_kernel_tuning", vars(args), rows)


if __name__ == "__main__":
    main()
