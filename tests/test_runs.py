"""The cache of finished benchmark runs (rfpn.utils.runs)."""
from __future__ import annotations

import logging
import os

from rfpn.utils.runs import load_run, run_dir, save_run


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
