"""The end-to-end training benchmark's reading of a run's metrics (its GPU runs are in docs/benchmarks.md)."""

import json

import pytest

from benchmarks import end_to_end


def test_throughput_leaves_out_the_compiling_interval(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "eval_loss": 9.7},  # evaluation lines carry no throughput
            {"step": 10, "loss": 9.6, "tokens_per_s": 1_000.0, "mfu": 0.01},  # compilation inside
            {"step": 20, "loss": 9.5, "tokens_per_s": 60_000.0, "mfu": 0.20},
            {"step": 30, "loss": 9.4, "tokens_per_s": 64_000.0, "mfu": 0.22},
            {"step": 40, "loss": 9.3, "tokens_per_s": 62_000.0, "mfu": 0.21}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    intervals = end_to_end.read_intervals(metrics)
    assert [r["step"] for r in intervals] == [10, 20, 30, 40]
    summary = end_to_end.summarise(intervals, tokens_per_step=65_536)
    assert summary["tokens_per_s"] == 62_000.0 and summary["mfu"] == 0.21 and summary["intervals"] == 3
    assert summary["step_ms"] == pytest.approx(65_536 / 62_000 * 1e3)
    assert summary["final_loss"] == 9.3


def test_a_run_too_short_to_measure_says_so(tmp_path):
    assert end_to_end.read_intervals(tmp_path / "missing.jsonl") == []
    one = [{"step": 10, "loss": 9.6, "tokens_per_s": 1_000.0, "mfu": None}]
    assert "too few" in end_to_end.summarise(one, tokens_per_step=8)["error"]
    with pytest.raises(SystemExit):
        end_to_end.main(["--steps", "10", "--log-every", "10"])
