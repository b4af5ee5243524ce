"""Forward+backward compile time, run time and compiled memory of the XLA path against the dense reference,
by sequence length.

    python -m benchmarks.xla_scaling            # seq 2k..32k, topk=256, window=256 (CPU: ~10 minutes)

Writes benchmarks/results/xla_scaling_<backend>.json, docs/images/xla_scaling_<backend>.png and prints a
Markdown table. The reference is only run while its compiled program fits the memory budget.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import sparsek_jax as sk
from benchmarks import reporting


def compiled_program(implementation, shapes, *, topk, window, block_size):
    def loss(q, k, v, u):
        out = sk.sparsek_attention(q, k, v, u, topk=topk, window=window, implementation=implementation,
                                   block_sizes=sk.BlockSizes(block_q=block_size))
        return jnp.sum(out.astype(jnp.float32))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    return step.lower(*args).compile()


def peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
               - m.alias_size_in_bytes)


def time_program(compiled, shapes, repeats, seed=0):
    rng = np.random.default_rng(seed)
    seq = shapes[0][1]
    q, k, v = (jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in shapes[:3])
    # Scores as a trained scorer would give them: noise plus the position slope.
    u = jnp.asarray((rng.normal(size=shapes[3]) + 0.01 * np.arange(seq)[None, :, None]).astype(np.float32))
    jax.block_until_ready(compiled(q, k, v, u))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v, u))
        times.append(time.perf_counter() - start)
    # The minimum: on a shared CPU, noise only ever adds time. The median is kept in the JSON too.
    return min(times), statistics.median(times)


def plot(rows, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for impl, marker in (("xla", "o"), ("reference", "s")):
        ran = [r for r in rows if r.get(f"{impl}_ms") is not None]
        axes[0].plot([r["seq"] for r in ran], [r[f"{impl}_ms"] for r in ran], marker=marker, label=impl)
        # Memory comes from the compiled program, so it is known even where the program was not run.
        axes[1].plot([r["seq"] for r in rows], [r[f"{impl}_mib"] for r in rows], marker=marker, label=impl)
    seqs = [r["seq"] for r in rows]
    for ax, key in ((axes[0], "xla_ms"), (axes[1], "xla_mib")):
        base = rows[0][key]
        ax.plot(seqs, [base * s / seqs[0] for s in seqs], ":", color="grey", label="linear")
        ax.plot(seqs, [base * (s / seqs[0]) ** 2 for s in seqs], "--", color="grey", label="quadratic")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    axes[0].set_ylabel("forward + backward, ms")
    axes[1].set_ylabel("compiled memory, MiB")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--topk", type=int, default=256)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--q-heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (the reference gets half)")
    parser.add_argument("--reference-budget-gib", type=float, default=12.0,
                        help="run the reference only while its compiled program needs less than this")
    args = parser.parse_args(argv)

    backend = jax.default_backend()
    config = {k: v for k, v in vars(args).items()}
    rows = []
    for seq in args.seqs:
        shapes = [(1, seq, args.q_heads, args.head_dim), (1, seq, args.kv_heads, args.head_dim),
                  (1, seq, args.kv_heads, args.head_dim), (1, seq, args.kv_heads)]
        row = {"seq": seq}
        for impl in ("xla", "reference"):
            start = time.perf_counter()
            compiled = compiled_program(impl, shapes, topk=args.topk, window=args.window,
                                        block_size=args.block_size)
            row[f"{impl}_compile_s"] = time.perf_counter() - start
            mib = peak_bytes(compiled) / 2**20
            row[f"{impl}_mib"] = mib
            if mib > args.reference_budget_gib * 1024:
                row[f"{impl}_ms"] = None
                row[f"{impl}_note"] = "compiled but not run: over the memory budget"
                print(f"seq={seq:6d} {impl:9s} needs {mib:9.0f} MiB: not run")
                continue
            repeats = args.repeats if impl == "xla" else max(1, args.repeats // 2)
            best, median = time_program(compiled, shapes, repeats)
            row[f"{impl}_ms"], row[f"{impl}_median_ms"] = best * 1e3, median * 1e3
            print(f"seq={seq:6d} {impl:9s} {row[f'{impl}_ms']:9.1f} ms {mib:9.0f} MiB", flush=True)
        rows.append(row)
    for prev, cur in zip(rows, rows[1:]):
        cur["xla_time_growth"] = cur["xla_ms"] / prev["xla_ms"]
        cur["xla_memory_growth"] = cur["xla_mib"] / prev["xla_mib"]
        if cur.get("reference_ms") and prev.get("reference_ms"):
            cur["reference_time_growth"] = cur["reference_ms"] / prev["reference_ms"]
        cur["reference_memory_growth"] = cur["reference_mib"] / prev["reference_mib"]

    title = (f"SparseK forward+backward on {backend}: topk={args.topk}, window={args.window}, "
             f"{args.q_heads}q/{args.kv_heads}kv heads, head_dim {args.head_dim}")
    reporting.publish(f"xla_scaling_{backend}", config, rows, plot=lambda rows, path: plot(rows, path, title),
                      columns=[
        ("seq", "seq", "d"), ("xla_compile_s", "xla compile s", ".1f"), ("xla_ms", "xla ms", ".0f"),
        ("xla_time_growth", "× per doubling", ".2f"),
        ("xla_mib", "xla MiB", ".0f"), ("xla_memory_growth", "× per doubling", ".2f"),
        ("reference_ms", "reference ms", ".0f"), ("reference_time_growth", "× per doubling", ".2f"),
        ("reference_mib", "reference MiB", ".0f"), ("reference_memory_growth", "× per doubling", ".2f")])


if __name__ == "__main__":
    main()
