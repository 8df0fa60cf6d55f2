"""The R-FPN benchmark's summary: means over seeds, the PQ difference paired by seed, the table and figure."""
import json

import pytest

from rfpn.analysis.figures import plot_rfpn_benchmark
from rfpn.benchmarks import rfpn_panoptic as bench


def _row(key, seed, pq, backbone_bytes=None):
    return {"key": key, "model": bench.MODELS[key][0], "seed": seed, "iters": 300, "PQ": pq, "SQ": 80.0, "RQ": 90.0,
            "PQ_th": pq, "PQ_st": pq, "mask_AP": 50.0, "mIoU": 90.0, "sec_per_iter": 1.0,
            "mask_head_bytes_per_roi": 2048.0, "backbone_bytes_median": backbone_bytes}


def test_paired_difference_summary_table_and_figure(tmp_path):
    rows = [_row("fpn", s, pq, 2**20) for s, pq in enumerate((70.0, 71.0, 69.0))]
    rows += [_row("revnet18", s, pq, 2**19) for s, pq in enumerate((71.0, 71.5, 70.5))]
    diff = bench.paired_pq_difference(rows, "revnet18", "fpn")
    assert diff["seeds"] == [0, 1, 2] and diff["differences"] == [1.0, 0.5, 1.5]
    assert diff["mean"] == pytest.approx(1.0) and diff["ci95"][0] < 1.0 < diff["ci95"][1]
    assert bench.paired_pq_difference(rows[:4], "revnet18", "fpn") is None, "one common seed is not a pairing"
    summary = bench.summarise(rows)
    assert [s["key"] for s in summary] == ["fpn", "revnet18"] and summary[1]["backbone_bytes_median"] == 2**19
    table = bench.format_table(rows, [])
    assert "| Panoptic FPN RevNet-18 | 71.0 | 71.0, 71.5, 70.5 |" in table and "| 0.5 |" in table
    assert "minus Panoptic FPN, paired by seed (3 seeds): +1.00" in table
    path = plot_rfpn_benchmark(str(tmp_path / "b.png"), summary, [])
    assert open(path, "rb").read(4) == b"\x89PNG"


def test_runs_of_an_earlier_summary_are_reported_without_training(tmp_path):
    earlier, other = tmp_path / "earlier.json", tmp_path / "other.json"
    rows = [_row("fpn", s, pq) for s, pq in enumerate((70.0, 71.0))] + [_row("rnnpool", 0, 60.0)]
    sweep = [{"grad": "crbp", "steps": 1, "rois": 32, "bytes": 1024, "sec": 0.1}]
    earlier.write_text(json.dumps({"models": rows, "memory_sweep": sweep}))
    other.write_text(json.dumps({"models": [_row("rnnpool_gru", s, 65.0 + s) for s in (0, 1)], "memory_sweep": []}))
    out = tmp_path / "out"
    bench.main(["--models", "fpn", "rnnpool_gru", "--seeds", "0", "1", "--iters", "300", "--output-dir", str(out),
                "--previous", str(earlier), "--previous", str(other), "--sweep-steps", "1",
                "--data-root", str(tmp_path / "data"), "--num-train", "2", "--num-test", "1", "--image-size", "64"])
    summary = json.loads((out / "benchmark_rfpn.json").read_text())
    assert [(r["key"], r["seed"], r["PQ"]) for r in summary["models"]] == [
        ("fpn", 0, 70.0), ("rnnpool_gru", 0, 65.0), ("fpn", 1, 71.0), ("rnnpool_gru", 1, 66.0)]
    assert summary["memory_sweep"] == sweep
    assert not list(out.glob("*/model_final.pth")), "nothing was trained"
