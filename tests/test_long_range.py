"""The long-range experiments end to end for a few steps (data, training, evaluation, report) with a tiny
model, for both tasks (recall; passkeys in text): what the CPU experiments run, not their results. The random
recall layout and the other attention arms run the same commands with other configs (their data:
test_tasks.py; their models: test_train.py's config tests)."""

import json

import pytest

from benchmarks.long_range import EXPERIMENTS, check_finished, main
from builders import write_text_corpus

TINY = ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=2", "model.head_dim=16",
        "model.mlp_dim=64", "train.steps=3", "train.eval_every=2", "train.eval_batches=1", "train.log_every=1",
        "train.async_checkpoints=false", "data.batch_size=4", "data.eval_batch_size=4", "eval.batch_size=4",
        "eval.examples=8"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    return write_text_corpus(tmp_path_factory.mktemp("texts"), 8, 500)


@pytest.mark.slow
@pytest.mark.parametrize("experiment, arm, extra", [
    ("recall_blocked", "sparsek", ["data.seq_len=64", "data.eval_seq_len=64", "eval.lengths=[64]",
                                   "data.recall.pairs=4"]),
    ("passkey", "sparsek", ["data.dataset=text_files", "data.vocab_size=300", "data.seq_len=192",
                            "data.eval_seq_len=192", "eval.lengths=[192]", "eval.max_windows_per_doc=1"]),
])
def test_experiment_runs_end_to_end(tmp_path, texts, capsys, experiment, arm, extra):
    if experiment == "passkey":
        extra = extra + [f"data.source_path={texts}", f"data.data_dir={tmp_path / 'data'}"]
    results = tmp_path / "results.json"
    variant = next(v for v, a, *_ in EXPERIMENTS[experiment].runs() if a == arm)
    # The runner is called in this process; the training and evaluation it runs are processes of their own.
    args = [experiment, "--arms", arm, "--seeds", "0", "--variants", variant, "--results", str(results),
            "--runs", str(tmp_path / "runs"), "--plots", str(tmp_path / "plots")]
    for override in TINY + extra:
        args += ["--override", override]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads(results.read_text())
    (run,) = report["runs"]
    assert run["arm"] == arm and run["command"].startswith("sparsek-train configs/experiments/")
    answers = run["eval"][-1]["answers"]
    assert answers["answers"] > 0 and 0 <= answers["accuracy"] <= 1 and answers["by_distance"]
    assert [c["step"] for c in run["curve"] if "loss" in c] == [1, 2, 3]
    assert any(k.endswith("_accuracy") for c in run["curve"] for k in c)
    if arm == "sparsek":  # the diagnosis: every answer's source is in one of the four states in every layer
        for layer in answers["selection"]:
            assert sum(layer["best_head"].values()) == pytest.approx(1.0)
    assert (tmp_path / "plots" / f"{experiment}_cpu_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert f"| {run['variant']} | {arm} |" in printed
    if experiment == "recall_blocked":  # run again: the finished run is in the results, not trained again
        assert main(args) == 0 and "in results.json already" in capsys.readouterr().out


def test_an_interrupted_run_is_not_recorded(tmp_path):
    """A trainer stopped by a signal exits 0 after saving a checkpoint: the experiment must notice that the run
    did not reach its configured steps (no final evaluation at that step) rather than record it."""
    (tmp_path / "config.yaml").write_text("train:\n  steps: 10\n")
    lines = [{"step": 4, "loss": 3.0}, {"step": 5, "eval_loss": 3.1}, {"step": 8, "loss": 2.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(RuntimeError, match="stopped at step 8 of train.steps=10"):
        check_finished(tmp_path)
    with (tmp_path / "metrics.jsonl").open("a") as metrics:
        metrics.write(json.dumps({"step": 10, "loss": 2.4}) + "\n")
    with pytest.raises(RuntimeError, match="stopped at step 10"):  # the last step trained, never evaluated
        check_finished(tmp_path)
    with (tmp_path / "metrics.jsonl").open("a") as metrics:
        metrics.write(json.dumps({"step": 10, "eval_loss": 2.6}) + "\n")
    check_finished(tmp_path)


def test_a_selection_without_runs_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:  # passkey's topk16 variant ran dense and sliding only
        main(["passkey", "--arms", "sparsek", "--variants", "topk16", "--results", str(tmp_path / "r.json")])
    assert stop.value.code == 2
    message = capsys.readouterr().err
    assert "no run of passkey has --arms sparsek and --variants topk16" in message and "len128/sparsek" in message
    assert not (tmp_path / "r.json").exists()
