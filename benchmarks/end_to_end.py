"""What users feel: ``sparsek-train`` on the GPT-2-small configs for a fixed number of steps, one process each.

    python -m benchmarks.end_to_end                      # 8k: sparsek (auto), sparsek (triton), dense, sliding
    python -m benchmarks.end_to_end --context 32k --steps 30
    python -m benchmarks.end_to_end --arms sparsek dense # a subset

Every arm is the same command, the shipped config plus the same overrides (a fixed number of steps, one small
held-out evaluation at the end, no intermediate checkpoints), run as a user runs it, data pipeline included.
Step time, tokens/s and MFU come from the run's own ``metrics.jsonl``: the median over the logged intervals
after the first (which holds the compilation). MFU counts the FLOPs each model actually does (a SparseK layer
attends to ``window + topk`` keys), so the columns compare work done, not work avoided. Writes
``benchmarks/results/<backend>_end_to_end_<context>.json`` after each arm, and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import yaml

from benchmarks import reporting

# arm -> (config file of the context, overrides that make it this arm)
ARMS = {
    "sparsek": ("sparsek", []),
    "sparsek_triton": ("sparsek", ["model.implementation=triton"]),
    "sparsek_pallas": ("sparsek", ["model.implementation=pallas_gpu"]),
    "dense": ("dense", []),
    "sliding": ("sliding", []),
}
DEFAULT_ARMS = ("sparsek", "sparsek_triton", "dense", "sliding")


def read_intervals(metrics_path: Path) -> list[dict]:
    """The logged training intervals of a run (lines with ``tokens_per_s``), in order."""
    if not metrics_path.exists():
        return []
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "tokens_per_s" in r]


def summarise(intervals: list[dict], tokens_per_step: int) -> dict:
    """Median throughput over the intervals after the first (the first holds the compilation)."""
    steady = intervals[1:]
    if not steady:
        return {"error": f"{len(intervals)} logged interval(s): too few to leave out the compilation"}
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in steady)
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    return {"tokens_per_s": tokens_per_s, "step_ms": tokens_per_step / tokens_per_s * 1e3,
            "mfu": statistics.median(mfus) if mfus else None, "final_loss": intervals[-1]["loss"],
            "intervals": len(steady)}


def run_arm(arm: str, context: str, steps: int, log_every: int, run_root: Path, timeout_s: float,
            overrides: list[str]) -> dict:
    kind, extra = ARMS[arm]
    config = f"configs/gpt2_small_{context}_{kind}.yaml"
    run_dir = run_root / arm
    command = [sys.executable, "-m", "sparsek_train.trainer", config, f"train.steps={steps}",
               f"train.log_every={log_every}", f"train.checkpoint_every={steps}", "train.eval_every=0",
               "train.eval_batches=1", f"train.run_dir={run_dir}", *extra, *overrides]
    print("$", " ".join(command[2:]), flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, timeout=timeout_s)
        status = done.returncode
    except subprocess.TimeoutExpired:
        status = "timeout"
    row = {"arm": arm, "config": config, "overrides": command[4:], "wall_s": time.perf_counter() - start,
           "exit": status}
    resolved = run_dir / "config.yaml"
    tokens_per_step = None
    if resolved.exists():
        data = yaml.safe_load(resolved.read_text())["data"]
        tokens_per_step = data["batch_size"] * data["seq_len"]
        row["tokens_per_step"] = tokens_per_step
    intervals = read_intervals(run_dir / "metrics.jsonl")
    row.update(summarise(intervals, tokens_per_step) if tokens_per_step else {"error": "the run wrote no config"})
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", default="8k", choices=("8k", "32k"))
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=sorted(ARMS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per arm")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every arm (e.g. a smaller model for a trial on a CPU)")
    parser.add_argument("--run-root", type=Path, default=None, help="run directories (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.steps < 2 * args.log_every:
        parser.error(f"--steps must be at least 2 x --log-every (one interval holds the compilation); "
                     f"got {args.steps} and {args.log_every}")
    name = f"{jax.default_backend()}_end_to_end_{args.context}"
    config = {"context": args.context, "steps": args.steps, "log_every": args.log_every}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = args.run_root or Path(scratch)
        for arm in args.arms:
            rows.append(run_arm(arm, args.context, args.steps, args.log_every, root, args.timeout, args.set))
            reporting.write_json(name, config, rows)  # after every arm: partial runs count
    dense = next((r for r in rows if r["arm"] == "dense" and r.get("step_ms")), None)
    for row in rows:
        if dense and row.get("step_ms"):
            row["speedup_vs_dense"] = dense["step_ms"] / row["step_ms"]
    reporting.publish(name, config, rows, columns=[
        ("arm", "arm", "s"), ("step_ms", "step ms", ".1f"), ("tokens_per_s", "tokens/s", ",.0f"),
        ("mfu", "MFU", ".3f"), ("speedup_vs_dense", "speed-up vs dense", ".2f"), ("final_loss", "loss", ".3f"),
        ("wall_s", "wall s (compile included)", ".0f")])


if __name__ == "__main__":
    main()
