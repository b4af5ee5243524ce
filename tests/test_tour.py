import json

from sparsek_train import tour


def test_tour_writes_plot_and_report(tmp_path):
    report = tour.run(tmp_path, seq=40, topk=4, window=4, long_seq=512)
    png = tmp_path / "selection_pattern.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "tour.json").read_text())
    assert saved["reduction_errors"] == report["reduction_errors"]
    assert all(err < 1e-5 for err in report["reduction_errors"].values())
