"""Peak-RAM counts: hand-computed numbers on a chain and a skip connection, parameters left out, the layer table,
Detectron2 stems, the RSS check in a fresh process, and the tool."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from detectron2.modeling.backbone.resnet import BasicStem

from rfpn.analysis.peak_ram import format_layer_table, peak_ram, plot_peak_ram
from rfpn.benchmarks.peak_ram import check_goals
from rfpn.layers import RNNPool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 1000  # float32 elements: 4000 bytes


class Chain(nn.Module):
    def forward(self, x):
        a = torch.relu(x)
        b = a[:500] * 3  # a view, then a 2000-byte product
        return b.sum()


class Skip(nn.Module):
    def forward(self, x):
        y = x.relu()
        z = (y * 2).tanh()
        return z + y  # y stays alive across the branch


class KeepsReferences(nn.Module):
    def __init__(self, release: bool):
        super().__init__()
        self.release = release

    def forward(self, x):
        a = x * 2
        b = a + 1
        if self.release:
            del a
        return b * 3


def test_a_chain_gives_the_hand_computed_numbers():
    report = peak_ram(Chain(), torch.randn(N))
    assert report.ops == ["aten.relu.default", "aten.slice.Tensor", "aten.mul.Tensor", "aten.sum.default"]
    # in + out per op: relu x+a, slice a (a view), mul a+b, sum b+c
    assert report.operator_rule == [8000, 4000, 6000, 2004]
    # x (the caller's) stays; a until the mul; b until the sum; c is returned
    assert report.liveness == [8000, 8000, 10000, 6004]
    assert (report.operator_rule_peak, report.liveness_peak) == (8000, 10000)
    assert (report.input_bytes, report.output_bytes) == (4000, 4)


def test_a_skip_connection_keeps_its_tensor_alive():
    report = peak_ram(Skip(), torch.randn(N))
    assert report.ops == ["aten.relu.default", "aten.mul.Tensor", "aten.tanh.default", "aten.add.Tensor"]
    assert report.operator_rule == [8000, 8000, 8000, 12000]
    assert report.liveness == [8000, 12000, 16000, 16000]
    # at the tanh the operator rule sees 2y's product and z; the liveness count adds x and the skip tensor y
    assert report.liveness[2] - report.operator_rule[2] == 8000
    assert (report.operator_rule_peak, report.liveness_peak) == (12000, 16000)


def test_held_counts_references_kept_past_their_last_use():
    kept = peak_ram(KeepsReferences(release=False), torch.randn(N))
    released = peak_ram(KeepsReferences(release=True), torch.randn(N))
    assert kept.liveness == released.liveness == [8000, 12000, 12000]
    assert released.held == [8000, 12000, 12000]
    assert kept.held == [8000, 12000, 16000]  # a lives until forward returns


def test_in_place_ops_and_views_add_nothing_and_parameters_are_not_activations():
    class InPlace(nn.Module):
        def forward(self, x):
            y = x.clone()
            y.relu_()
            return y.view(-1)

    report = peak_ram(InPlace(), torch.randn(N))
    assert report.operator_rule == [8000, 4000, 4000] and report.liveness_peak == 8000

    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5)).eval()
    report = peak_ram(model, torch.randn(4, 10), depth=1)
    # weights never count: each Linear reads x and writes its output (addmm), its weight's transpose is a view
    assert report.operator_rule_peak == 4 * (20 * 4 + 20 * 4)
    assert [(r.name, r.first_op, r.last_op, r.output_bytes) for r in report.layers] == [
        ("0", 0, 1, 320), ("1", 2, 2, 320), ("2", 3, 4, 80)]
    table = format_layer_table(report)
    assert "| 2 | 3-4 |" in table and "| **whole model** | 5 |" in table


def test_detectron2_resnet_stem_and_rnnpool_paths(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 96)
    resnet = peak_ram(BasicStem(3, 64, norm="GN").eval(), x)
    conv_out = 64 * 32 * 48 * 4
    assert resnet.operator_rule_peak == 2 * conv_out + 2 * 32 * 4  # GroupNorm: in, out, mean and rstd per group
    assert resnet.liveness_peak == x.numel() * 4 + 2 * conv_out + 2 * 32 * 4

    pool = RNNPool(3, 8, 4, hidden1=16, hidden2=16, padding="same").eval()
    batched, streamed = peak_ram(pool, x), peak_ram(StreamOf(pool), x)
    assert batched.output_bytes == streamed.output_bytes == 64 * 16 * 24 * 4
    assert streamed.liveness_peak < batched.liveness_peak / 4
    assert streamed.liveness_peak < resnet.liveness_peak / 2
    plot_peak_ram({"batched": batched, "streamed": streamed}, tmp_path / "peak.png")
    assert (tmp_path / "peak.png").stat().st_size > 0


class StreamOf(nn.Module):
    def __init__(self, pool: RNNPool):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        return self.pool.stream(x)


RSS_SCRIPT = textwrap.dedent("""
    import json, torch
    from torch import nn
    from rfpn.analysis.peak_ram import peak_ram, peak_rss_increase

    class Block(nn.Module):
        def forward(self, x):
            y = x.relu()
            z = torch.tanh(y * 2) + 1
            return (z + y).sum(dim=0)

    torch.set_num_threads(1)
    x = torch.randn(4, 2**21)
    with torch.no_grad():
        rss = peak_rss_increase(lambda: Block()(x))
    report = peak_ram(Block(), x)
    print(json.dumps({"rss": rss, "liveness": report.liveness_peak, "input": report.input_bytes}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset needs Linux")
def test_liveness_agrees_with_the_peak_rss_of_a_fresh_process():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT], capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    allocated = result["liveness"] - result["input"]
    assert allocated == 3 * 32 * 2**20  # at most three 32 MiB tensors besides x: y, 2y, tanh(2y); then y, tanh, + 1 ...
    assert abs(result["rss"] / allocated - 1) <= 0.15


def test_goals_compare_the_streaming_stem_with_the_resnet_stem():
    def row(peak, rss=None, inputs=0, rss_mmap=None):
        r = {"operator_rule_peak_bytes": peak, "liveness_peak_bytes": peak, "held_peak_bytes": peak,
             "input_bytes": inputs, "output_bytes": peak // 2}
        r = r if rss is None else {**r, "rss_increase_bytes": rss}
        return r if rss_mmap is None else {**r, "rss_mmap_increase_bytes": rss_mmap}

    mib = 2**20
    goals = check_goals({"resnet/stem/800x1333": row(160 * mib, 150 * mib, 10 * mib),
                         "rnnpool/stem/800x1333": row(600 * mib, 900 * mib, 10 * mib, rss_mmap=600 * mib),
                         "rnnpool_stream/stem/800x1333": row(20 * mib, 12 * mib, 10 * mib),
                         "resnet/stem/128x128": row(2 * mib, 0, 0)})
    stem = goals["stem_800x1333_streaming_over_resnet"]
    assert stem["ratios"]["liveness_peak_bytes"] == 0.125 and stem["ratios"]["rss_increase_bytes"] == 0.08
    assert all(stem["met"].values())
    rss = goals["liveness_vs_rss"]
    assert rss["met"] == {"resnet/stem/800x1333": True, "rnnpool/stem/800x1333": False}
    assert rss["relative_difference"]["resnet/stem/800x1333"]["liveness"] == pytest.approx(0)
    assert list(rss["not_judged"]) == ["rnnpool_stream/stem/800x1333", "resnet/stem/128x128"]
    # glibc with every block mapped on its own: only the rows measured that way are judged
    assert rss["met_mmap_malloc"] == {"rnnpool/stem/800x1333": True}
    assert rss["relative_difference_mmap_malloc"]["rnnpool/stem/800x1333"]["liveness"] == pytest.approx(600 / 590 - 1)


def test_the_tool_reports_a_config_part(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("rfpn_peak_ram_tool", os.path.join(REPO, "tools", "peak_ram.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["report", os.path.join(REPO, "configs/Synthetic-Panoptic/panoptic_fpn_R_18_rnnpool.yaml"),
               "--part", "stem", "--size", "32", "40", "--output-dir", str(tmp_path)])
    row = json.loads((tmp_path / "peak_ram.json").read_text())["row"]
    assert row["input_shape"] == [1, 3, 32, 40] and row["liveness_peak_bytes"] > row["output_bytes"] == 64 * 8 * 10 * 4
    assert row["flops"] > 0 and (tmp_path / "peak_ram.png").is_file()
    assert "**whole model**" in capsys.readouterr().out
