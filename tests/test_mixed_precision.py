"""Mixed precision: every gradient method under bf16 autocast, the solvers' stops, bf16 training and
fp32 checkpoints, the fp16 gradient scaler on the CPU, and the errors of SOLVER.AMP."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage

from rfpn.config import add_rfpn_config
from rfpn.engine import amp
from rfpn.engine.train_loop import NonFiniteGuardTrainer
from rfpn.recurrent import (
    GRADS,
    ConvLSTMCell,
    HGRUCell,
    RecurrentDynamics,
    full_precision_switch,
    full_precision_threshold,
    solve_fixed_point,
)

from test_divergence import TinyRecurrent, _batches
from test_recurrent_gradients import tiny_hgru
from test_train_net import _args, tiny_pathfinder, train_net  # noqa: F401 (fixture)

BF16 = amp.Precision("cpu", torch.bfloat16)


def _grads(dyn: RecurrentDynamics, x: torch.Tensor, weight: torch.Tensor, precision: amp.Precision) -> torch.Tensor:
    dyn.zero_grad()
    with precision.autocast():
        h, aux = dyn.train()(x)
        loss = (h * weight).mean() + aux["penalty_weight"] * aux["penalty"]
    loss.backward()
    return torch.cat([p.grad.flatten() for p in dyn.parameters() if p.grad is not None])


@pytest.mark.parametrize("grad", list(GRADS))
def test_every_method_keeps_its_gradient_under_bf16(grad):
    torch.manual_seed(0)
    cell = HGRUCell(channels=4, kernel_size=3, norm="gn", timesteps=6)
    dyn = RecurrentDynamics(cell, steps=6, grad=grad, lcp_lambda=0.3, phantom_steps=2, penalty_weight=1.0)
    x = torch.rand(2, 4, 8, 8) * 2
    weight = torch.randn(2, 4, 8, 8)
    full = _grads(dyn, x, weight, amp.Precision("cpu"))
    half = _grads(dyn, x.clone(), weight, BF16)
    cosine = float(torch.dot(full, half) / (full.norm() * half.norm()))
    assert cosine >= 0.99, f"{grad}: cosine {cosine:.4f}"


@pytest.mark.parametrize("solver", ["iterate", "anderson"])
def test_solver_stops_agree_with_fp32_on_a_contractive_cell(solver):
    cell = tiny_hgru("gn", scale=0.5).float()
    x = torch.rand(2, 2, 6, 6)
    dyn = RecurrentDynamics(cell, steps=3, grad="crbp", solver=solver, tol=1e-2, max_steps=60).eval()
    with torch.no_grad():
        _, full = dyn(x)
        with BF16.autocast():
            h, half = dyn(x)
    assert h.dtype == torch.float32, "the state stays float32 under autocast"
    assert half["solver_stop"] == full["solver_stop"] == "converged"
    assert abs(half["steps"] - full["steps"]) <= 1
    assert torch.equal(half["converged"], full["converged"])


@pytest.mark.parametrize("solver", ["iterate", "anderson", "heavyball"])
def test_a_tolerance_below_bf16_roundoff_is_reached_by_finishing_in_fp32(solver):
    """TOL 1e-3 is below bf16's roundoff: in bf16 alone this Anderson solve took 33 steps, in fp32 11."""
    torch.manual_seed(0)
    cell = HGRUCell(channels=8, kernel_size=7, norm="gn", timesteps=6)
    x = torch.rand(2, 8, 32, 32) * 2
    dyn = RecurrentDynamics(cell, steps=3, grad="crbp", solver=solver, tol=1e-3, max_steps=60).eval()
    f = lambda h: dyn.evaluate(x, h)  # noqa: E731
    with torch.no_grad():
        full = solve_fixed_point(f, cell.init_state(x), solver, 1e-3, 60)
        with BF16.autocast():
            half = solve_fixed_point(f, cell.init_state(x), solver, 1e-3, 60)
    assert half.stop_reason == full.stop_reason == "converged"
    assert float(half.relative_residual.max()) < 1e-3
    assert 0 < half.full_precision_evals < half.evals <= full.evals + 3, (half.evals, half.full_precision_evals, full.evals)
    assert float((half.image - full.image).norm() / full.image.norm()) < 5e-3


def test_solves_finish_in_fp32_only_when_autocast_cannot_resolve_their_tolerance():
    assert full_precision_threshold(1e-3, "cpu") is None
    with BF16.autocast():
        assert full_precision_threshold(1e-3, "cpu") == 2**-7
        assert full_precision_threshold(1e-2, "cpu") is None
        assert full_precision_threshold(0.0, "cpu") is None
    assert full_precision_switch(1e-4, torch.float16) == 2**-10 and full_precision_switch(1e-3, torch.float16) is None
    assert full_precision_switch(1e-3, torch.float32) is None


@pytest.mark.parametrize("make_cell", [lambda: HGRUCell(4, 3, norm="gn"), lambda: ConvLSTMCell(4, 3)])
def test_cells_run_their_gates_in_the_autocast_dtype(make_cell):
    """No fp32 x bf16 products inside a cell (slow mixed-dtype kernels); the result stays close to fp32."""
    torch.manual_seed(0)
    cell = make_cell()
    x, state = torch.rand(2, 4, 8, 8), cell.init_state(torch.rand(2, 4, 8, 8)) + 0.3
    seen: set[torch.dtype] = set()

    def record(module, inputs, output):
        seen.update(t.dtype for t in (*inputs, output) if isinstance(t, torch.Tensor))

    handles = [m.register_forward_hook(record) for m in cell.modules() if isinstance(m, (nn.Conv2d, nn.GroupNorm))]
    with BF16.autocast():
        half = cell(x, state)
    for h in handles:
        h.remove()
    full = cell(x, state)
    assert half.dtype == torch.bfloat16 and seen == {torch.bfloat16}
    assert float((half.float() - full).norm() / full.norm()) < 2e-2


def test_implicit_backward_passes_an_overflowed_gradient_on_without_counting_a_cap_hit():
    dyn = TinyRecurrent(grad="rbp").dynamics
    x = torch.rand(2, 4, 6, 6)
    h, _ = dyn.train()(x)
    (h.sum() * float("inf")).backward()
    assert dyn.backward_stats.stop_reason == "input_not_finite" and dyn.backward_stats.cap_hits == 0


def test_fp16_scaler_skips_an_overflowing_step_without_calling_it_divergence():
    torch.manual_seed(0)
    model = TinyRecurrent(grad="crbp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    precision = amp.Precision("cpu", torch.float16)
    scaler = precision.grad_scaler(init_scale=2.0**60)  # the first step overflows in fp16
    trainer = NonFiniteGuardTrainer(model, _batches({}), optimizer, nonfinite="raise", precision=precision,
                                    grad_scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    with EventStorage(0) as storage:
        trainer.iter = 0
        trainer.run_step()
        assert trainer.overflow_steps == 1 and trainer.skipped_batches == 0
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "a skipped step changes nothing"
        assert scaler.get_scale() < 2.0**60
        while scaler.get_scale() > 2.0**20:
            trainer.iter += 1
            trainer.run_step()
        trainer.iter += 1
        trainer.run_step()
        assert "amp/loss_scale" in storage.histories()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "later steps train"
    state = trainer.state_dict()
    assert state["overflow_steps"] == trainer.overflow_steps and "grad_scaler" in state


def _amp_cfg(**solver_amp):
    cfg = get_cfg()
    add_rfpn_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.SOLVER.AMP.ENABLED = True
    for key, value in solver_amp.items():
        cfg.SOLVER.AMP[key] = value
    return cfg


def test_precision_follows_the_device_and_the_key(monkeypatch):
    assert amp.resolve_precision(_amp_cfg()).dtype == torch.bfloat16
    assert amp.resolve_precision(_amp_cfg(PRECISION="fp16")).dtype == torch.float16
    off = _amp_cfg()
    off.SOLVER.AMP.ENABLED = False
    assert not amp.resolve_precision(off).enabled
    with pytest.raises(ValueError, match="SOLVER.AMP.PRECISION='fp32' is not valid; allowed values: ''"):
        amp.resolve_precision(_amp_cfg(PRECISION="fp32"))
    monkeypatch.setattr(amp, "amp_supported", lambda device, dtype: dtype == torch.bfloat16)
    with pytest.raises(ValueError, match=r"SOLVER.AMP.PRECISION='fp16' is not supported on MODEL.DEVICE='cpu'.*bf16") as e:
        amp.resolve_precision(_amp_cfg(PRECISION="fp16"))
    assert "\n" not in str(e.value)


def test_bf16_training_writes_an_fp32_checkpoint_that_evaluates_in_either_mode(tiny_pathfinder, tmp_path):  # noqa: F811
    results = train_net.main(_args(tmp_path, "SOLVER.AMP.ENABLED", "True"))
    assert 0.0 <= results["pathfinder"]["IoU"] <= 1.0
    checkpoint = tmp_path / "model_final.pth"
    weights = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    assert all(t.dtype in (torch.float32, torch.float64, torch.int64) for t in weights.values())
    full = train_net.main(_args(tmp_path, "MODEL.WEIGHTS", str(checkpoint), eval_only=True))
    half = train_net.main(_args(tmp_path, "MODEL.WEIGHTS", str(checkpoint), "SOLVER.AMP.ENABLED", "True", eval_only=True))
    assert half["pathfinder"]["IoU"] == pytest.approx(results["pathfinder"]["IoU"])
    assert abs(full["pathfinder"]["IoU"] - half["pathfinder"]["IoU"]) < 0.05


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch, caplog):
    monkeypatch.setattr(amp, "native_bf16_cpu", lambda: False)
    with caplog.at_level("WARNING", logger="rfpn.engine.amp"):
        assert amp.resolve_precision(_amp_cfg()).dtype == torch.bfloat16
    assert any("no native bf16" in r.message and "SOLVER.AMP.ENABLED False" in r.message for r in caplog.records)
    monkeypatch.setattr(amp, "native_bf16_cpu", lambda: True)
    caplog.clear()
    with caplog.at_level("WARNING", logger="rfpn.engine.amp"):
        amp.resolve_precision(_amp_cfg())
    assert not caplog.records


def test_a_tolerance_below_bf16_resolution_is_reported_for_residual_stopped_solves(monkeypatch, caplog):
    monkeypatch.setattr(amp, "native_bf16_cpu", lambda: True)
    for solver, tol, reported in (("anderson", 1e-3, True), ("anderson", 1e-2, False), ("fixed", 1e-3, False)):
        cfg = _amp_cfg()
        cfg.MODEL.RECURRENT.SOLVER, cfg.MODEL.RECURRENT.TOL = solver, tol
        caplog.clear()
        with caplog.at_level("INFO", logger="rfpn.engine.amp"):
            amp.resolve_precision(cfg)
        assert any("MODEL.RECURRENT.TOL" in r.message for r in caplog.records) == reported, (solver, tol)
