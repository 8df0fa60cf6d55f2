"""Reversible recurrences: the memory-free chain gives BPTT's gradient of the coupled dynamics in flat memory."""
from __future__ import annotations

import pytest
import torch

from rfpn.recurrent import (
    AdditiveCouplingCell,
    ConvLSTMCell,
    HGRUCell,
    MomentumCoupling,
    RecurrentDynamics,
    StateMomentumCell,
    saved_tensor_bytes,
)
from rfpn.recurrent.reversible import reconstruction_error

from test_recurrent_gradients import tiny_hgru
from toy_cells import saved_bytes_per_steps

GAMMA = 0.8


def _grads(dyn: RecurrentDynamics, x: torch.Tensor, weight: torch.Tensor, params) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    h, aux = dyn.train()(x)
    ((h * weight).sum() + aux["penalty"]).backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads


@pytest.mark.parametrize("cell_kind", ["hgru-none", "hgru-gn", "hgru-bn", "convlstm"])
def test_reversible_gradient_equals_bptt_through_the_same_coupled_dynamics(cell_kind):
    torch.manual_seed(0)
    if cell_kind == "convlstm":
        cell = ConvLSTMCell(2, 3).double()
    else:
        cell = tiny_hgru(cell_kind.split("-")[1], scale=0.5)
    x = torch.rand(2, 2, 4, 4, dtype=torch.float64)
    weight = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    params = list(cell.parameters())
    reversible = _grads(RecurrentDynamics(cell, steps=12, grad="reversible", reversible_gamma=GAMMA), x, weight, params)
    coupled = StateMomentumCell(cell, mu=GAMMA, s=1 - GAMMA)
    bptt = _grads(RecurrentDynamics(coupled, steps=12, grad="bptt"), x, weight, params)
    for r, b in zip(reversible, bptt):
        assert torch.allclose(r, b, rtol=1e-8, atol=1e-11)


def test_reversible_memory_does_not_grow_with_steps_and_the_lcp_variant_trains():
    torch.manual_seed(0)
    from rfpn.recurrent import HGRUCell

    dyn = RecurrentDynamics(HGRUCell(4, 3, norm="gn"), steps=5, grad="reversible").train()
    x = torch.rand(2, 4, 6, 6)
    saved = saved_bytes_per_steps(dyn, x, (5, 80))
    assert saved[0] == saved[1] > 0
    bptt = RecurrentDynamics(StateMomentumCell(HGRUCell(4, 3, norm="gn"), GAMMA, 1 - GAMMA), steps=80, grad="bptt").train()
    with saved_tensor_bytes() as counter:
        h, _ = bptt(x)
        h.mean().backward()
    assert counter.peak_bytes == counter.forward_bytes > 10 * saved[1], "BPTT holds every step until backward"
    lcp = RecurrentDynamics(HGRUCell(4, 3, norm="gn"), steps=5, grad="creversible", lcp_lambda=0.0).train()
    h, aux = lcp(x)
    (h.mean() + aux["penalty"]).backward()
    assert aux["penalty"] > 0 and lcp.cell.cell.w_exc.weight.grad is not None


def _half_cells(kind: str, channels: int = 4) -> AdditiveCouplingCell:
    if kind == "convlstm":
        return AdditiveCouplingCell(lambda c: ConvLSTMCell(c, 3), channels)
    return AdditiveCouplingCell(lambda c: HGRUCell(c, 3, norm=kind.split("-")[1]), channels)


@pytest.mark.parametrize("cell_kind", ["hgru-gn", "hgru-bn", "convlstm"])
def test_additive_reversible_gradient_equals_bptt_through_the_same_coupled_dynamics(cell_kind):
    torch.manual_seed(0)
    cell = _half_cells(cell_kind).double()
    x = torch.rand(2, 4, 5, 5, dtype=torch.float64)
    weight = torch.randn(2, cell.channels, 5, 5, dtype=torch.float64)
    params = list(cell.parameters())
    bptt_model = _half_cells(cell_kind).double()
    bptt_model.load_state_dict(cell.state_dict())
    reversible = _grads(RecurrentDynamics(cell, steps=10, grad="reversible", coupling="additive"), x, weight, params)
    bptt = _grads(RecurrentDynamics(bptt_model, steps=10, grad="bptt"), x, weight, list(bptt_model.parameters()))
    for r, b in zip(reversible, bptt):
        assert torch.allclose(r, b, rtol=1e-8, atol=1e-11)
    if cell_kind == "hgru-bn":
        for name, buffer in cell.named_buffers():
            assert torch.equal(buffer, dict(bptt_model.named_buffers())[name]), f"{name} updated differently"


@pytest.mark.parametrize("coupling", ["momentum", "additive"])
def test_exact_mode_rebuilds_the_trajectory_bit_for_bit_after_300_steps(coupling, record_property):
    torch.manual_seed(0)
    if coupling == "momentum":
        step, x = MomentumCoupling(HGRUCell(2, 3, norm="gn"), GAMMA), torch.rand(2, 2, 6, 6)
        a0 = b0 = torch.zeros_like(x)
    else:
        step, x = _half_cells("hgru-gn"), torch.rand(2, 4, 6, 6)
        a0 = b0 = torch.zeros(2, 2, 6, 6)
    assert max(reconstruction_error(step, x, a0, b0, 300, exact=True)) == 0.0
    floats = reconstruction_error(step, x, a0, b0, 300)
    record_property(f"{coupling}_float32_reconstruction_error", {k: floats[k - 1] for k in (1, 10, 100, 300)})
    assert 0 < floats[-1] and floats[0] < 1e-5, "float mode drifts (recorded), from a small first error"


def test_exact_mode_gradient_matches_bptt_of_the_rounded_dynamics():
    torch.manual_seed(0)
    cell = tiny_hgru("gn", scale=0.5)
    x = torch.rand(2, 2, 4, 4, dtype=torch.float64)
    weight = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    params = list(cell.parameters())
    exact = RecurrentDynamics(cell, steps=12, grad="reversible", reversible_gamma=0.7, reversible_exact=True)
    rounded = MomentumCoupling(cell, 0.7, exact=True).mu
    assert rounded == 179 / 256 and exact.cell.mu == rounded, "inference iterates the rounded dynamics too"
    grads_exact = _grads(exact, x, weight, params)
    bptt = _grads(RecurrentDynamics(StateMomentumCell(cell, rounded, 1 - rounded), steps=12, grad="bptt"), x, weight,
                  params)
    for r, b in zip(grads_exact, bptt):
        assert torch.allclose(r, b, rtol=1e-6, atol=1e-8), "differs only by the 2^-32 grid of the trajectory"


def test_additive_memory_does_not_grow_with_steps():
    torch.manual_seed(0)
    dyn = RecurrentDynamics(_half_cells("hgru-gn"), steps=5, grad="reversible", coupling="additive").train()
    saved = saved_bytes_per_steps(dyn, torch.rand(2, 4, 6, 6), (5, 80))
    assert saved[0] == saved[1] > 0


def test_the_additive_coupling_needs_its_half_cells():
    with pytest.raises(ValueError, match="coupling='additive' inverts a cell made of two half-width cells; got a HGRUCell"):
        RecurrentDynamics(HGRUCell(4, 3), steps=3, grad="reversible", coupling="additive")
    with pytest.raises(ValueError, match="channels=3 must be even"):
        _half_cells("hgru-gn", channels=3)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"REVERSIBLE_GAMMA": 0.0}, r"MODEL.RECURRENT.REVERSIBLE_GAMMA=0.0 is not valid; allowed values: a number in \(0, 1\)"),
        ({"REVERSIBLE_GAMMA": 1.5}, r"MODEL.RECURRENT.REVERSIBLE_GAMMA=1.5 is not valid"),
        ({"COUPLING": "sum"}, "MODEL.RECURRENT.COUPLING='sum' is not valid; allowed values: momentum, additive"),
        ({"COUPLING": "additive", "CHANNELS": 3}, r"MODEL.RECURRENT.CHANNELS=3 is not valid; allowed values: an even"),
        ({"REVERSIBLE_EXACT": 1}, r"MODEL.RECURRENT.REVERSIBLE_EXACT=1 is not valid; allowed values: True or False"),
        ({"SOLVER": "anderson"}, "MODEL.RECURRENT.GRAD='reversible' runs exactly MODEL.RECURRENT.STEPS steps"),
    ],
)
def test_reversible_keys_are_validated(overrides, message):
    from detectron2.config import get_cfg

    from rfpn.config import add_rfpn_config
    from rfpn.modeling import build_recurrent_dynamics

    cfg = get_cfg()
    add_rfpn_config(cfg)
    cfg.MODEL.RECURRENT.update(CHANNELS=2, KERNEL_SIZE=3, GRAD="reversible")
    cfg.MODEL.RECURRENT.update(**overrides)
    with pytest.raises(ValueError, match=message):
        build_recurrent_dynamics(cfg)


def test_the_config_builds_the_additive_cell():
    from detectron2.config import get_cfg

    from rfpn.config import add_rfpn_config
    from rfpn.modeling import build_recurrent_dynamics

    cfg = get_cfg()
    add_rfpn_config(cfg)
    cfg.MODEL.RECURRENT.update(CHANNELS=4, KERNEL_SIZE=3, GRAD="reversible", COUPLING="additive", NORM="gn", STEPS=4)
    dyn = build_recurrent_dynamics(cfg)
    assert isinstance(dyn.cell, AdditiveCouplingCell) and dyn.cell.f.cell.channels == 2
    h, aux = dyn.train()(torch.rand(1, 4, 5, 5))
    h.sum().backward()
    assert h.shape == (1, 4, 5, 5) and aux["steps"] == 4


class RunningStatsCell(torch.nn.Module):
    """``softplus(BN(conv(h)) + x)`` with a BatchNorm that tracks running statistics."""

    def __init__(self, channels: int = 2):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(channels)
        self.channels = self.state_channels = channels

    def init_state(self, x):
        return torch.zeros_like(x)

    def readout(self, h):
        return h

    def forward(self, x, h):
        return torch.nn.functional.softplus(self.norm(self.conv(h)) + x)


def test_recomputation_does_not_update_running_statistics_twice():
    torch.manual_seed(0)
    x = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    weight = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    a = RunningStatsCell().double()
    b = RunningStatsCell().double()
    b.load_state_dict(a.state_dict())
    grads_rev = _grads(RecurrentDynamics(a, steps=6, grad="reversible", reversible_gamma=GAMMA), x, weight,
                       list(a.parameters()))
    grads_bptt = _grads(RecurrentDynamics(StateMomentumCell(b, GAMMA, 1 - GAMMA), steps=6, grad="bptt"), x, weight,
                        list(b.parameters()))
    for r, q in zip(grads_rev, grads_bptt):
        assert torch.allclose(r, q, rtol=1e-8, atol=1e-11)
    assert int(a.norm.num_batches_tracked) == int(b.norm.num_batches_tracked) == 6
    assert torch.allclose(a.norm.running_mean, b.norm.running_mean) and torch.allclose(a.norm.running_var, b.norm.running_var)


def test_inference_iterates_the_coupled_dynamics_that_training_inverted():
    torch.manual_seed(0)
    cell = tiny_hgru("gn", scale=0.5)
    x = torch.rand(2, 2, 4, 4, dtype=torch.float64)
    reversible = RecurrentDynamics(cell, steps=7, grad="reversible", reversible_gamma=GAMMA)
    coupled = RecurrentDynamics(StateMomentumCell(cell, GAMMA, 1 - GAMMA), steps=7, grad="bptt")
    trained, _ = reversible.train()(x)
    evaluated, _ = reversible.eval()(x)
    assert torch.allclose(trained, evaluated, rtol=0, atol=1e-12)
    assert torch.allclose(evaluated, coupled.eval()(x)[0], rtol=0, atol=1e-12)


def test_drift_report_measures_float_drift_and_gradient_agreement():
    from rfpn.analysis.reversible_drift import DriftSettings, drift_report

    report = drift_report(DriftSettings(channels=4, kernel=3, size=6), steps=12, cosine_steps=(12,), gammas=(0.9, 0.2))
    curves = report["reconstruction_error"]
    assert set(curves) == {"momentum gamma=0.9", "momentum gamma=0.2", "additive"}
    assert curves["momentum gamma=0.2"][-1] > 100 * curves["momentum gamma=0.9"][-1], "dividing by 0.2 drifts faster"
    cos = {(c["coupling"], c["gamma"], c["exact"]): c["cosine"] for c in report["gradient_cosine"]}
    assert cos[("momentum", 0.9, False)] > 0.9999 and cos[("additive", None, False)] > 0.9999
    assert cos[("momentum", 0.2, True)] > 0.9999, "exact mode keeps the gradient where float mode drifts"


def test_exact_momentum_keeps_one_byte_per_element_per_step_and_counts_it():
    torch.manual_seed(0)
    dyn = RecurrentDynamics(HGRUCell(4, 3, norm="gn"), steps=5, grad="reversible", reversible_exact=True).train()
    x = torch.rand(2, 4, 6, 6)
    held5, held25 = saved_bytes_per_steps(dyn, x, (5, 25))
    assert held25 - held5 == 20 * x.numel(), "the dropped bits: one uint8 per state element per step"
