"""Smoke test of the recurrent memory benchmark (tools/benchmark_memory.py) on tiny shapes."""
import json

import pytest
import torch

from rfpn.benchmarks import recurrent_memory


@pytest.fixture(scope="module")
def bench():
    return recurrent_memory


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _tiny(bench):
    return bench.BenchmarkSettings(
        batch=2, channels=4, size=8, kernel=3, neumann_steps=3, threads=1, repeats=1, time_budget=0.0
    )


def test_saved_bytes_flat_for_rbp_and_growing_for_bptt(bench):
    settings = _tiny(bench)
    grid = [("rbp", 2), ("rbp", 6), ("crbp", 2), ("crbp", 6), ("bptt", 2), ("bptt", 4), ("bptt", 6)]
    saved = {(m, n): bench.measure_point(settings, m, n)["saved_bytes"] for m, n in grid}
    for method in ("rbp", "crbp"):
        assert saved[(method, 2)] > 0
        assert saved[(method, 2)] == saved[(method, 6)]
    per_two_steps = saved[("bptt", 4)] - saved[("bptt", 2)]
    assert per_two_steps > 0
    assert saved[("bptt", 6)] - saved[("bptt", 4)] == per_two_steps


def test_reversible_variants_hold_flat_memory_and_compare_with_bptt_through_the_same_coupling(bench):
    settings = _tiny(bench)
    points = [bench.measure_point(settings, m, n) for m in ("reversible-additive", "bptt-additive") for n in (2, 6)]
    rev2, rev6, bptt2, bptt6 = points
    assert rev2["peak_saved_bytes"] == rev6["peak_saved_bytes"] > 0
    assert bptt6["saved_bytes"] > bptt2["saved_bytes"] > rev2["peak_saved_bytes"]
    bench.add_time_ratios(points)
    assert rev6["time_vs_coupled_bptt"] == pytest.approx(rev6["time_ms"] / bptt6["time_ms"])


def test_run_benchmark_writes_json_table_and_plot(bench, tmp_path):
    grid = bench.make_grid(["bptt", "crbp"], [1, 2], bptt_extra_steps=[3])
    assert grid == [("bptt", 1), ("bptt", 2), ("bptt", 3), ("crbp", 1), ("crbp", 2)]
    bench.run_benchmark(_tiny(bench), grid, tmp_path, in_process=True)

    report = json.loads((tmp_path / "memory.json").read_text())
    assert report["settings"]["channels"] == 4 and report["fresh_process_per_point"] is False
    assert report["torch_version"] == torch.__version__ and report["machine"]["cpu_count"] >= 1
    assert [(p["method"], p["steps"]) for p in report["points"]] == grid
    for p in report["points"]:
        assert p["saved_bytes"] > 0 and p["time_ms"] > 0 and p["peak_rss_mib"] >= p["peak_rss_delta_mib"] >= 0
    bptt2, crbp2 = report["points"][1], report["points"][4]
    assert bptt2["time_vs_bptt"] == 1.0
    assert crbp2["time_vs_bptt"] == pytest.approx(crbp2["time_ms"] / bptt2["time_ms"])
    assert crbp2["neumann_terms"] <= 3
    # The goals need crbp at 80 steps; with this grid only the comparisons that exist are reported.
    assert report["goals"] == {}

    table = (tmp_path / "table.md").read_text().strip().splitlines()
    assert len(table) == 2 + len(grid) and table[0].startswith("| method | steps |")
    assert (tmp_path / "memory_vs_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_goals_compare_crbp_at_80_with_crbp_at_5_and_bptt_at_6(bench):
    def point(method, steps, saved, rss):
        return {"method": method, "steps": steps, "saved_bytes": saved, "peak_rss_delta_mib": rss}

    goals = bench.check_goals([point("crbp", 5, 100, 50.0), point("crbp", 80, 105, 60.0), point("bptt", 6, 200, 55.0)])
    assert goals["crbp80_over_crbp5_saved"] == pytest.approx(1.05)
    assert goals["crbp80_within_10pct_of_crbp5_saved"] is True
    assert goals["crbp80_within_10pct_of_crbp5_peak_rss"] is False
    assert goals["crbp80_below_bptt6_saved"] is True
    assert goals["crbp80_below_bptt6_peak_rss"] is False


def test_single_mode_prints_one_point_as_json(bench, capsys):
    args = ["--single", "--method", "crbp", "--point-steps", "3", "--batch", "2", "--channels", "4"]
    bench.main(args + ["--size", "8", "--kernel", "3", "--threads", "1", "--repeats", "1", "--time-budget", "0"])
    point = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert point["method"] == "crbp" and point["steps"] == 3 and point["saved_bytes"] > 0


def test_bad_input_is_rejected(bench):
    with pytest.raises(ValueError, match="kernel must be odd"):
        bench.BenchmarkSettings(kernel=4).validate()
    with pytest.raises(ValueError, match="Unknown method"):
        bench.measure_point(_tiny(bench), "adjoint", 3)
    with pytest.raises(ValueError, match="step count must be >= 1"):
        bench.make_grid(["rbp"], [0, 5], [])


def test_precision_summary_pairs_points_and_checks_the_goals(tmp_path):
    from rfpn.benchmarks import precision_speedup

    def report(kernel, fp32_ms, bf16_ms):
        point = {"method": "crbp", "steps": 20, "saved_bytes": 100}
        return {
            "settings": {"channels": 25, "kernel": kernel, "norm": "bn", "threads": 1},
            "points": [dict(point, precision="fp32", time_ms=fp32_ms),
                       dict(point, precision="bf16", time_ms=bf16_ms, saved_bytes=52),
                       dict(point, steps=5, precision="fp32", time_ms=1.0)],  # no bf16 partner: no row
        }

    paths = []
    for kernel, times in ((7, (300.0, 200.0)), (15, (800.0, 200.0))):
        paths.append(tmp_path / f"k{kernel}.json")
        paths[-1].write_text(json.dumps(report(kernel, *times)))
    summary = precision_speedup.summarize(paths, tmp_path / "summary.json")
    assert [(r["kernel"], r["speedup"], r["saved_bytes_ratio"]) for r in summary["rows"]] == [(7, 1.5, 0.52), (15, 4.0, 0.52)]
    goals = summary["goals"]
    assert goals["crbp20_c25_k7_at_least_2x"] is False and goals["crbp20_c25_k15_at_least_3.5x"] is True
    assert goals["crbp20_c25_k7_saved_bytes_not_above_fp32"] is True
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileNotFoundError, match="--precisions fp32 bf16"):
        precision_speedup.summarize([tmp_path / "missing.json"], tmp_path / "x.json")
