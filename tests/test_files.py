"""The one atomic writer and the copy of results to the docs folders."""
import json

import pytest

from rfpn.utils import files


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "sub" / "result.json"
    files.write_json_atomic(target, {"a": 1})
    (target.parent / "result.json.tmp-12345").write_text("left by a killed writer")

    def explode(f):
        f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        files.atomic_write(target, explode, mode="w")
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]


def test_copy_to_docs_sends_json_to_results_and_figures_to_docs(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(files, "FIGURES_DIR", tmp_path / "figures")
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "b.png").write_bytes(b"png")
    assert files.copy_to_docs(tmp_path / "a.json") == tmp_path / "results" / "a.json"
    assert files.copy_to_docs(tmp_path / "b.png", "c.png").read_bytes() == b"png"
    assert (tmp_path / "figures" / "c.png").is_file()
