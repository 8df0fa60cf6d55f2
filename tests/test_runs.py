"""The cache of finished benchmark runs (rfpn.utils.runs)."""
from __future__ import annotations

import logging
import os

from rfpn.utils.runs import adopt_rows, load_run, run_dir, save_run


def test_run_folders_are_slugs_of_name_and_seed(tmp_path):
    assert run_dir(tmp_path, "C-RBP auto") == os.path.join(tmp_path, "c-rbp_auto")
    assert run_dir(tmp_path, "C-RBP auto", 3) == os.path.join(tmp_path, "c-rbp_auto_seed3")


def test_a_kept_run_is_read_back_only_under_matching_settings(tmp_path, caplog):
    assert load_run(tmp_path, "BPTT", 0) is None  # not finished
    row = {"method": "BPTT", "iters": 300, "settings": {"length": 100}, "iou": 0.5}
    path = save_run(tmp_path, row, "BPTT", 0)
    assert path == os.path.join(tmp_path, "bptt_seed0", "row.json")
    assert os.listdir(os.path.dirname(path)) == ["row.json"]  # no temporary left behind
    assert load_run(tmp_path, "BPTT", 0) == row
    assert load_run(tmp_path, "BPTT", 0, match={"iters": 300, "settings": {"length": 100}}) == row
    assert load_run(tmp_path, "BPTT", 1) is None
    with caplog.at_level(logging.INFO, logger="rfpn.utils.runs"):
        assert load_run(tmp_path, "BPTT", 0, match={"iters": 3000}) is None
    assert "{'iters': 300}, not {'iters': 3000}: not reused" in caplog.text
    assert load_run(tmp_path, "BPTT", 0, match={"settings": {"length": 200}}) is None


def test_rows_of_an_earlier_summary_are_adopted_once_and_only_with_matching_settings(tmp_path):
    own = {"method": "C-RBP", "seed": 0, "iters": 300, "iou": 0.9}
    save_run(tmp_path, own, "C-RBP", 0)
    earlier = [
        {"method": "C-RBP", "seed": 0, "iters": 300, "iou": 0.1},  # this run finished here: kept as it is
        {"method": "C-RBP", "seed": 1, "iters": 300, "iou": 0.8},
        {"method": "RBP", "seed": 0, "iters": 3000, "iou": 0.7},  # other settings: not a finished run
    ]
    assert adopt_rows(tmp_path, earlier, "method", {"iters": 300}) == 1
    assert load_run(tmp_path, "C-RBP", 0) == own
    assert load_run(tmp_path, "C-RBP", 1) == earlier[1]
    assert load_run(tmp_path, "RBP", 0) is None
    assert adopt_rows(tmp_path, earlier, "method", {"iters": 300}) == 0
