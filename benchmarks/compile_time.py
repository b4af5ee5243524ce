"""Compile and run time of SparseK attention, forward and forward+backward, against the sequence length.

    python -m benchmarks.compile_time                       # CPU: xla path, 512 ... 16k tokens
    python -m benchmarks.compile_time --seqs 8192 65536 131072 --implementation pallas_gpu   # on a GPU

One sequence (batch 8 on GPUs: 64k tokens per call at 8k), 2 KV heads on CPU / 12 on GPU, head_dim 64,
topk = window = 256 (1024 on GPUs). Compile time is ``jax.jit(f).lower(...).compile()`` of a fresh function;
the HLO instruction count of forward+backward is printed too (it should barely depend on the length: the
program depends on it through shapes, not through unrolled loops or per-length constants). Run time is the
median of 3 calls after one warm-up. Writes benchmarks/results/compile_time_<backend>.json (or ``--name``) and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import sparsek_jax as sk
from benchmarks import reporting


def attention(topk, window, implementation):
    def forward(q, k, v, u):
        return sk.sparsek_attention(q, k, v, u, topk=topk, window=window, implementation=implementation)

    def forward_backward(q, k, v, u):
        return jax.grad(lambda *a: jnp.sum(forward(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))(q, k, v, u)

    return forward, forward_backward


def hlo_instructions(lowered) -> int:
    return len(re.findall(r"= \S+ [\w-]+\(", lowered.as_text(dialect="hlo")))


def measure(fn, args):
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times) * 1e3, hlo_instructions(lowered)


def main(argv=None):
    on_gpu = jax.default_backend() == "gpu"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+",
                        default=[8192, 65536, 131072] if on_gpu else [512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--implementation", default="auto")
    parser.add_argument("--topk", type=int, default=1024 if on_gpu else 256)
    parser.add_argument("--window", type=int, default=1024 if on_gpu else 256)
    parser.add_argument("--name", default=f"compile_time_{jax.default_backend()}",
                        help="results name: benchmarks/results/NAME.json")
    args = parser.parse_args(argv)
    heads, dtype = (12, jnp.bfloat16) if on_gpu else (2, jnp.float32)
    forward, forward_backward = attention(args.topk, args.window, args.implementation)
    rows = []
    for seq in args.seqs:
        batch = max(65536 // seq, 1) if on_gpu else 1
        rng = np.random.default_rng(seq)
        q, k, v = (jnp.asarray(rng.normal(size=(batch, seq, heads, 64)), dtype) for _ in range(3))
        u = jnp.asarray(rng.normal(size=(batch, seq, heads)) + 1e-2 * np.arange(seq)[None, :, None], jnp.float32)
        row = {"seq": seq, "batch": batch}
        for name, fn in (("fwd", forward), ("fwdbwd", forward_backward)):
            row[f"{name}_compile_s"], row[f"{name}_ms"], row[f"{name}_hlo"] = measure(fn, (q, k, v, u))
        print(row, flush=True)
        rows.append(row)
        reporting.write_json(args.name, vars(args), rows)
    reporting.publish(args.name, vars(args), rows, columns=[
        ("seq", "seq", "d"), ("batch", "batch", "d"), ("fwd_compile_s", "fwd compile s", ".1f"),
        ("fwd_ms", "fwd ms", ".1f"), ("fwdbwd_compile_s", "f+b compile s", ".1f"), ("fwdbwd_ms", "f+b ms", ".1f"),
        ("fwdbwd_hlo", "f+b HLO instructions", "d")])


if __name__ == "__main__":
    main()
