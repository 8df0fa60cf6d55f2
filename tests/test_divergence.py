"""Divergence handling: NonFiniteGuardTrainer (raise / skip) and BackwardCapHook, on a tiny recurrent model."""
from __future__ import annotations

import gc
import itertools
import logging

import pytest
import torch
from torch import nn

from rfpn.engine.hooks import BackwardCapHook, find_dynamics
from rfpn.engine.train_loop import NonFiniteGuardTrainer
from rfpn.recurrent import HGRUCell, RecurrentDynamics


class TinyRecurrent(nn.Module):
    """Drive -> hGRU dynamics -> mean readout; ``loss_fit`` plus an optional poisoned term.

    A batch dict may carry ``poison`` (added to the loss term ``loss_extra``) and ``scale`` (multiplies
    the drive: a huge scale makes the recurrent state overflow).
    """

    def __init__(self, grad: str = "rbp", norm_cap: float = 100.0):
        super().__init__()
        self.inp = nn.Conv2d(1, 4, 3, padding=1)
        self.dynamics = RecurrentDynamics(HGRUCell(4, 3, norm="none"), steps=3, grad=grad, neumann_steps=5,
                                          neumann_norm_cap=norm_cap)

    def forward(self, batch: dict) -> dict:
        h, _ = self.dynamics(self.inp(batch["x"]) * batch.get("scale", 1.0))
        out = {"loss_fit": (h.mean() - 1.0) ** 2}
        if "poison" in batch:
            out["loss_extra"] = h.mean() * 0 + batch["poison"]
        return out


def _batches(special: dict[int, dict]):
    """An endless loader; batch ``i`` gets the extra keys ``special[i]``."""
    g = torch.Generator().manual_seed(0)
    for i in itertools.count():
        yield {"x": torch.rand(2, 1, 6, 6, generator=g), **special.get(i, {})}


def _trainer(special: dict[int, dict], nonfinite: str, **model_kw) -> NonFiniteGuardTrainer:
    torch.manual_seed(0)
    model = TinyRecurrent(**model_kw)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return NonFiniteGuardTrainer(model, _batches(special), optimizer, nonfinite=nonfinite)


class _Records(logging.Handler):
    """Collects the messages of one logger (works whether or not it propagates to the root)."""

    def __init__(self, name: str):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.logger = logging.getLogger(name)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> "_Records":
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)


def _weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


class _Snapshots:
    """Record the weights after every step (a hook)."""

    def __init__(self, trainer):
        from detectron2.engine import HookBase

        snaps = self.snaps = []

        class Hook(HookBase):
            def after_step(self):
                snaps.append(_weights(self.trainer.model))

        trainer.register_hooks([Hook()])


def test_nonfinite_loss_raises_naming_iteration_and_term():
    trainer = _trainer({2: {"poison": float("nan")}}, "raise")
    snaps = _Snapshots(trainer).snaps
    with pytest.raises(FloatingPointError, match=r"Iteration 2: non-finite loss term\(s\) loss_extra=nan\. "
                                                 r"Training stopped\. .*SOLVER\.NONFINITE skip"):
        trainer.train(0, 5)
    assert len(snaps) == 2  # iterations 0 and 1 ran; 2 stopped before any weight changed
    assert torch.equal(_weights(trainer.model), snaps[-1])


def test_nonfinite_state_raises_naming_iteration_and_step():
    trainer = _trainer({1: {"scale": float("inf")}}, "raise")
    with pytest.raises(FloatingPointError, match=r"Iteration 1: the forward pass failed: Non-finite recurrent "
                                                 r"state at step \d+ of \d+"):
        trainer.train(0, 3)


def test_skip_mode_drops_bad_batches_and_counts_them():
    special = {1: {"poison": float("inf")}, 3: {"scale": float("inf")}}
    trainer = _trainer(special, "skip")
    snaps = _Snapshots(trainer).snaps
    with _Records("rfpn.engine.train_loop") as records:
        trainer.train(0, 5)
    assert trainer.iter == 5
    # Skipped iterations leave the weights as they were; the others change them.
    assert torch.equal(snaps[1], snaps[0]) and torch.equal(snaps[3], snaps[2])
    assert not torch.equal(snaps[2], snaps[1]) and not torch.equal(snaps[4], snaps[3])
    assert trainer.skipped_batches == 2
    history = trainer.storage.history("nonfinite/skipped_batches")
    assert [(int(v), it) for v, it in history.values()] == [(1, 1), (2, 3)]
    messages = records.messages
    assert any("Iteration 1: non-finite loss term(s) loss_extra=inf" in m and "Skipped" in m for m in messages)
    assert any("Iteration 3: the forward pass failed: Non-finite recurrent state" in m for m in messages)
    # The count survives a checkpoint round trip.
    state = trainer.state_dict()
    fresh = _trainer({}, "skip")
    fresh.load_state_dict(state)
    assert fresh.skipped_batches == 2


def test_nonfinite_gradient_after_finite_loss_is_caught():
    trainer = _trainer({}, "raise")

    def poison_grad(grad):
        return grad * float("nan")

    trainer.model.inp.weight.register_hook(poison_grad)
    with pytest.raises(FloatingPointError, match=r"Iteration 0: non-finite gradient of inp\.weight after a finite loss"):
        trainer.train(0, 2)


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="nonfinite='ignore' is not valid; allowed values: raise, skip"):
        _trainer({}, "ignore")


def test_neumann_cap_hits_are_counted_in_the_event_log():
    # A norm cap of 1 stops every Neumann sum after its first term: each backward is a cap hit.
    trainer = _trainer({}, "raise", grad="rbp", norm_cap=1.0)
    hook = BackwardCapHook()
    trainer.register_hooks([hook])
    assert list(find_dynamics(trainer.model)) == ["dynamics"]
    with _Records("rfpn.engine.hooks") as records:
        trainer.train(0, 3)
    counts = [int(v) for v, _ in trainer.storage.history("recurrent/neumann_cap_hits_total").values()]
    assert counts == [1, 2, 3]
    assert any("Iteration 0: the neumann backward of dynamics stopped on a safeguard (norm_cap" in m
               for m in records.messages)
    # Resumed runs keep counting from the checkpointed total.
    resumed = BackwardCapHook()
    resumed.load_state_dict(hook.state_dict())
    trainer2 = _trainer({}, "raise", grad="rbp", norm_cap=1.0)
    trainer2.register_hooks([resumed])
    trainer2.train(3, 4)
    assert resumed.total() == 4


def test_neumann_cap_hook_stays_silent_when_the_cap_is_not_reached():
    trainer = _trainer({}, "raise", grad="rbp", norm_cap=1e6)
    trainer.register_hooks([BackwardCapHook()])
    trainer.train(0, 2)
    counts = [int(v) for v, _ in trainer.storage.history("recurrent/neumann_cap_hits_total").values()]
    assert counts == [0, 0]


def _skip_on_one_rank(rank: int, init_file: str, out_dir: str) -> None:
    """One of two GLOO ranks: rank 1 alone sees a NaN loss at iteration 1 (run in a child process)."""
    from datetime import timedelta

    import torch.distributed as dist

    from rfpn.engine.ddp import create_ddp_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))  # a rank left waiting fails instead of hanging
    try:
        torch.manual_seed(0)
        model = create_ddp_model(TinyRecurrent(grad="bptt"), broadcast_buffers=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        special = {1: {"poison": float("nan")}} if rank == 1 else {}
        trainer = NonFiniteGuardTrainer(model, _batches(special), optimizer, nonfinite="skip")
        snaps = _Snapshots(trainer).snaps
        trainer.train(0, 3)
        torch.save({"snaps": snaps, "skipped": trainer.skipped_batches}, f"{out_dir}/rank{rank}.pt")
        # Tear down in lockstep: a rank that exits while the other's DDP reducer still holds the
        # group can abort in gloo's destructor ("terminate called without an active exception").
        dist.barrier()
        del trainer, model, optimizer
        gc.collect()
    finally:
        dist.destroy_process_group()


def test_skip_mode_agrees_across_ranks_when_one_rank_sees_a_nan(tmp_path):
    # Without the all-reduce of the skip decision, rank 0 would step while rank 1 skipped, and
    # its backward would wait forever for rank 1's gradients (or the weights would part ways).
    torch.multiprocessing.spawn(_skip_on_one_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["skipped"] for r in ranks] == [1, 1]
    for r in ranks:
        snaps = r["snaps"]
        assert torch.equal(snaps[1], snaps[0]), "the skipped iteration changed the weights"
        assert not torch.equal(snaps[2], snaps[1]), "the iteration after the skip did not train"
    for a, b in zip(ranks[0]["snaps"], ranks[1]["snaps"]):
        assert torch.equal(a, b)


def test_skip_mode_stops_a_run_that_skips_more_than_its_allowance():
    special = {i: {"poison": float("nan")} for i in range(1, 8)}
    trainer = _trainer(special, "skip")
    trainer.max_skipped = 2
    with pytest.raises(FloatingPointError, match="Iteration 3: .*3 batches were skipped, more than the 2 that "
                                                 "SOLVER.NONFINITE_MAX_FRACTION allows"):
        trainer.train(0, 8)
    assert trainer.skipped_batches == 3
