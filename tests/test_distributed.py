"""Multi-process training on the CPU: tools/train_net.py --num-gpus 2 (GLOO) against a single process."""
from __future__ import annotations

import os
import subprocess

import torch
from detectron2.utils.env import seed_all_rng

from rfpn.config import validate_training_safety_config
from rfpn.data.pathfinder import register_pathfinder
from rfpn.engine import Trainer
from rfpn.engine.ddp import create_ddp_model
from rfpn.utils import load_config

from test_resume import CPU_BASE, subprocess_env, tiny_opts, tiny_pathfinder, train_net_command

ITERS = 3

# The equivalence below needs a loss whose gradient over the full batch is the mean of the
# per-rank gradients. Batch-statistics BatchNorm (the Pathfinder default, MODEL.RECURRENT.NORM
# "bn" and the "bn" readout) normalises each rank's half batch with that half's statistics, so
# two processes would compute a different function than one process on the whole batch. GroupNorm
# normalises each sample on its own: with it the two runs must agree up to float rounding.
# Flips are off (each process draws its own), and the dataset holds exactly one total batch, so
# every iteration of both runs sees the same four images whatever the sampler's shuffle.
EQUIVALENCE_OPTS = [
    "MODEL.RECURRENT.NORM", "gn",
    "MODEL.PATHFINDER.READOUT_NORM", "gn",
    "INPUT.PATHFINDER_FLIP", "False",
    "SOLVER.BASE_LR", "0.01",
    "SOLVER.MAX_ITER", str(ITERS),
    "SOLVER.CHECKPOINT_PERIOD", "1000",
    "SOLVER.NONFINITE", "skip",  # the ranks agree on every step through an all-reduce: exercise it
]


def test_create_ddp_model_is_identity_in_one_process():
    model = torch.nn.Linear(2, 2)
    assert create_ddp_model(model, broadcast_buffers=False) is model


def test_two_cpu_processes_match_one_process_with_the_same_total_batch(tmp_path):
    root = str(tmp_path / "datasets")
    tiny_pathfinder(root, "pf_ddp")
    two, one = tmp_path / "two", tmp_path / "one"

    # Two processes through Detectron2's launcher, exactly as a user runs it.
    run = subprocess.run(
        train_net_command("--num-gpus", "2", "--dist-url", "auto", *tiny_opts("pf_ddp", str(two)), *EQUIVALENCE_OPTS),
        env=subprocess_env(root), capture_output=True, text=True, timeout=400,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    log = (two / "log.txt").read_text()
    assert "World size: 2" in log
    # ResilientTrainer compares the ranks' weights after training and fails the run if they differ.
    assert "Model weights are identical on all 2 ranks." in log

    # One process, same config and seed, the whole batch of 4 at once.
    register_pathfinder("pf_ddp", root=root)
    cfg = load_config(CPU_BASE, tiny_opts("pf_ddp", str(one)) + EQUIVALENCE_OPTS,
                      validators=[validate_training_safety_config])
    cfg.freeze()
    seed_all_rng(cfg.SEED)  # what default_setup does on rank 0, whose weights DDP broadcasts
    torch.set_num_threads(1)
    trainer = Trainer(cfg)
    start = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.resume_or_load(resume=False)
    trainer.train()
    single = trainer.model.state_dict()

    multi = torch.load(str(two / "model_final.pth"), map_location="cpu", weights_only=False)
    assert multi["iteration"] == ITERS - 1
    multi = multi["model"]
    assert set(multi) == set(single)
    moved = max((single[k] - start[k]).abs().max().item() for k in single if single[k].is_floating_point())
    assert moved > 1e-3, "training did not change the weights; the comparison would prove nothing"
    for key, value in single.items():
        if value.is_floating_point():
            torch.testing.assert_close(multi[key], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")


def _sync_worker(rank: int, init_file: str) -> None:
    import torch.distributed as dist

    from rfpn.engine.hooks import sync_penalty_weights
    from rfpn.recurrent import HGRUCell, PenaltyOptions, RecurrentDynamics

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        dyn = RecurrentDynamics(HGRUCell(2, 3), steps=2, penalty_options=PenaltyOptions(weight=1.0 + rank, auto=True))
        sync_penalty_weights([dyn])
        assert dyn.penalty_weight == 2.0, dyn.penalty_weight
    finally:
        dist.destroy_process_group()


def test_automatic_penalty_weights_agree_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sync_worker, args=(str(tmp_path / "init"),), nprocs=2, join=True)
