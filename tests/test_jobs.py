"""Child-process jobs of the benchmarks: parallel runs, thread limits, failures named with their log."""
import json
import os
import sys

import pytest

from rfpn.utils.jobs import ChildJob, run_child_jobs, write_json_atomic


def _job(tmp_path, name: str, code: str, threads: int = 1) -> ChildJob:
    return ChildJob(name, [sys.executable, "-c", code], str(tmp_path / name / "log.txt"), threads)


def test_jobs_run_with_their_thread_limit_and_log_their_output(tmp_path):
    code = "import os; print('threads', os.environ['OMP_NUM_THREADS'])"
    run_child_jobs([_job(tmp_path, "a", code, 1), _job(tmp_path, "b", code, 3)], parallel=2)
    assert (tmp_path / "a" / "log.txt").read_text().strip() == "threads 1"
    assert (tmp_path / "b" / "log.txt").read_text().strip() == "threads 3"


def test_a_failing_job_is_named_with_its_log_and_the_others_still_finish(tmp_path):
    marker = tmp_path / "ran.txt"
    jobs = [
        _job(tmp_path, "bad", "import sys; print('boom'); sys.exit(3)"),
        _job(tmp_path, "good", f"open({str(marker)!r}, 'w').write('x')"),
    ]
    with pytest.raises(RuntimeError, match=r"bad failed \(exit 3\); see .*bad/log.txt"):
        run_child_jobs(jobs, parallel=1)
    assert marker.read_text() == "x"
    assert "boom" in (tmp_path / "bad" / "log.txt").read_text()


def test_parallel_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="parallel=0"):
        run_child_jobs([], parallel=0)


def test_write_json_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "row.json")
    write_json_atomic(path, {"iou": 0.5})
    write_json_atomic(path, {"iou": 0.9})
    assert json.loads(open(path).read()) == {"iou": 0.9}
    assert os.listdir(tmp_path) == ["row.json"]
