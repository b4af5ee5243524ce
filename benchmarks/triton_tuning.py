"""Launch parameters of the Triton attention kernels at one length, and where the time goes per kernel.

    python -m benchmarks.triton_tuning --variants 128,64,32,8,3 64,64,32,8,3 128,64,32,8,4 --profile 128,64,32,8,3

A variant is ``tile_rows,block_k,backward_block_k,num_warps,num_stages`` (the Triton fields of ``sk.BlockSizes``).
bf16, 12 query heads, head_dim 64, batch x seq = 65,536, topk = window = 1024, everything included (scores,
thresholds, attention), median of 5; each variant with 12 and 4 KV heads (``--kv-heads``). ``--profile`` traces 5
forward+backward calls of one variant with ``jax.profiler`` and sums device time per kernel name (the three
Triton kernels are ``_forward_kernel``, ``_backward_queries_kernel``, ``_backward_keys_kernel``): the figures to
hold against ``python -m benchmarks.triton_cost_model``. Writes benchmarks/results/triton_tuning.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

import sparsek_jax as sk
from benchmarks import reporting
from benchmarks.gpu_attention import make_inputs, time_ms
from benchmarks.gpu_threshold_tuning import device_time_by_kernel

FIELDS = ("tile_rows", "block_k", "backward_block_k", "num_warps", "num_stages")


def attention(blocks: sk.BlockSizes, topk: int, window: int):
    return lambda q, k, v, u: sk.sparsek_attention(q, k, v, u, topk=topk, window=window, implementation="triton",
                                                   block_sizes=blocks)


def forward_backward(f):
    return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--variants", nargs="+", default=["128,64,32,8,3", "64,64,32,8,3", "128,64,32,8,4"])
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[12, 4])
    parser.add_argument("--topk", type=int, default=1024)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--profile", default=None, help="a variant to trace")
    args = parser.parse_args(argv)
    rows = []
    for kv_heads in args.kv_heads:
        q, k, v, u = make_inputs(args.seq, 12, kv_heads, 64)
        for variant in args.variants:
            blocks = sk.BlockSizes(**dict(zip(FIELDS, (int(x) for x in variant.split(",")))))
            f = attention(blocks, args.topk, args.window)
            row = {"variant": variant, "seq": args.seq, "kv_heads": kv_heads}
            try:
                row["fwd_ms"] = time_ms(jax.jit(f), q, k, v, u, repeats=5)
                row["fwdbwd_ms"] = time_ms(forward_backward(f), q, k, v, u, repeats=5)
            except Exception as error:  # report, keep going (a launch that does not fit, say)
                row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            print(row, flush=True)
            rows.append(row)
            reporting.write_json("triton_tuning", vars(args), rows)
    if args.profile:
        blocks = sk.BlockSizes(**dict(zip(FIELDS, (int(x) for x in args.profile.split(",")))))
        for kv_heads in args.kv_heads:
            q, k, v, u = make_inputs(args.seq, 12, kv_heads, 64)
            both = forward_backward(attention(blocks, args.topk, args.window))
            jax.block_until_ready(both(q, k, v, u))
            calls = 5
            with tempfile.TemporaryDirectory() as trace_dir:
                with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                    for _ in range(calls):
                        jax.block_until_ready(both(q, k, v, u))
                profile = device_time_by_kernel(Path(trace_dir), calls)
            total = sum(p["ms_per_call"] for p in profile)
            print(f"12:{kv_heads}: device time {total:.2f} ms per forward+backward")
            for p in profile[:25]:
                print(f"  {p['ms_per_call']:8.3f} ms  x{p['launches_per_call']:.0f}  {p['kernel'][:100]}")
            rows.append({"variant": args.profile, "seq": args.seq, "kv_heads": kv_heads, "profile_device_ms": total,
                         "profile": profile})
            reporting.write_json("triton_tuning", vars(args), rows)
    reporting.publish("triton_tuning", vars(args), [r for r in rows if "profile" not in r], columns=[
        ("variant", "tile_rows,block_k,backward_block_k,warps,stages", "s"), ("kv_heads", "kv heads", "d"),
        ("fwd_ms", "fwd ms", ".2f"), ("fwdbwd_ms", "f+b ms", ".2f"), ("error", "error", "s")], write=False)


if __name__ == "__main__":
    main()
