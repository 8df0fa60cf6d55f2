"""Resume after a real kill: tools/train_net.py is SIGKILLed after a checkpoint and continues with --resume."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from rfpn.data.pathfinder_generator import PRESETS, generate_pathfinder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_BASE = os.path.join(REPO, "configs", "Pathfinder", "cpu", "Base-Pathfinder-CPU.yaml")
MAX_ITER, PERIOD = 40, 5


def tiny_pathfinder(root: str, name: str) -> None:
    """A 24x24 Pathfinder set small enough for seconds-long multi-process runs."""
    settings = dataclasses.replace(PRESETS["cpu"], contour_length=3, image_size=24, paddle_length=4.0,
                                   paddle_margin=2.0, marker_radius=2.0, distractor_paddles=3)
    generate_pathfinder(name, settings, 4, 2, seed=0, root=root, workers=1, preset="cpu", progress=False)


def tiny_opts(name: str, output_dir: str) -> list[str]:
    """Overrides of the CPU base config: a 4-channel hGRU with 3x3 kernels and 3 steps, batch 4."""
    return [
        "OUTPUT_DIR", output_dir,
        "DATASETS.TRAIN", f"('{name}_train',)",
        "DATASETS.TEST", "()",
        "DATALOADER.NUM_WORKERS", "0",
        "MODEL.RECURRENT.CHANNELS", "4",
        "MODEL.RECURRENT.KERNEL_SIZE", "3",
        "MODEL.RECURRENT.STEPS", "3",
        "MODEL.PATHFINDER.INPUT_KERNEL_SIZE", "3",
        "SOLVER.IMS_PER_BATCH", "4",
        "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.STEPS", "()",
        "TEST.EVAL_PERIOD", "0",
        "SEED", "0",
    ]


def train_net_command(*args: str) -> list[str]:
    return [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", CPU_BASE, *args]


def subprocess_env(root: str) -> dict[str, str]:
    """The datasets root (so ``import rfpn`` registers the tiny set) and one thread per process."""
    return dict(os.environ, DETECTRON2_DATASETS=root, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _checkpoint_iteration(path: str) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["iteration"])


def test_sigkill_then_resume_continues_from_the_last_checkpoint(tmp_path):
    root, out = str(tmp_path / "datasets"), tmp_path / "out"
    tiny_pathfinder(root, "pf_resume")
    opts = tiny_opts("pf_resume", str(out)) + [
        "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", str(PERIOD)
    ]
    env = subprocess_env(root)

    first = subprocess.Popen(train_net_command(*opts), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second_checkpoint = f"model_{2 * PERIOD - 1:07d}.pth"
    deadline = time.monotonic() + 240
    try:
        # last_checkpoint names a checkpoint only once it is complete: kill right after the second one.
        while not (out / "last_checkpoint").exists() or (out / "last_checkpoint").read_text() < second_checkpoint:
            assert first.poll() is None, f"training exited early with code {first.returncode}"
            assert time.monotonic() < deadline, "no checkpoint appeared within 240 s"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL
    assert not (out / "model_final.pth").exists(), "the run finished before it was killed; the test proves nothing"

    # What the killed run left: the newest complete checkpoint is what --resume must continue from.
    last = (out / "last_checkpoint").read_text().strip()
    last_iter = _checkpoint_iteration(str(out / last))
    assert last_iter >= 2 * PERIOD - 1 and (last_iter + 1) % PERIOD == 0
    # It is the newest checkpoint on disk, and checkpoints come every PERIOD iterations, so the kill
    # cost at most PERIOD iterations.
    periodic = sorted(p.name for p in out.glob("model_0*.pth"))
    assert periodic[-1] == last, periodic

    resumed = subprocess.run(train_net_command("--resume", *opts), env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert f"Starting training from iteration {last_iter + 1}" in log

    final = torch.load(str(out / "model_final.pth"), map_location="cpu", weights_only=False)
    assert final["iteration"] == MAX_ITER - 1
    # Optimizer and scheduler continued rather than restarted: Adam counted every step of both runs,
    # and the scheduler's epoch counter covers the whole schedule.
    state = final["trainer"]
    adam_steps = {int(s["step"]) for s in state["_trainer"]["optimizer"]["state"].values()}
    assert adam_steps == {MAX_ITER}, adam_steps
    assert state["hooks"]["LRScheduler"]["last_epoch"] == MAX_ITER
    lines = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    assert max(entry["iteration"] for entry in lines if "iteration" in entry) == MAX_ITER - 1


def test_atomic_checkpointer_never_leaves_a_partial_file(tmp_path, monkeypatch):
    from rfpn.engine.defaults import AtomicCheckpointer

    model = torch.nn.Linear(2, 2)
    ckpt = AtomicCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000004", iteration=4)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"

    def killed_midway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # stands for a kill during the write

    monkeypatch.setattr(torch, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000009", iteration=9)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000004.pth"]
    assert AtomicCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)["iteration"] == 4


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and PR_SET_PDEATHSIG")
def test_workers_stop_when_the_launcher_of_a_two_process_run_is_killed(tmp_path):
    root, out = str(tmp_path / "datasets"), tmp_path / "out"
    tiny_pathfinder(root, "pf_orphan")
    opts = tiny_opts("pf_orphan", str(out)) + ["SOLVER.MAX_ITER", "100000", "SOLVER.CHECKPOINT_PERIOD", "2"]
    launcher = subprocess.Popen(train_net_command("--num-gpus", "2", *opts), env=subprocess_env(root),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while not (out / "last_checkpoint").exists():
            assert launcher.poll() is None, f"training exited early with code {launcher.returncode}"
            assert time.monotonic() < deadline, "no checkpoint appeared within 240 s"
            time.sleep(0.1)
        workers = [pid for pid in _children(launcher.pid) if _alive(pid)]
        assert len(workers) >= 2, workers
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        stop = time.monotonic() + 15
        while any(_alive(pid) for pid in workers) and time.monotonic() < stop:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers), "a worker outlived its launcher"
    finally:
        launcher.kill()
    last = (out / "last_checkpoint").read_text().strip()
    time.sleep(1.0)
    assert (out / "last_checkpoint").read_text().strip() == last, "no checkpoint is written after the kill"
    assert _checkpoint_iteration(str(out / last)) >= 1
