"""tools/train_net.py and rfpn.engine.Trainer end to end on a tiny generated Pathfinder set."""
import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest
from detectron2.data import MetadataCatalog
from detectron2.engine import default_argument_parser

from rfpn.config import validate_pathfinder_config, validate_recurrent_config
from rfpn.data.pathfinder import register_pathfinder
from rfpn.data.pathfinder_generator import PRESETS, generate_pathfinder
from rfpn.engine import Trainer
from rfpn.evaluation import PathfinderEvaluator
from rfpn.utils.cli import UsageError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_BASE = os.path.join(REPO, "configs", "Pathfinder", "cpu", "Base-Pathfinder-CPU.yaml")


def _load_train_net():
    spec = importlib.util.spec_from_file_location("rfpn_train_net", os.path.join(REPO, "tools", "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_net = _load_train_net()


@pytest.fixture(scope="module")
def tiny_pathfinder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    settings = dataclasses.replace(PRESETS["cpu"], contour_length=4, image_size=32, distractor_paddles=4)
    generate_pathfinder("pf_tiny_tn", settings, 8, 4, seed=0, root=root, workers=1, preset="cpu", progress=False)
    register_pathfinder("pf_tiny_tn", root=root)
    return "pf_tiny_tn"


def _args(output_dir, *extra, eval_only=False, resume=False):
    argv = ["--config-file", CPU_BASE]
    if eval_only:
        argv.append("--eval-only")
    if resume:
        argv.append("--resume")
    opts = [
        "OUTPUT_DIR", str(output_dir),
        "DATASETS.TRAIN", "('pf_tiny_tn_train',)",
        "DATASETS.TEST", "('pf_tiny_tn_test',)",
        "DATALOADER.NUM_WORKERS", "0",
        "MODEL.RECURRENT.CHANNELS", "4",
        "MODEL.RECURRENT.KERNEL_SIZE", "3",
        "MODEL.RECURRENT.STEPS", "3",
        "SOLVER.IMS_PER_BATCH", "4",
        "SOLVER.MAX_ITER", "3",
        "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.STEPS", "()",
        "SOLVER.CHECKPOINT_PERIOD", "100",
        "TEST.EVAL_PERIOD", "0",
        "TEST.IMS_PER_BATCH", "2",
        "SEED", "0",
    ]
    return default_argument_parser().parse_args(argv + opts + list(extra))


@pytest.mark.parametrize("grad", ["crbp", "bptt"])
def test_train_then_eval_only(tiny_pathfinder, tmp_path, grad):
    results = train_net.main(_args(tmp_path, "MODEL.RECURRENT.GRAD", grad))
    iou = results["pathfinder"]["IoU"]
    assert 0.0 <= iou <= 1.0
    assert results["pathfinder"]["num_images"] == 4
    checkpoint = tmp_path / "model_final.pth"
    assert checkpoint.is_file()
    assert list(tmp_path.glob("events.out.tfevents.*")), "TensorBoard events were not written"
    metrics = (tmp_path / "metrics.json").read_text()
    assert "total_loss" in metrics and "recurrent/residual" in metrics
    assert ("loss_lcp" in metrics) == (grad == "crbp")

    again = train_net.main(
        _args(tmp_path, "MODEL.RECURRENT.GRAD", grad, "MODEL.WEIGHTS", str(checkpoint), eval_only=True)
    )
    assert again["pathfinder"]["IoU"] == pytest.approx(iou)
    assert again["pathfinder"]["pixel_acc"] == pytest.approx(results["pathfinder"]["pixel_acc"])


def test_automatic_lcp_weight_is_logged_checkpointed_and_resumed(tiny_pathfinder, tmp_path):
    import torch

    auto = ("MODEL.RECURRENT.GRAD", "cjfb", "MODEL.RECURRENT.LCP_WEIGHT_AUTO", "True", "MODEL.RECURRENT.LCP_WEIGHT", "1.0")
    train_net.main(_args(tmp_path, *auto))
    rows = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert any("recurrent/penalty_weight" in r and "recurrent/max_column_sum" in r for r in rows)
    saved = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    weight = float(saved["core.auto_penalty_weight"])
    assert weight != 1.0, "three iterations of dual ascent move the weight"
    trainer = Trainer(train_net.setup(_args(tmp_path, *auto, "SOLVER.MAX_ITER", "4", resume=True)))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 3 and trainer.model.core.penalty_weight == pytest.approx(weight)


def test_per_step_iou_and_feedforward(tiny_pathfinder, tmp_path):
    results = train_net.main(
        _args(tmp_path, "MODEL.PATHFINDER.CORE", "feedforward", "MODEL.PATHFINDER.RETURN_STEPS", "True")
    )
    res = results["pathfinder"]
    assert [k for k in res if k.startswith("IoU@step")] == [f"IoU@step{t}" for t in range(1, 7)]
    assert res["IoU@step6"] == pytest.approx(res["IoU"])


def test_trainer_picks_pathfinder_parts(tiny_pathfinder, tmp_path):
    cfg = train_net.setup(_args(tmp_path))
    assert isinstance(Trainer.build_evaluator(cfg, "pf_tiny_tn_test"), PathfinderEvaluator)
    batch = next(iter(Trainer.build_train_loader(cfg)))
    assert len(batch) == 4 and batch[0]["image"].shape == (1, 32, 32)
    assert MetadataCatalog.get("pf_tiny_tn_test").evaluator_type == "pathfinder"


def test_clear_errors(tiny_pathfinder, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        train_net.setup(default_argument_parser().parse_args(["--config-file", str(tmp_path / "missing.yaml")]))
    with pytest.raises(UsageError, match="not a registered dataset"):
        train_net.setup(_args(tmp_path, "DATASETS.TEST", "('no_such_set_test',)"))
    with pytest.raises(UsageError, match="SOLVER.OPTIMIZER"):
        train_net.setup(_args(tmp_path, "SOLVER.OPTIMIZER", "LBFGS"))




def test_every_pathfinder_config_loads():
    configs = sorted(
        os.path.join(d, f)
        for d, _, files in os.walk(os.path.join(REPO, "configs", "Pathfinder"))
        for f in files
        if f.endswith(".yaml")
    )
    assert len(configs) >= 20
    for path in configs:
        cfg = load_config(path, validators=[validate_recurrent_config, validate_pathfinder_config])
        assert cfg.MODEL.META_ARCHITECTURE == "PathfinderSegmentor", path
        if os.sep + "cpu" + os.sep in path:  # paper-scale models are large; build the CPU ones
            model = Trainer.build_model(cfg)
            assert model.readout[1].out_channels == 2


def test_benchmark_pathfinder_trains_then_eval_only_rescores_with_new_test_settings(tiny_pathfinder, tmp_path):
    """The benchmark keeps a finished method's row; --eval-only changes only its test pass and scores."""
    from rfpn.benchmarks import pathfinder as bench

    opts = ["DATALOADER.NUM_WORKERS", "0", "MODEL.RECURRENT.CHANNELS", "4", "MODEL.RECURRENT.KERNEL_SIZE", "3",
            "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "0", "TEST.IMS_PER_BATCH", "2",
            "MODEL.RECURRENT.MAX_STEPS", "4"]
    common = ["--iters", "2", "--train-set", tiny_pathfinder, "--test-sets", tiny_pathfinder, "--threads", "1",
              "--methods", "C-RBP", "--output-dir", str(tmp_path)]
    (trained,) = bench.main(common + opts + ["MODEL.RECURRENT.TEST_STEPS", "2"])
    assert trained["inference"] == "fixed, 2 steps" and trained["generalisation"] == {"4": trained["iou"]}
    assert trained["saved_bytes"] > 0 and trained["solver"] == "anderson"
    (rescored,) = bench.main(common + ["--eval-only"] + opts + ["MODEL.RECURRENT.TEST_SOLVER", "iterate"])
    assert rescored["inference"] == "iterate, tol 0.001, <= 4 steps"
    kept = ("saved_bytes", "sec_per_iter", "mean_steps", "checkpoint")
    assert {k: rescored[k] for k in kept} == {k: trained[k] for k in kept}
    summary = json.loads((tmp_path / "benchmark_pathfinder.json").read_text())
    assert summary["rows"] == [rescored]
    with pytest.raises(FileNotFoundError, match="BPTT has no finished run.*drop --eval-only"):
        bench.main(common[:-4] + ["--methods", "BPTT", "--output-dir", str(tmp_path), "--eval-only"] + opts)


def _record_test_steps(bench, monkeypatch) -> list[list[int]]:
    """Patch the benchmark's Trainer.test to record the inference steps of every model it evaluates."""
    from rfpn.engine.hooks import find_dynamics

    calls, test = [], bench.Trainer.test
    monkeypatch.setattr(bench.Trainer, "test", classmethod(lambda cls, cfg, model, evaluators=None: (
        calls.append([d.test_steps or d.steps for d in find_dynamics(model).values()]),
        test(cfg, model, evaluators))[1]))
    return calls


def test_benchmark_pathfinder_tests_reversible_rows_past_their_training_steps(tiny_pathfinder, tmp_path, monkeypatch):
    from rfpn.benchmarks import pathfinder as bench

    calls = _record_test_steps(bench, monkeypatch)
    opts = ["DATALOADER.NUM_WORKERS", "0", "MODEL.RECURRENT.CHANNELS", "4", "MODEL.RECURRENT.KERNEL_SIZE", "3",
            "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "0", "TEST.IMS_PER_BATCH", "2",
            "MODEL.RECURRENT.STEPS", "2"]
    (row,) = bench.main(["--iters", "2", "--train-set", tiny_pathfinder, "--test-sets", tiny_pathfinder, "--threads",
                         "1", "--methods", "Reversible additive", "--output-dir", str(tmp_path)] + opts)
    assert row["grad"] == "reversible" and row["inference"] == "fixed, 2 steps"
    assert row["iou_past_training_steps"]["steps"] == 6 and 0.0 <= row["iou_past_training_steps"]["iou"] <= 1.0
    assert calls[-2:] == [[2], [6]], "the past-steps test did not run the model for 3x its steps"


def test_benchmark_pathfinder_momentum_rows_record_mu_and_step_and_run_past_their_training_steps(tiny_pathfinder, tmp_path):
    from rfpn.benchmarks import pathfinder as bench

    opts = ["DATALOADER.NUM_WORKERS", "0", "MODEL.RECURRENT.CHANNELS", "4", "MODEL.RECURRENT.KERNEL_SIZE", "3",
            "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "0", "TEST.IMS_PER_BATCH", "2",
            "MODEL.RECURRENT.STEPS", "2"]
    rows = bench.main(["--iters", "2", "--train-set", tiny_pathfinder, "--test-sets", tiny_pathfinder, "--threads",
                       "1", "--methods", "BPTT mu 0.9", "BPTT damped", "C-RBP mu 0.6", "--output-dir", str(tmp_path)]
                      + opts + ["MODEL.RECURRENT.MAX_STEPS", "3", "MODEL.RECURRENT.TEST_STEPS", "2"])
    by_name = {r["method"]: r for r in rows}
    assert by_name["BPTT mu 0.9"]["config"].endswith("pfcpu9_hgru_bptt_mu09.yaml")
    assert by_name["BPTT mu 0.9"]["momentum"] == {"mu": 0.9, "step": 0.6}
    assert by_name["BPTT damped"]["momentum"] == {"mu": 0.0, "step": 0.6}
    assert by_name["BPTT mu 0.9"]["iou_past_training_steps"]["steps"] == 6
    crbp = by_name["C-RBP mu 0.6"]
    assert crbp["grad"] == "crbp" and crbp["momentum"] == {"mu": 0.6, "step": 0.6}
    assert crbp["inference"] == "fixed, 2 steps" and "iou_past_training_steps" not in crbp
    assert (tmp_path / "momentum_pathfinder.png").read_bytes()[:4] == b"\x89PNG"


def test_benchmark_pathfinder_reports_the_runs_of_earlier_summaries_without_training_them(tiny_pathfinder, tmp_path):
    from rfpn.benchmarks import pathfinder as bench

    def row(method, iters, iou):
        return {"method": method, "config": "c.yaml", "iters": iters, "steps": 20, "mean_steps": None, "iou": iou,
                "saved_bytes": 2**20, "sec_per_iter": 1.0, "generalisation": {}}

    earlier, other_set = tmp_path / "earlier.json", tmp_path / "other_set.json"
    earlier.write_text(json.dumps({"train_set": tiny_pathfinder, "rows": [row("BPTT", 2, 0.9), row("RBP", 3000, 0.8)]}))
    other_set.write_text(json.dumps({"train_set": "pathfinder_cpu14", "rows": [row("C-RBP", 2, 0.7)]}))
    out = tmp_path / "out"
    rows = bench.main(["--iters", "2", "--train-set", tiny_pathfinder, "--test-sets", tiny_pathfinder, "--threads", "1",
                       "--methods", "BPTT", "--output-dir", str(out), "--previous", str(earlier), "--previous", str(other_set)])
    assert rows == [row("BPTT", 2, 0.9)], "the run of another --iters or training set was taken"
    assert json.loads((out / "benchmark_pathfinder.json").read_text())["rows"] == rows
    assert not list(out.glob("*/model_final.pth")), "an adopted run was trained again"


def test_benchmark_pathfinder_resumes_an_interrupted_run_and_reruns_a_finished_one_from_scratch(tiny_pathfinder, tmp_path):
    from rfpn.benchmarks import pathfinder as bench

    opts = ["DATALOADER.NUM_WORKERS", "0", "MODEL.RECURRENT.CHANNELS", "4", "MODEL.RECURRENT.KERNEL_SIZE", "3",
            "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "0", "TEST.IMS_PER_BATCH", "2",
            "MODEL.RECURRENT.MAX_STEPS", "3", "MODEL.RECURRENT.TEST_STEPS", "2", "SOLVER.CHECKPOINT_PERIOD", "2"]
    common = ["--train-set", tiny_pathfinder, "--test-sets", tiny_pathfinder, "--threads", "1", "--methods", "C-RBP",
              "--output-dir", str(tmp_path)]
    (first,) = bench.main(["--iters", "3"] + common + opts)
    assert "resumed_from_iter" not in first
    run_dir = tmp_path / "c-rbp"
    (run_dir / "row.json").unlink()  # as if killed after the checkpoint of iteration 2 (index 1)
    (run_dir / "model_final.pth").unlink()
    (run_dir / "last_checkpoint").write_text("model_0000001.pth")
    (resumed,) = bench.main(["--iters", "3"] + common + opts)
    assert resumed["resumed_from_iter"] == 2
    (retrained,) = bench.main(["--iters", "3", "--rerun"] + common + opts)
    assert "resumed_from_iter" not in retrained
    summary = json.loads((tmp_path / "benchmark_pathfinder.json").read_text())
    assert summary["opts"] == opts, "the summary does not say which overrides (a SEED, say) made its rows"


def test_benchmark_long_contours_budget_seeds_curves_and_resume(tiny_pathfinder, tmp_path, monkeypatch):
    """BPTT at budget trains with the most steps whose bytes fit C-RBP's; rows carry curves and diagnostics."""
    from rfpn.benchmarks import long_contours as bench
    from rfpn.benchmarks.pathfinder import training_bytes

    opts = ["DATALOADER.NUM_WORKERS", "0", "MODEL.RECURRENT.CHANNELS", "4", "SOLVER.IMS_PER_BATCH", "4",
            "SOLVER.WARMUP_ITERS", "0", "TEST.IMS_PER_BATCH", "2", "MODEL.RECURRENT.MAX_STEPS", "4",
            "MODEL.RECURRENT.TEST_STEPS", "2", "DIAGNOSTICS.PERIOD", "1", "DIAGNOSTICS.POWER_ITERS", "2"]
    argv = ["--methods", "C-RBP", "BPTT at budget", "FF control", "--seeds", "0", "1", "--control-seeds", "0",
            "--train-set", tiny_pathfinder, "--test-sets", tiny_pathfinder, "--iters", "2", "--curve-steps", "3", "--curve-images", "4", "--threads",
            "1", "--output-dir", str(tmp_path)]
    rows = bench.main(argv + opts)
    summary = json.loads((tmp_path / "benchmark_long_contours.json").read_text())
    assert summary["train_set"] == tiny_pathfinder
    budget = summary["budget"]
    args = bench.parse_args(argv + opts)
    fits = [training_bytes(bench.method_cfg(bench.BUDGET_METHOD, 0, args, ["MODEL.RECURRENT.STEPS", k]))
            for k in (budget["bptt_steps"], budget["bptt_steps"] + 1)]
    assert fits[0] <= budget["crbp_bytes"] < fits[1]

    by_run = {(r["method"], r["seed"]): r for r in rows}
    assert sorted(by_run) == [("BPTT at budget", 0), ("BPTT at budget", 1), ("C-RBP", 0), ("C-RBP", 1), ("FF control", 0)]
    assert by_run[("BPTT at budget", 0)]["steps"] == budget["bptt_steps"]
    crbp = by_run[("C-RBP", 0)]
    assert crbp["inference"] == "fixed, 2 steps" and len(crbp["step_ious"]["4"]) == 3
    assert 1 <= crbp["mean_steps"] <= 4  # Anderson's cell evaluations in training, capped by MAX_STEPS
    assert crbp["step_ious"]["4"][1] == pytest.approx(crbp["iou"], abs=1e-9)  # the evaluator's IoU after 2 steps
    assert set(crbp["diagnostics"]) >= {"spectral_norm", "max_column_sum", "relative_residual", "neumann_cap_hits"}
    # read back from metrics.json, which the writers fill every 20 iterations and at the end
    assert [it for it, _ in crbp["diagnostics"]["spectral_norm"]] == [1]
    assert crbp["diagnostics"]["penalty_weight"] == [[1, 10.0]]  # the fixed LCP weight of the config
    assert "step_ious" not in by_run[("FF control", 0)]

    (diff,) = [d for d in summary["paired_iou_differences"] if d["baseline"] == "BPTT at budget"]
    assert diff["seeds"] == [0, 1]
    assert diff["differences"] == [by_run[("C-RBP", s)]["iou"] - by_run[("BPTT at budget", s)]["iou"] for s in (0, 1)]
    (crbp_summary,) = [s for s in summary["summary"] if s["method"] == "C-RBP"]
    assert crbp_summary["iou"]["runs"] == [by_run[("C-RBP", s)]["iou"] for s in (0, 1)]
    assert crbp_summary["mean_steps"] == pytest.approx(np.mean([by_run[("C-RBP", s)]["mean_steps"] for s in (0, 1)]))
    assert crbp_summary["bptt_steps_in_same_bytes"] == pytest.approx(
        (budget["crbp_bytes"] - budget["bptt_base_bytes"]) / budget["bptt_bytes_per_step"])
    for png in ("long_contours.png", "long_contours_diagnostics.png", "long_contours_steps_4.png"):
        assert (tmp_path / png).stat().st_size > 0

    row_file = tmp_path / "c-rbp_seed0" / "row.json"
    before = row_file.stat().st_mtime_ns
    again = bench.main(argv + opts)  # every run has a row: nothing is retrained
    assert row_file.stat().st_mtime_ns == before and again == rows
    reported = bench.main(argv[:1] + ["RBP"] + argv[4:] + ["--report"] + opts)  # RBP never ran: nothing trains
    assert reported == [] and not (tmp_path / "rbp_seed0").exists()

    fresh_dir = tmp_path / "fresh"  # a new machine: the committed summary stands in for the finished runs
    argv_fresh = argv[:-1] + [str(fresh_dir), "--report", "--previous", str(tmp_path / "benchmark_long_contours.json")]
    monkeypatch.setattr(bench, "memory_budget", lambda args: pytest.fail("the budget is in the previous summary"))
    assert bench.main(argv_fresh + opts) == rows
    assert json.loads((fresh_dir / "benchmark_long_contours.json").read_text())["budget"] == budget


def test_long_contours_child_job_runs_one_seed_with_the_parents_budget():
    from rfpn.benchmarks import long_contours as bench

    args = bench.parse_args(["--jobs", "2", "--threads", "2", "--output-dir", "out", "--train-set", "pathfinder_cpu9",
                             "MODEL.RECURRENT.TOL", "1e-4"])
    budget = {"crbp_bytes": 10, "bptt_bytes_per_step": 4, "bptt_base_bytes": 1, "bptt_steps": 2}
    job = bench.child_job("BPTT at budget", 1, args, budget)
    assert job.argv[1:3] == ["-m", "rfpn.benchmarks.long_contours"] and job.threads == 1
    child = bench.parse_args(job.argv[3:])
    assert (child.methods, child.seeds, child.row_only, child.output_dir) == (["BPTT at budget"], [1], True, "out")
    assert json.loads(child.budget) == budget and child.opts == ["MODEL.RECURRENT.TOL", "1e-4"]
    assert child.train_set == "pathfinder_cpu9"
    assert bench.method_cfg("C-RBP", 1, child).DATASETS.TRAIN == ("pathfinder_cpu9_train",)
    assert job.log_path == os.path.join("out", "bptt_at_budget_seed1", "benchmark.log")


def test_long_contours_default_run_is_the_3x3_design_and_wider_kernels_run_on_request():
    from rfpn.benchmarks import long_contours as bench

    default = bench.parse_args(["--output-dir", "out"])
    assert {bench.method_cfg(m, 0, default).MODEL.RECURRENT.KERNEL_SIZE for m in default.methods} == {3}
    assert set(default.methods) | bench.WIDER_KERNEL_METHODS == set(bench.METHODS)
    wide = bench.parse_args(["--output-dir", "out", "--methods", "C-RBP 7x7", "RBP 7x7"])
    assert {bench.method_cfg(m, 0, wide).MODEL.RECURRENT.KERNEL_SIZE for m in wide.methods} == {7}
    assert bench.parse_args(["--kernel-size", "7"]).methods == ["C-RBP 7x7", "BPTT at budget 7x7", "RBP 7x7"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--kernel-size", "7", "--methods", "C-RBP"])


def test_long_contours_kernel_pairs_change_only_the_kernel():
    """Each wider-kernel C-RBP and its BPTT or RBP partner are the 3x3 configs with only the kernel changed."""
    from rfpn.benchmarks import long_contours as bench

    args = bench.parse_args(["--output-dir", "out"])
    tables = (bench.KERNEL_PAIRS, bench.PENALTY_PAIRS)
    assert all(pair[1] in bench.BUDGET_METHODS for pair in bench.KERNEL_PAIRS.values())
    for table, (size, pair) in ((t, item) for t in tables for item in t.items()):
        assert pair in bench.COMPARISONS
        for wide, base in zip(pair, table[3]):
            cfg, ref = bench.method_cfg(wide, 0, args), bench.method_cfg(base, 0, args)
            assert (cfg.MODEL.RECURRENT.KERNEL_SIZE, ref.MODEL.RECURRENT.KERNEL_SIZE) == (size, 3)
            ref.defrost()
            ref.MODEL.RECURRENT.KERNEL_SIZE, ref.OUTPUT_DIR = size, cfg.OUTPUT_DIR
            assert cfg.dump() == ref.dump()
