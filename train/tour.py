"""A small tour of the operator and the attention: prints what happens and plots the pattern.

    python -m sparsek_train.tour --out runs/tour          # or: make tour

Writes ``selection_pattern.png`` (which keys each query attends to: window vs selected, gate values as
colour, with the scores and the thresholds along the sequence) and ``tour.json`` (the printed numbers).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import sparsek_jax as sk


def plot_pattern(pattern: sk.AttentionPattern, scores, tau, theta, path: Path, *, title: str) -> None:
    """Writes a PNG of one head's pattern: grey window, selected keys coloured by gate, thresholds below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    window = np.asarray(pattern.window[0, 0])
    selected = np.asarray(pattern.selected[0, 0])
    gates = np.asarray(pattern.gates[0, 0])
    seq = window.shape[0]
    fig, (ax, ax_scores) = plt.subplots(2, 1, figsize=(7.5, 10.0), height_ratios=[3, 1.3],
                                        constrained_layout=True)
    ax.imshow(np.where(window, 1.0, np.nan), cmap=ListedColormap(["#9a9a9a"]), vmin=0, vmax=1,
              interpolation="nearest")
    shown = ax.imshow(np.where(selected, gates, np.nan), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")
    ax.set_title(title)
    fig.colorbar(shown, ax=ax, label="gate clip(u_j - tau_i, 0, 1) of a selected key (grey: window)",
                 shrink=0.8)
    positions = np.arange(seq)
    ax_scores.plot(positions, np.asarray(scores)[0, :, 0], ".", color="#444444", label="score u_j")
    for values, name, color in ((tau, "tau_i", "#d62728"), (theta, "theta_i (k-th largest)", "#1f77b4")):
        v = np.asarray(values)[0, :, 0]
        ax_scores.step(positions, np.where(np.isfinite(v), v, np.nan), where="mid", color=color, label=name)
    ax_scores.set_xlim(-0.5, seq - 0.5)
    ax_scores.set_xlabel("position (key j for u, query i for the thresholds)")
    ax_scores.legend(loc="upper left", fontsize=8)
    ax_scores.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out: Path, *, seq: int = 96, topk: int = 8, window: int = 8, slope: float = 0.02, seed: int = 0,
        long_seq: int = 8192) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    rng = np.random.default_rng(seed)

    print("== The SPARSEK operator: projection onto {0 <= p <= 1, sum p = k}")
    z = jnp.asarray([2.1, 0.3, 1.9, -0.5, 1.2, 0.8], jnp.float32)
    for k in (1, 2, 3.5):
        p = sk.sparsek(z, k)
        tau = float(sk.sparsek_threshold(z, k))
        print(f"  k={k:<4} tau={tau:+.3f}  p=[{", ".join(f"{x:.3f}" for x in np.asarray(p))}]  sum={float(p.sum()):.3f}")
        report[f"operator_k{k}"] = {"tau": tau, "p": np.asarray(p).tolist()}

    print(f"\n== Thresholds along a sequence: seq={seq}, topk={topk}, window={window}, position slope={slope}")
    scores = jnp.asarray((rng.normal(size=(1, seq, 1)) + slope * np.arange(seq)[None, :, None]).astype(np.float32))
    tau, theta, info = sk.prefix_thresholds(scores, topk=topk, window=window, return_info=True)
    pattern = sk.attention_pattern(scores, topk=topk, window=window)
    selected_per_query = np.asarray(pattern.selected[0, 0]).sum(-1)
    keys_per_query = selected_per_query + np.asarray(pattern.window[0, 0]).sum(-1)
    finite_tau = np.asarray(tau)[0, :, 0][np.isfinite(np.asarray(tau)[0, :, 0])]
    print(f"  tau, theta non-decreasing: {bool(np.all(np.diff(finite_tau) >= 0))}, "
          f"buffer exact everywhere: {bool(info.exact.all())}")
    print(f"  keys per query: mean {keys_per_query.mean():.1f}, max {keys_per_query.max()} "
          f"(dense causal would average {(seq + 1) / 2:.1f})")
    print(f"  fractional gates per query (|M_i|): mean {float(np.mean(np.asarray(info.num_fractional))):.2f}")
    report.update(keys_per_query_mean=float(keys_per_query.mean()), keys_per_query_max=int(keys_per_query.max()))

    print("\n== Attention: SparseK vs its limits (reference implementation)")
    q, k, v = (jnp.asarray(rng.normal(size=shape).astype(np.float32))
               for shape in ((2, seq, 4, 32), (2, seq, 2, 32), (2, seq, 2, 32)))
    u = jnp.asarray(rng.normal(size=(2, seq, 2)).astype(np.float32))
    dense = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    reference = dict(implementation="reference")
    as_dense = sk.sparsek_attention(q, k, v, u, topk=seq, window=0, **reference)
    sliding = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(window - 1, 0))
    as_sliding = sk.sparsek_attention(q, k, v, u, topk=0, window=window, **reference)
    sparse = sk.sparsek_attention(q, k, v, u, topk=topk, window=window, **reference)
    errors = {"topk>=seq, window=0 vs dense causal": float(jnp.abs(as_dense - dense).max()),
              "topk=0 vs sliding window": float(jnp.abs(as_sliding - sliding).max())}
    for name, err in errors.items():
        print(f"  {name}: max |diff| = {err:.2e}")
    print(f"  SparseK (topk={topk}, window={window}) differs from dense by "
          f"{float(jnp.abs(sparse - dense).mean()):.3f} on average: it attends to "
          f"{keys_per_query.mean() / ((seq + 1) / 2):.0%} of the keys")
    report["reduction_errors"] = errors

    grad_u = jax.grad(lambda s: jnp.sum(sk.sparsek_attention(q, k, v, s, topk=topk, window=window, **reference)
                                        ** 2))(u)
    print(f"  the scorer gets a gradient through the gates: |d loss / d u| max = {float(jnp.abs(grad_u).max()):.3f}")

    long_scores = jnp.asarray(rng.normal(size=(1, long_seq, 2)).astype(np.float32))
    thresholds = jax.jit(lambda s: sk.prefix_thresholds(s, topk=64, window=64))
    jax.block_until_ready(thresholds(long_scores))
    start = time.perf_counter()
    jax.block_until_ready(thresholds(long_scores))
    elapsed = time.perf_counter() - start
    print(f"\n== prefix_thresholds at seq={long_seq}, topk=64, 2 heads: {elapsed * 1e3:.0f} ms on "
          f"{jax.devices()[0].platform} (linear in seq; the dense pattern would need {long_seq**2 * 2 * 4 / 2**30:.1f} GiB)")
    report["prefix_thresholds_ms"] = {"seq": long_seq, "ms": elapsed * 1e3}

    png = out / "selection_pattern.png"
    plot_pattern(pattern, scores, tau, theta, png,
                 title=f"SparseK pattern: seq={seq}, topk={topk}, window={window}, random scores + slope {slope}")
    (out / "tour.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {png} and {out / 'tour.json'}")
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/tour"), help="output directory")
    parser.add_argument("--seq", type=int, default=96)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(args.out, seq=args.seq, topk=args.topk, window=args.window, seed=args.seed)


if __name__ == "__main__":
    main()
