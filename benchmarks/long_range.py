"""Long-range experiments on the CPU: associative recall (blocked and random layouts) and passkeys in real
text, every attention arm trained with the same model, data, steps and learning rate.

    python -m benchmarks.long_range recall_blocked          # all variants, arms and seeds of one experiment
    python -m benchmarks.long_range recall_blocked --arms sparsek --seeds 0
    python -m benchmarks.long_range cold_start --variants pairs8

Each run is the commands a user would type (printed as such): ``sparsek-train CONFIG overrides`` and
``sparsek-eval CONFIG ... checkpoint=RUN_DIR``, with the configs of ``configs/experiments/``. Results go to
``benchmarks/results/<experiment>_cpu.json`` as each run finishes (a run already there with the same command
is not run again, so the experiment resumes across sessions); plots to ``docs/images/<experiment>_*.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = "configs/experiments"


@dataclass(frozen=True)
class Experiment:
    """Arms (a config each: ``configs/experiments/<task>_<arm>.yaml``; ``arm+name`` arms use ``arm``'s config
    with ``arm_overrides``) x variants (overrides for every arm, under ``"*"``, and per arm) x seeds
    (``train.seed`` and ``data.seed``)."""

    task: str
    arms: tuple[str, ...]
    variants: dict[str, dict[str, tuple[str, ...]]]
    seeds: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per arm; others: (0,)
    arm_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def runs(self, seeds: tuple[int, ...] | None = None):
        """(variant, arm, seed, overrides) of every run; ``seeds`` replaces every arm's seeds. A variant that
        maps an arm to None leaves that arm out."""
        for variant, overrides in self.variants.items():
            for arm in self.arms:
                if arm in overrides and overrides[arm] is None:
                    continue
                for seed in seeds or self.seeds.get(arm, (0,)):
                    yield variant, arm, seed, (*overrides.get("*", ()), *overrides.get(arm, ()),
                                               *self.arm_overrides.get(arm, ()))

    def config(self, arm: str, gpu: bool = False) -> str:
        """The arm's config; ``+suffix`` arms share the config of the arm before the ``+``."""
        return f"{CONFIGS}/{self.task}_{arm.split('+')[0]}{'_gpu' if gpu else ''}.yaml"


ARMS = ("dense", "sliding", "sparsek", "sparsek_hard", "block_topk", "sparsek+logit")
THREE_SEEDS = {"sparsek": (0, 1, 2), "sparsek+logit": (0, 1, 2)}
LOGIT_GATES = {"sparsek+logit": ("model.gate=logit",)}


def budget(topk: int, window: int) -> dict[str, tuple[str, ...]]:
    """A variant with ``topk`` keys selected beyond a ``window``; the sliding window gets both."""
    return {"*": (f"model.topk={topk}", f"model.window={window}"), "sliding": (f"model.window={window + topk}",)}


PASSKEY_128 = (*budget(16, 16)["*"], "data.seq_len=128", "data.eval_seq_len=128", "eval.lengths=[128]",
               "data.passkey.fraction=1")
PASSKEY_DIAGNOSIS = ("sparsek+scorer_lr", "sparsek+topk32", "sparsek+logit", "sliding+48")

EXPERIMENTS = {
    # 16 pairs at the start, queries at the end, every query beyond the reach of window + topk. The layer that
    # reaches back needs the 16 values (the window joins each to its key): topk 32 holds values and keys, 16
    # the values alone, 8 half of them (the budget binds).
    # SparseK with logit gates (sparsek+logit) beside the default value gates.
    "recall_blocked": Experiment("recall_blocked", ARMS, {"topk32": budget(32, 16), "topk16": budget(16, 16),
                                                          "topk8": budget(8, 16)}, THREE_SEEDS, LOGIT_GATES),
    # Distances log-uniform up to 126: accuracy by distance; 2 x pairs = topk.
    "recall_random": Experiment("recall_random", ARMS, {"topk32": budget(32, 16)}, THREE_SEEDS, LOGIT_GATES),
    # topk16: the configs as they are (256 tokens, half the sequences with a passkey, 1,500 steps: dense
    # attention does not learn to retrieve, so only dense and sliding ran); len128: 128 tokens, a passkey in
    # every sequence, 3,000 steps; answers128: the same with the answer weighted 20 times in the loss (dense
    # only). Diagnosis arms on len128: a scorer learning 10 times faster, twice the budget, logit gates, and
    # the sliding window at twice the budget's keys (16 + 32).
    "passkey": Experiment("passkey", ("dense", "sliding", "sparsek", *PASSKEY_DIAGNOSIS), {
        "topk16": {**budget(16, 16), **dict.fromkeys(("sparsek", *PASSKEY_DIAGNOSIS))},
        "len128": {**budget(16, 16), "*": (*PASSKEY_128, "train.steps=3000")},
        "answers128": {"*": (*PASSKEY_128, "data.passkey.answer_weight=20", "train.steps=3000"),
                       **dict.fromkeys(("sliding", "sparsek", *PASSKEY_DIAGNOSIS))}}, THREE_SEEDS,
        arm_overrides={"sparsek+scorer_lr": ("train.scorer_learning_rate_scale=10",),
                       "sparsek+topk32": ("model.topk=32",), **LOGIT_GATES,
                       "sliding+48": ("model.window=48",)}),
    # Why SparseK starts slowly, on blocked recall with the sufficient budget: each arm changes one thing
    # against the defaults (zero-initialised scorer, position slope 1e-3, value gates, one learning rate).
    # Trained on far queries alone (no random-layout sequences), where the cold start shows; 1,500 steps.
    "cold_start": Experiment("recall_blocked", (
        "dense", "sparsek", "sparsek+slope0", "sparsek+init", "sparsek+scorer_lr", "sparsek+logit",
        "sparsek+distill"),
        {"blocked_only": {**budget(32, 16), "*": (*budget(32, 16)["*"], "data.recall.random_fraction=0",
                                                  "train.steps=1500")}},
        arm_overrides={"sparsek+slope0": ("model.position_slope=0",),
                       "sparsek+init": ("model.scorer_init_std=0.1",),
                       "sparsek+scorer_lr": ("train.scorer_learning_rate_scale=10",),
                       **LOGIT_GATES,
                       "sparsek+distill": ("train.scorer_distill_steps=500",)}),
}


def cli(prog: str, args: list[str]) -> None:
    """Runs one of the project's commands in a process of its own, as a user would, and fails on its failure."""
    module = {"sparsek-train": "sparsek_train.trainer", "sparsek-eval": "sparsek_train.evaluate"}[prog]
    print("$", prog, " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", module, *args], check=True, cwd=ROOT)


def curve(run_dir: Path) -> list[dict]:
    """The run's metrics: training loss every logged step, held-out accuracy and selection at evaluations."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    keep = lambda r: {k: v for k, v in r.items() if k == "step" or k == "loss" or k.startswith("eval_")}
    by_step: dict[tuple[int, bool], dict] = {}
    for r in records:  # a resumed run may log a step twice: the latest wins
        by_step[(r["step"], "eval_loss" in r)] = keep(r)
    return [by_step[k] for k in sorted(by_step)]


def check_finished(run_dir: Path) -> None:
    """Raises unless the run trained all its configured steps: a trainer stopped by a signal saves a checkpoint
    and exits 0 (rerunning resumes it), and an unfinished run must not be recorded as a result."""
    steps = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"]
    records = curve(run_dir)
    if not any(r["step"] == steps and "eval_loss" in r for r in records):
        reached = max((r["step"] for r in records), default=0)
        raise RuntimeError(f"the run in {run_dir} stopped at step {reached} of train.steps={steps} (interrupted?); "
                           "not recorded. Run the same command again to resume it.")


def run_one(experiment: Experiment, name: str, variant: str, arm: str, seed: int, overrides: tuple[str, ...], *,
            run_root: Path, extra: tuple[str, ...], skip: set[str], gpu: bool) -> dict | None:
    """Trains and evaluates one run; None if its command is in ``skip`` (done before)."""
    run_dir = run_root / name / variant / f"{arm}_seed{seed}"
    args = [experiment.config(arm, gpu), *overrides, *extra, f"train.seed={seed}", f"data.seed={seed}",
            f"train.run_dir={run_dir}"]
    if " ".join(["sparsek-train", *args]) in skip:
        return None
    start = time.perf_counter()
    cli("sparsek-train", args)
    train_s = time.perf_counter() - start
    check_finished(run_dir)
    cli("sparsek-eval", [*args, f"checkpoint={run_dir}",
                         f"eval.output={run_dir / 'eval.json'}"])
    report = json.loads((run_dir / "eval.json").read_text())
    return {"variant": variant, "arm": arm, "seed": seed, "command": " ".join(["sparsek-train", *args]),
            "train_seconds": round(train_s, 1), "curve": curve(run_dir), "eval": report["results"]}


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"runs": []}


def save_results(path: Path, results: dict) -> None:
    from benchmarks import reporting

    results["environment"] = reporting.environment()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(results, indent=1))
    temporary.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--arms", help="comma-separated subset of the arms")
    parser.add_argument("--variants", help="comma-separated subset of the variants")
    parser.add_argument("--seeds", help="comma-separated seeds for every arm (default: the experiment's)")
    parser.add_argument("--results", type=Path, help="results JSON (default benchmarks/results/<experiment>_cpu.json)")
    parser.add_argument("--runs", type=Path, default=Path("runs/experiments"),
                        help="run directories (relative paths: from the repository root)")
    parser.add_argument("--report-only", action="store_true", help="tables and plots of the results so far")
    parser.add_argument("--plots", type=Path, default=ROOT / "docs" / "images", help="where the PNGs go")
    parser.add_argument("--gpu", action="store_true", help="the GPU-sized configs (configs/experiments/*_gpu.yaml)")
    parser.add_argument("--override", action="append", default=[],
                        help="key=value for every run (e.g. train.steps=3 for a smoke test); repeatable")
    args = parser.parse_args(argv)
    experiment = EXPERIMENTS[args.experiment]
    results_path = args.results or RESULTS / f"{args.experiment}_{'gpu' if args.gpu else 'cpu'}.json"
    results = load_results(results_path)
    results["experiment"] = args.experiment
    pick = lambda value: None if value is None else value.split(",")
    arms, variants = pick(args.arms), pick(args.variants)
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None
    done = {r["command"] for r in results["runs"]}
    selected = [] if args.report_only else [
        (variant, arm, seed, overrides) for variant, arm, seed, overrides in experiment.runs(seeds)
        if (not arms or arm in arms) and (not variants or variant in variants)]
    if not selected and not args.report_only:
        pairs = ", ".join(dict.fromkeys(f"{variant}/{arm}" for variant, arm, *_ in experiment.runs()))
        parser.error(f"no run of {args.experiment} has --arms {args.arms} and --variants {args.variants}; "
                     f"its runs (variant/arm): {pairs}")
    for variant, arm, seed, overrides in selected:
        record = run_one(experiment, args.experiment, variant, arm, seed, overrides, run_root=args.runs,
                         extra=tuple(args.override), skip=done, gpu=args.gpu)
        if record is None:
            print(f"= {variant} {arm} seed {seed}: in {results_path.name} already")
            continue
        key = lambda r: (r["variant"], r["arm"], r["seed"])
        results["runs"] = [r for r in results["runs"] if key(r) != key(record)] + [record]
        save_results(results_path, results)
        print(f"wrote {results_path} ({variant} {arm} seed {seed})", flush=True)
    from benchmarks import long_range_report

    print(long_range_report.summary(results))
    print()
    print(long_range_report.bucket_table(results, "distance"))
    print()
    print(long_range_report.bucket_table(results, "depth"))
    for png in long_range_report.plots(results, args.plots, f"{args.experiment}_{'gpu' if args.gpu else 'cpu'}"):
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
