"""Tables and plots of the long-range experiments (``benchmarks.long_range``) from their results JSON."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np


def _answers(run: dict) -> dict | None:
    """The answers of the run's first evaluation that has any (the training length)."""
    return next((r["answers"] for r in run["eval"] if "answers" in r), None)


def _groups(results: dict) -> dict[tuple[str, str], list[dict]]:
    groups = defaultdict(list)
    for run in results["runs"]:
        groups[(run["variant"], run["arm"])].append(run)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], _arm_order(results, kv[0][1]))))


def _arm_order(results: dict, arm: str) -> int:
    order = list(dict.fromkeys(r["arm"] for r in results["runs"]))
    return order.index(arm)


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def summary(results: dict) -> str:
    """Markdown: per variant and arm, answer accuracy (mean and range over seeds), all-answers-right rate,
    and for SparseK arms the share of answers whose source was attended in each layer (best head)."""
    lines = ["| variant | arm | seeds | answer accuracy | sequences all right | source attended, per layer |",
             "|---|---|---|---|---|---|"]
    for (variant, arm), runs in _groups(results).items():
        answers = [a for a in (_answers(r) for r in runs) if a is not None]
        if not answers:
            continue
        attended = []
        for layer in range(len(answers[0]["selection"])):
            shares = [1 - a["selection"][layer]["best_head"]["not_attended"] for a in answers]
            attended.append(f"L{answers[0]['selection'][layer]['layer']} {_spread(shares)}")
        lines.append(f"| {variant} | {arm} | {len(answers)} | {_spread([a['accuracy'] for a in answers])} | "
                     f"{_spread([a['sequence_accuracy'] for a in answers])} | {', '.join(attended) or '-'} |")
    return "\n".join(lines)


def bucket_table(results: dict, by: str = "distance") -> str:
    """Markdown: answer accuracy by bucket (columns) per variant and arm (mean over seeds); ``by``:
    ``"distance"`` (from the answer's source) or ``"depth"`` (where the sequence's first source lies, as a
    fraction of its length: the passkey's depth)."""
    groups = _groups(results)
    field = f"by_{by}"
    rows = lambda run: (_answers(run) or {field: []})[field]
    buckets = list(dict.fromkeys(b[by] for runs in groups.values() for r in runs for b in rows(r)))
    lines = ["| variant | arm | " + " | ".join(buckets) + " |", "|---" * (len(buckets) + 2) + "|"]
    for (variant, arm), runs in groups.items():
        cells = []
        for bucket in buckets:
            values = [b["accuracy"] for r in runs for b in rows(r) if b[by] == bucket]
            cells.append(f"{np.mean(values):.2f}" if values else "-")
        lines.append(f"| {variant} | {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(results: dict, directory: Path, name: str) -> list[Path]:
    """``<name>_accuracy.png`` (accuracy by distance, and held-out accuracy over training, per arm) and, when
    SparseK arms ran, ``<name>_selection.png`` (how often each layer attended the answer's source)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    groups = _groups(results)
    variants = list(dict.fromkeys(v for v, _ in groups))
    if not variants:
        return []
    accuracy_key = next((k for r in results["runs"] for c in r["curve"] for k in c
                         if k.endswith("_accuracy") and "sequence" not in k), None)
    fig, axes = plt.subplots(len(variants), 2, figsize=(12, 3.8 * len(variants)), squeeze=False,
                             constrained_layout=True)
    colors = {}
    for (variant, arm), runs in groups.items():
        row = variants.index(variant)
        color = colors.setdefault(arm, f"C{len(colors)}")
        answers = [a for a in (_answers(r) for r in runs) if a is not None]
        if answers:
            labels = [b["distance"] for b in answers[0]["by_distance"]]
            table = np.array([[next((b["accuracy"] for b in a["by_distance"] if b["distance"] == label), np.nan)
                               for label in labels] for a in answers])
            axes[row, 0].plot(labels, table.mean(0), "o-", color=color, label=f"{arm} (n={len(answers)})")
            if len(answers) > 1:
                axes[row, 0].fill_between(labels, table.min(0), table.max(0), color=color, alpha=0.2)
        for i, run in enumerate(runs):
            points = [(c["step"], c[accuracy_key]) for c in run["curve"] if accuracy_key in c]
            if points:
                axes[row, 1].plot(*zip(*points), color=color, alpha=0.9 if i == 0 else 0.45,
                                  label=arm if i == 0 else None)
        axes[row, 0].set_title(f"{variant}: answer accuracy by distance (end of training)")
        axes[row, 1].set_title(f"{variant}: held-out answer accuracy during training")
    for ax in axes[:, 0]:
        ax.set_xlabel("distance from the answer's source (tokens)")
        ax.set_ylabel("accuracy")
    for ax in axes[:, 1]:
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy")
    for ax in axes.flat:
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    written = [directory / f"{name}_accuracy.png"]
    fig.savefig(written[0], dpi=110)
    plt.close(fig)

    sparse = {key: runs for key, runs in groups.items() if any("_attended_layer" in k for r in runs
                                                               for c in r["curve"] for k in c)}
    if sparse:
        fig, ax = plt.subplots(figsize=(8, 4.2), constrained_layout=True)
        for n, ((variant, arm), runs) in enumerate(sparse.items()):
            run = runs[0]
            keys = sorted({k for c in run["curve"] for k in c if "_attended_layer" in k})
            for style, key in zip(("-", "--", ":", "-."), keys):
                points = [(c["step"], c[key]) for c in run["curve"] if key in c]
                ax.plot(*zip(*points), style, color=f"C{n}", label=f"{variant} {arm} layer {key.rsplit('layer', 1)[1]}")
        ax.set_xlabel("step")
        ax.set_ylabel("answers whose source is attended")
        ax.set_title("SparseK layers: is the needed key in the window or selected? (seed 0)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        written.append(directory / f"{name}_selection.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
