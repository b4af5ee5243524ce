"""The retrofit demo end to end on the CPU: train the demo model dense, convert it to SparseK, fine-tune it for
a quarter of the steps, and compare held-out loss by position of the dense, the converted (before any
fine-tuning) and the fine-tuned model, and of the control: the dense model trained for the same extra steps
with the same config except the attention (so the extra tokens are not credited to the conversion).

    python -m benchmarks.retrofit_demo          # or: make retrofit

Runs the same commands a user would (each is printed), so finished runs are reused: a run directory that
already holds its final checkpoint is not trained again. Writes benchmarks/results/retrofit_demo_cpu.json,
docs/images/retrofit_demo_cpu.png and prints the Markdown table of docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks import reporting

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
ARMS = ("dense", "converted", "fine-tuned", "dense, same extra steps")
CONTROL = ["model.attention=dense", "train.run_dir=runs/retrofit_demo_dense_control"]


def run(*command: str) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run([str(BIN / command[0]), *command[1:]], check=True, cwd=ROOT)


def evaluate(config: str, checkpoint: str, output: Path, lengths: str, *overrides: str) -> dict:
    run("sparsek-eval", config, *overrides, f"checkpoint={checkpoint}", f"eval.output={output}",
        f"eval.lengths={lengths}")
    return json.loads(output.read_text())


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for model in ARMS:
        points = [r for r in rows if r["model"] == model]
        ax.plot(range(len(points)), [r["loss"] for r in points], marker="o", label=model)
    labels = [r["positions"] for r in rows if r["model"] == "dense"]
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("position in the 1,024-token window (training context 256)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Dense demo model converted to SparseK (k = w = 32)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="[256, 1024]", help="evaluation window lengths (YAML list)")
    args = parser.parse_args(argv)
    run("sparsek-train", "configs/demo_dense.yaml")
    run("sparsek-train", "configs/retrofit_demo.yaml")
    run("sparsek-train", "configs/retrofit_demo.yaml", *CONTROL)
    out = ROOT / "runs" / "retrofit_demo"
    reports = {
        "dense": evaluate("configs/demo_dense.yaml", "runs/demo_dense", out / "eval_dense.json", args.lengths),
        "converted": evaluate("configs/retrofit_demo.yaml", "runs/demo_dense", out / "eval_converted.json",
                              args.lengths),
        "fine-tuned": evaluate("configs/retrofit_demo.yaml", "runs/retrofit_demo", out / "eval_fine_tuned.json",
                               args.lengths),
        "dense, same extra steps": evaluate("configs/retrofit_demo.yaml", "runs/retrofit_demo_dense_control",
                                            out / "eval_dense_control.json", args.lengths, *CONTROL),
    }
    rows = []
    for model, report in reports.items():
        for result in report["results"]:
            rows.append({"model": model, "length": result["length"], "positions": "all", "loss": result["loss"],
                         "tokens": result["tokens"], "checkpoint_step": report["checkpoint_step"]})
            rows += [{"model": model, "length": result["length"], "positions": b["positions"], "loss": b["loss"],
                      "tokens": b["tokens"], "checkpoint_step": report["checkpoint_step"]} for b in result["buckets"]]
    config = {"base": "configs/demo_dense.yaml (250 steps)", "retrofit": "configs/retrofit_demo.yaml (60 steps, "
              "20 of them scorers and norms only)", "control": " ".join(["configs/retrofit_demo.yaml", *CONTROL]),
              "eval_lengths": args.lengths}
    bucket_rows = [r for r in rows if r["positions"] != "all" and r["length"] == max(r["length"] for r in rows)]
    reporting.publish("retrofit_demo_cpu", config, rows,
                      [("model", "model", ""), ("length", "window", "d"), ("positions", "positions", ""),
                       ("tokens", "tokens", ",d"), ("loss", "held-out loss", ".4f")],
                      plot=lambda _, path: plot(bucket_rows, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
