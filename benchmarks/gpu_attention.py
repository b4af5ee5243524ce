"""SparseK attention against cuDNN dense and cuDNN sliding-window attention, in one process.

    python -m benchmarks.gpu_attention            # on the H200: all cases below (~10 minutes)
    python -m benchmarks.gpu_attention --quick    # a few cases
    python -m benchmarks.gpu_attention --replot   # table and plot again from the saved JSON
    python -m benchmarks.gpu_attention --implementation pallas_tpu   # on a TPU: XLA attention as baseline
    python -m benchmarks.gpu_attention --implementation triton       # the Triton kernels and the Pallas ones

bf16, causal, batch x seq = 65,536 tokens per call, median of 10 after warm-up. Everything is included for
SparseK: scores -> thresholds -> attention (forward), and the backward to q, k, v and the scores.
The sliding-window baseline attends to the same number of keys per query (``topk + window``). With
``--implementation triton`` the Pallas GPU kernels it replaces run in the same process too (``pallas_*`` columns).
Effective TFLOP/s counts 4 * heads * head_dim * (keys attended) per query (x 3.5 for forward+backward, the
FlashAttention convention) so that dense and sparse numbers compare as work actually done.
Writes benchmarks/results/<backend>_attention.json and docs/images/<backend>_attention.png (with
``--implementation triton``: <backend>_attention_triton).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import sparsek_jax as sk
from benchmarks import reporting

TOKENS = 65536
# Baselines: cuDNN on GPUs; XLA's attention elsewhere (TPUs). Results are named after the backend.
BASELINE = "cudnn" if jax.default_backend() == "gpu" else "xla"
NAME = f"{jax.default_backend()}_attention"


# (seq, q_heads, kv_heads, head_dim, topk, window); the most telling first, so that a run cut short still
# answers the main questions.
CASES = [(s, 12, 12, 64, 1024, 1024) for s in (65536, 8192, 16384, 32768, 131072)] + [
    (65536, 12, 4, 64, 1024, 1024), (65536, 12, 12, 128, 1024, 1024), (65536, 12, 12, 64, 256, 256),
    (65536, 12, 12, 64, 2048, 2048), (4096, 12, 12, 64, 1024, 1024)]
CASE_KEYS = ("seq", "q_heads", "kv_heads", "head_dim", "topk", "window")


def time_ms(fn, *args, repeats=10):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def make_inputs(seq, q_heads, kv_heads, head_dim, seed=0, tokens=None):
    batch = max((tokens or TOKENS) // seq, 1)
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, seq, q_heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), jnp.bfloat16)
    # Scores as a trained scorer gives them: noise plus the position slope.
    u = jax.random.normal(keys[3], (batch, seq, kv_heads), jnp.float32) + 1e-3 * jnp.arange(seq)[None, :, None]
    return q, k, v, u


def attention_fns(kind, *, topk, window, implementation):
    if kind in ("sparsek", "pallas"):
        impl = implementation if kind == "sparsek" else "pallas_gpu"
        f = lambda q, k, v, u: sk.sparsek_attention(q, k, v, u, topk=topk, window=window, implementation=impl)
    elif kind == "dense":
        f = lambda q, k, v, u: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=BASELINE)
    else:
        f = lambda q, k, v, u: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=BASELINE,
                                                            local_window_size=(topk + window - 1, 0))
    forward = jax.jit(f)
    argnums = (0, 1, 2, 3) if kind in ("sparsek", "pallas") else (0, 1, 2)
    both = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=argnums))
    return forward, both


def keys_per_query(kind, seq, topk, window):
    if kind == "dense":
        return (seq + 1) / 2
    keys = topk + window
    return sum(min(p + 1, keys) for p in range(0, seq, max(seq // 4096, 1))) / len(range(0, seq, max(seq // 4096, 1)))


def run_case(seq, q_heads, kv_heads, head_dim, topk, window, implementation, repeats):
    q, k, v, u = make_inputs(seq, q_heads, kv_heads, head_dim)
    row = {"seq": seq, "batch": q.shape[0], "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim,
           "topk": topk, "window": window}
    kinds = ("sparsek", "pallas", "dense", "sliding") if implementation == "triton" else ("sparsek", "dense", "sliding")
    for kind in kinds:
        forward, both = attention_fns(kind, topk=topk, window=window, implementation=implementation)
        try:
            row[f"{kind}_fwd_ms"] = time_ms(forward, q, k, v, u, repeats=repeats)
            row[f"{kind}_fwdbwd_ms"] = time_ms(both, q, k, v, u, repeats=repeats)
        except Exception as error:  # report, keep going (e.g. out of memory at the longest lengths)
            row[f"{kind}_error"] = f"{type(error).__name__}: {str(error)[:200]}"
            print(f"  {kind} failed: {row[f'{kind}_error']}", flush=True)
            continue
        flops = 4 * q.shape[0] * seq * q_heads * head_dim * keys_per_query(kind, seq, topk, window)
        row[f"{kind}_fwd_tflops"] = flops / row[f"{kind}_fwd_ms"] / 1e9
        row[f"{kind}_fwdbwd_tflops"] = 3.5 * flops / row[f"{kind}_fwdbwd_ms"] / 1e9
    for mode in ("fwd", "fwdbwd"):
        ours = row.get(f"sparsek_{mode}_ms")
        if ours:
            if row.get(f"dense_{mode}_ms"):
                row[f"speedup_vs_dense_{mode}"] = row[f"dense_{mode}_ms"] / ours
            if row.get(f"sliding_{mode}_ms"):
                row[f"ratio_vs_sliding_{mode}"] = ours / row[f"sliding_{mode}_ms"]
            if row.get(f"pallas_{mode}_ms"):
                row[f"speedup_vs_pallas_{mode}"] = row[f"pallas_{mode}_ms"] / ours
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return row


def plot(rows, path: Path, device: str, baseline: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = sorted((r for r in rows if r["topk"] == 1024 and r["window"] == 1024 and r["kv_heads"] == r["q_heads"]
                   and r["head_dim"] == 64), key=lambda r: r["seq"])  # merged runs keep their cases' order
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for ax, mode, title in ((axes[0], "fwd", "forward"), (axes[1], "fwdbwd", "forward + backward")):
        for kind, marker in (("sparsek", "o"), ("pallas", "D"), ("dense", "s"), ("sliding", "^")):
            pts = [r for r in main if r.get(f"{kind}_{mode}_ms")]
            if not pts:
                continue
            label = {"sparsek": "SparseK (k=1024, w=1024)", "pallas": "SparseK, Pallas GPU kernels",
                     "dense": f"{baseline} dense causal", "sliding": f"{baseline} sliding window 2048"}[kind]
            ax.plot([r["seq"] for r in pts], [r[f"{kind}_{mode}_ms"] for r in pts], marker=marker, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (batch x seq = 65,536 tokens)")
        ax.set_ylabel("ms per call")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(f"{device}: 12 heads, head_dim 64, bf16, everything included for SparseK")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--implementation", default="pallas_gpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--replot", nargs="?", const="gpu_attention", metavar="NAME",
                        help="only redraw the plot and reprint the table from benchmarks/results/NAME.json")
    parser.add_argument("--cases", type=int, nargs="+", metavar="INDEX",
                        help="only these cases (indices into CASES); the rows of other cases already in the results "
                             "JSON are kept, so a table can be measured in several runs")
    args = parser.parse_args(argv)
    cases = CASES[:2] if args.quick else [CASES[i] for i in args.cases] if args.cases else CASES
    name = NAME + ("_triton" if args.implementation == "triton" else "")
    device, baseline = jax.devices()[0].device_kind, BASELINE
    if args.replot:
        name = args.replot
        saved = json.loads((reporting.RESULTS_DIR / f"{name}.json").read_text())
        device = saved["environment"]["device"]
        baseline = "cudnn" if saved["environment"]["backend"] == "gpu" else "xla"
        config, rows = saved["config"], sorted(saved["rows"], key=lambda r: (r["topk"], r["kv_heads"],
                                                                            r["head_dim"], r["seq"]))
    else:
        config = {"tokens_per_call": TOKENS, "implementation": args.implementation, "repeats": args.repeats}
        saved_path = reporting.RESULTS_DIR / f"{name}.json"
        rows = [r for r in json.loads(saved_path.read_text())["rows"] if tuple(r[k] for k in CASE_KEYS) not in cases] \
            if args.cases and saved_path.exists() else []
        for case in cases:
            rows.append(run_case(*case, args.implementation, args.repeats))
            reporting.write_json(name, config, rows)  # after every case: partial runs count
    reporting.publish(name, config, rows, plot=lambda rows, path: plot(rows, path, device, baseline), write=not args.replot,
                      columns=[
        ("seq", "seq", "d"), ("q_heads", "q heads", "d"), ("kv_heads", "kv heads", "d"), ("head_dim", "d", "d"),
        ("topk", "topk", "d"), ("window", "window", "d"),
        ("sparsek_fwd_ms", "SparseK fwd ms", ".2f"), ("dense_fwd_ms", "dense fwd ms", ".2f"),
        ("sliding_fwd_ms", "sliding fwd ms", ".2f"), ("speedup_vs_dense_fwd", "fwd speedup vs dense", ".2f"),
        ("sparsek_fwdbwd_ms", "SparseK f+b ms", ".2f"), ("dense_fwdbwd_ms", "dense f+b ms", ".2f"),
        ("sliding_fwdbwd_ms", "sliding f+b ms", ".2f"), ("speedup_vs_dense_fwdbwd", "f+b speedup vs dense", ".2f"),
        ("ratio_vs_sliding_fwdbwd", "f+b / sliding", ".2f"), ("sparsek_fwd_tflops", "SparseK fwd TFLOP/s", ".0f"),
        *([("pallas_fwd_ms", "Pallas fwd ms", ".2f"), ("pallas_fwdbwd_ms", "Pallas f+b ms", ".2f"),
           ("speedup_vs_pallas_fwdbwd", "f+b speedup vs Pallas", ".2f")] if any("pallas_fwd_ms" in r for r in rows)
          else [])])


if __name__ == "__main__":
    main()
