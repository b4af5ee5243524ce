"""``sparsek-plot RUN_DIR [RUN_DIR ...]``: loss curves of runs as PNG (RUN_DIR/loss.png, or --out)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"RUN_DIR: expected a run directory with metrics.jsonl, received {str(run_dir)!r}")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    return train, evals


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for run_dir in run_dirs:
        train, evals = read_metrics(run_dir)
        # A resumed run may log a step twice: the latest value wins.
        by_step = {r["step"]: r for r in train}
        steps = sorted(by_step)
        line, = axes[0].plot(steps, [by_step[s]["loss"] for s in steps], label=f"{run_dir.name} train")
        if evals:
            axes[0].plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o--", color=line.get_color(),
                         label=f"{run_dir.name} held-out")
        axes[1].plot(steps, [by_step[s]["tokens_per_s"] for s in steps], color=line.get_color(), label=run_dir.name)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("cross-entropy (nats/token)")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("training tokens/s")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sparsek-plot", description=__doc__)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        out = plot_runs(args.run_dirs, args.out or args.run_dirs[0] / "loss.png")
    except ValueError as error:
        print(f"sparsek-plot: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
