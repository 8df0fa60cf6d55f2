import json

from rfpn.utils.events import metric_history, metric_mean


def test_metric_history_keeps_the_last_value_per_iteration_and_skips_cut_lines(tmp_path):
    lines = [
        {"iteration": 19, "time": 1.0, "recurrent/steps": 10.0},
        {"iteration": 39, "time": 3.0, "recurrent/steps": 12.0},
        {"iteration": 39, "time": 2.0},  # logged again after a resume from an earlier checkpoint
        {"iteration": 59, "time": 4.0, "eval/IoU": "n/a"},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + '\n{"iteration": 79, "ti'
    (tmp_path / "metrics.json").write_text(text)
    history = metric_history(str(tmp_path))
    assert history["time"] == [(19, 1.0), (39, 2.0), (59, 4.0)]
    assert history["recurrent/steps"] == [(19, 10.0), (39, 12.0)] and "eval/IoU" not in history
    assert set(metric_history(str(tmp_path), "recurrent/")) == {"recurrent/steps"}
    assert metric_mean(str(tmp_path), "time") == (1.0 + 2.0 + 4.0) / 3
    assert metric_mean(str(tmp_path), "time", from_iter=39) == 3.0
    assert metric_mean(str(tmp_path), "missing") is None
    assert metric_history(str(tmp_path / "nowhere")) == {}
