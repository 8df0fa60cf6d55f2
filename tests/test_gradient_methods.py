"""The gradient-method registry: JFB and phantom gradients against their definitions, every method
against the exact implicit gradient of a linear map, the Jacobian regulariser, automatic contraction."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rfpn.recurrent import (
    GRADS,
    GradientMethod,
    HGRUCell,
    PenaltyOptions,
    RecordedStep,
    RecurrentDynamics,
    dual_ascent_step,
    jacobian_frobenius_penalty,
    presolve,
    register_gradient_method,
)
from rfpn.recurrent import methods as methods_module
from test_recurrent_gradients import tiny_hgru
from toy_cells import GainCell, saved_bytes_per_steps

torch.set_num_threads(1)


class LinearCell(nn.Module):
    """``h' = A h + B x`` on flat states ``(batch, n)``: fixed point ``(I - A)^-1 B x``."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.a, self.b = nn.Parameter(a.clone()), nn.Parameter(b.clone())
        self.channels = self.state_channels = a.shape[0]

    def init_state(self, x):
        return x.new_zeros(x.shape[0], self.a.shape[0])

    def readout(self, state):
        return state

    def forward(self, x, h):
        return h @ self.a.T + x @ self.b.T


def HGRU4() -> HGRUCell:
    return HGRUCell(channels=4, kernel_size=3, norm="gn")


def _linear_problem(n: int = 6, m: int = 4, rho: float = 0.6):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = rho * a / torch.linalg.matrix_norm(a, ord=2)
    b = torch.randn(n, m, generator=gen, dtype=torch.float64)
    x = torch.randn(1, m, generator=gen, dtype=torch.float64)
    g = torch.randn(1, n, generator=gen, dtype=torch.float64)
    return a, b, x, g


def _flat_grads(dyn: RecurrentDynamics, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_()
    h, _ = dyn.train()(x)
    (h * g).sum().backward()
    grads = torch.cat([dyn.cell.a.grad.flatten(), dyn.cell.b.grad.flatten(), x.grad.flatten()])
    dyn.cell.zero_grad()
    return grads


def _closed_form(a, b, x, g, u):
    """Gradients (A, B, x) when the adjoint at the fixed point h* is ``u``: ``u h*^T``, ``u x^T``, ``B^T u``."""
    n = a.shape[0]
    h_star = torch.linalg.solve(torch.eye(n, dtype=a.dtype) - a, b @ x[0])
    return torch.cat([torch.outer(u, h_star).flatten(), torch.outer(u, x[0]).flatten(), (b.T @ u).flatten()])


def _cos(p: torch.Tensor, q: torch.Tensor) -> float:
    return float(torch.dot(p, q) / (p.norm() * q.norm()))


def test_every_method_against_the_exact_implicit_gradient_of_a_linear_map(record_property):
    a, b, x, g = _linear_problem()
    n = a.shape[0]
    eye = torch.eye(n, dtype=a.dtype)
    exact = _closed_form(a, b, x, g, torch.linalg.solve(eye - a.T, g[0]))
    k, tau = 3, 0.5
    damped = (1 - tau) * eye + tau * a.T
    theory = {
        "jfb": _closed_form(a, b, x, g, g[0]),
        "phantom": _closed_form(a, b, x, g, tau * sum(torch.linalg.matrix_power(damped, j) for j in range(k)) @ g[0]),
    }
    settings = {
        "bptt": dict(),
        "rbp": dict(backward_solver="anderson", backward_tol=1e-13, backward_max_steps=200),
        "jfb": dict(),
        "phantom": dict(phantom_steps=k, phantom_tau=tau),
    }
    cosines = {}
    for grad, extra in settings.items():
        dyn = RecurrentDynamics(LinearCell(a, b), steps=200, grad=grad, **extra)
        got = _flat_grads(dyn, x, g)
        cosines[grad] = _cos(got, exact)
        if grad in theory:
            assert torch.allclose(got, theory[grad], rtol=1e-9, atol=1e-12), grad
            assert cosines[grad] == pytest.approx(_cos(theory[grad], exact), abs=1e-12)
        else:
            assert torch.allclose(got, exact, rtol=1e-6, atol=1e-10), grad
            assert cosines[grad] > 1 - 1e-6
    record_property("cosine_to_exact", cosines)
    assert cosines["jfb"] < 0.999 and cosines["phantom"] < 0.999, "the map must make the approximations visible"


def test_phantom_gradient_approaches_the_exact_one_with_more_steps():
    a, b, x, g = _linear_problem()
    exact = _closed_form(a, b, x, g, torch.linalg.solve(torch.eye(a.shape[0], dtype=a.dtype) - a.T, g[0]))
    cosines = [
        _cos(_flat_grads(RecurrentDynamics(LinearCell(a, b), steps=250, grad="phantom", phantom_steps=k,
                                           phantom_tau=0.8), x, g), exact)
        for k in (1, 4, 40)
    ]
    assert cosines[0] < cosines[1] < cosines[2] and cosines[2] > 1 - 1e-9


def _param_and_drive_grads(dyn, x, weight):
    x = x.detach().clone().requires_grad_()
    h, _ = dyn.train()(x)
    (h * weight).sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in dyn.cell.parameters()]
    dyn.cell.zero_grad()
    return grads


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_jfb_equals_one_step_from_the_detached_state(norm):
    cell = tiny_hgru(norm, scale=0.5)
    torch.manual_seed(1)
    x = torch.rand(2, 2, 4, 4, dtype=torch.float64)
    weight = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    got = _param_and_drive_grads(RecurrentDynamics(cell, steps=7, grad="jfb"), x, weight)
    with torch.no_grad():
        h = torch.zeros_like(x)
        for _ in range(6):
            h = cell(x, h)
    x_leaf = x.clone().requires_grad_()
    out = cell(x_leaf, h.detach())
    want = torch.autograd.grad((out * weight).sum(), [x_leaf, *cell.parameters()])
    for p, q in zip(got, want):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("k,tau", [(1, 1.0), (3, 0.5), (4, 0.9)])
def test_phantom_equals_autograd_through_damped_steps(k, tau):
    cell = tiny_hgru("gn", scale=0.5)
    torch.manual_seed(2)
    x = torch.rand(2, 2, 4, 4, dtype=torch.float64)
    weight = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    steps = 9
    dyn = RecurrentDynamics(cell, steps=steps, grad="phantom", phantom_steps=k, phantom_tau=tau)
    got = _param_and_drive_grads(dyn, x, weight)
    with torch.no_grad():
        h = torch.zeros_like(x)
        for _ in range(steps - k):
            h = cell(x, h)
    x_leaf = x.clone().requires_grad_()
    h = h.detach()
    for _ in range(k):
        h = tau * cell(x_leaf, h) + (1 - tau) * h
    want = torch.autograd.grad((h * weight).sum(), [x_leaf, *cell.parameters()])
    for p, q in zip(got, want):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-13)
    if (k, tau) == (1, 1.0):
        jfb = _param_and_drive_grads(RecurrentDynamics(cell, steps=steps, grad="jfb"), x, weight)
        assert all(torch.equal(p, q) for p, q in zip(got, jfb))


@pytest.mark.parametrize("grad", ["jfb", "cjfb", "phantom", "cphantom"])
def test_new_methods_keep_memory_flat_in_steps(grad):
    torch.manual_seed(0)
    dyn = RecurrentDynamics(HGRU4(), steps=4, grad=grad, phantom_steps=2, lcp_lambda=0.0).train()
    x = torch.rand(2, 4, 6, 6)
    saved = saved_bytes_per_steps(dyn, x, (4, 16), held=False)
    assert saved[0] == saved[1] > 0
    assert bool(dyn(x)[1]["penalty"] > 0) == grad.startswith("c")


def test_jacobian_regulariser_converges_to_the_dense_frobenius_norm():
    cell = tiny_hgru("none", scale=0.7)
    torch.manual_seed(4)
    x = torch.rand(1, 2, 3, 3, dtype=torch.float64)
    h = torch.rand(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    out = cell(x, h)
    dense = torch.autograd.functional.jacobian(lambda s: cell(x, s.view_as(h)).flatten(), h.detach().flatten())
    exact = float(dense.pow(2).sum())
    errors = []
    for probes in (4, 64, 4096):
        gen = torch.Generator().manual_seed(0)
        estimate = float(jacobian_frobenius_penalty(out, h, probes, gen, create_graph=False)) * h.numel()
        errors.append(abs(estimate - exact) / exact)
    assert errors[2] < 0.03 and errors[2] < errors[0]


def test_jacobian_penalty_trains_with_any_method_and_reports_its_loss():
    torch.manual_seed(0)
    for grad in ("bptt", "rbp", "jfb", "phantom"):
        dyn = RecurrentDynamics(HGRU4(), steps=3, grad=grad, penalty="jacobian", penalty_weight=0.5).train()
        h, aux = dyn(torch.rand(2, 4, 5, 5))
        assert dyn.penalty_kind == "jacobian" and aux["penalty"] > 0 and aux["penalty_weight"] == 0.5
        (h.mean() + aux["penalty"]).backward()
        assert dyn.cell.w_exc.weight.grad is not None


def _train_gain(penalty: PenaltyOptions, iters: int = 800) -> tuple[RecurrentDynamics, list[float], list[float]]:
    """Fit ``h_5 = 10 x``: the unconstrained optimum is a gain of about 1.45 (expansive)."""
    torch.manual_seed(0)
    dyn = RecurrentDynamics(GainCell(3, per_channel=True), steps=5, grad="cbptt", penalty_options=penalty).train()
    opt = torch.optim.Adam(dyn.parameters(), lr=0.02)
    gains, weights = [], []
    for _ in range(iters):
        x = torch.rand(8, 3)
        h, aux = dyn(x)
        loss = (h - 10 * x).pow(2).mean() + aux["penalty_weight"] * aux["penalty"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        gains.append(aux["max_column_sum"])
        weights.append(aux["penalty_weight"])
    return dyn, gains, weights


def test_automatic_weight_holds_the_contraction_constraint_where_a_small_fixed_weight_does_not():
    lam = 0.9
    _, fixed_gains, _ = _train_gain(PenaltyOptions(weight=1e-3, lcp_lambda=lam))
    dyn, auto_gains, weights = _train_gain(PenaltyOptions(weight=1e-3, lcp_lambda=lam, auto=True))
    tail = len(auto_gains) // 5
    assert max(auto_gains[-tail:]) <= lam + 0.02
    assert min(fixed_gains[-tail:]) > lam + 0.2
    assert weights[-1] > 1e-3 * 100, "the multiplier must have grown while the constraint was violated"
    restored = RecurrentDynamics(
        GainCell(3, per_channel=True), steps=5, grad="cbptt", penalty_options=PenaltyOptions(auto=True)
    )
    restored.load_state_dict(dyn.state_dict())
    assert "auto_penalty_weight" in dyn.state_dict()
    assert restored.penalty_weight == dyn.penalty_weight != 1.0


def test_dual_ascent_step_grows_shrinks_and_stays_bounded():
    assert dual_ascent_step(1.0, 1.0, 0.9, 0.1) == pytest.approx(math.exp(0.1))
    assert dual_ascent_step(1.0, 5.0, 0.9, 0.1) == pytest.approx(math.exp(0.1))
    assert dual_ascent_step(1.0, 0.85, 0.9, 0.1) == pytest.approx(math.exp(-0.05))
    assert dual_ascent_step(1.0, float("nan"), 0.9, 0.1) == 1.0
    w = 1.0
    for _ in range(1000):
        w = dual_ascent_step(w, 0.0, 0.9, 0.1)
    assert w == pytest.approx(1e-6)
    assert dual_ascent_step(0.0, 1.0, 0.9, 0.1) == pytest.approx(1e-6 * math.exp(0.1))


def test_the_weight_does_not_move_outside_training():
    penalty = PenaltyOptions(weight=2.0, auto=True)
    dyn = RecurrentDynamics(GainCell(3, per_channel=True), steps=5, grad="cbptt", penalty_options=penalty)
    dyn.eval()
    with torch.no_grad():
        dyn(torch.rand(2, 3))
    assert dyn.penalty_weight == 2.0


def test_a_new_method_is_one_class_and_one_registration():
    @register_gradient_method
    class HalfJacobianFree(GradientMethod):
        """A toy method: JFB with the recorded step's gradient halved."""

        name = "halfjfb"

        def train(self, run, x, state, n, tol):
            state, solve = presolve(run, x, state, n - 1, n, tol, recorded=1)
            h_in = state.detach().requires_grad_()
            f_out = run.step(x, h_in, solve.evals + 1, n)
            return RecordedStep(h_in, f_out, 0.5 * f_out + 0.5 * f_out.detach(), solve.finish(1))

    try:
        assert "halfjfb" in GRADS and "chalfjfb" in GRADS
        cell = tiny_hgru("none", scale=0.5)
        x = torch.rand(1, 2, 4, 4, dtype=torch.float64)
        weight = torch.randn(1, 2, 4, 4, dtype=torch.float64)
        half = _param_and_drive_grads(RecurrentDynamics(cell, steps=5, grad="halfjfb"), x, weight)
        full = _param_and_drive_grads(RecurrentDynamics(cell, steps=5, grad="jfb"), x, weight)
        assert all(torch.allclose(2 * p, q) for p, q in zip(half, full))
        _, aux = RecurrentDynamics(cell, steps=5, grad="chalfjfb").train()(x)
        assert aux["penalty"] >= 0 and not math.isnan(aux["max_column_sum"])
        from detectron2.config import get_cfg

        from rfpn.config import add_rfpn_config, recurrent_settings

        cfg = get_cfg()
        add_rfpn_config(cfg)
        cfg.MODEL.RECURRENT.GRAD = "halfjfb"
        assert recurrent_settings(cfg).grad == "halfjfb"
    finally:
        methods_module._REGISTRY.pop("halfjfb")
    assert "halfjfb" not in GRADS


def test_registry_refuses_a_clashing_name():
    class Clash(GradientMethod):
        name = "crbp"

    with pytest.raises(ValueError, match="clashes"):
        register_gradient_method(Clash)


def _cfg(**overrides):
    from detectron2.config import get_cfg

    from rfpn.config import add_rfpn_config

    cfg = get_cfg()
    add_rfpn_config(cfg)
    for key, value in overrides.items():
        cfg.MODEL.RECURRENT[key] = value
    return cfg


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"GRAD": "adjoint"}, "MODEL.RECURRENT.GRAD='adjoint' is not valid; allowed values: bptt, cbptt, rbp, crbp, jfb"),
        ({"PENALTY": "l2"}, "MODEL.RECURRENT.PENALTY='l2' is not valid; allowed values: .*none, lcp, jacobian"),
        ({"JACOBIAN_PROBES": 0}, "MODEL.RECURRENT.JACOBIAN_PROBES=0 is not valid; allowed values: an integer >= 1"),
        ({"PHANTOM_STEPS": 0}, "MODEL.RECURRENT.PHANTOM_STEPS=0 is not valid; allowed values: an integer >= 1"),
        ({"PHANTOM_TAU": 1.5}, r"MODEL.RECURRENT.PHANTOM_TAU=1.5 is not valid; allowed values: a number in \(0, 1\]"),
        ({"PHANTOM_TAU": 0.0}, r"MODEL.RECURRENT.PHANTOM_TAU=0.0 is not valid; allowed values: a number in \(0, 1\]"),
        ({"LCP_WEIGHT_RATE": 0.0}, "MODEL.RECURRENT.LCP_WEIGHT_RATE=0.0 is not valid; allowed values: a number > 0"),
        ({"LCP_WEIGHT": -1.0}, "MODEL.RECURRENT.LCP_WEIGHT=-1.0 is not valid; allowed values: a number >= 0"),
        ({"GRAD": "rbp", "LCP_WEIGHT_AUTO": True}, "MODEL.RECURRENT.LCP_WEIGHT_AUTO=True .* needs the LCP"),
        ({"GRAD": "crbp", "PENALTY": "jacobian"}, "MODEL.RECURRENT.PENALTY='jacobian' contradicts MODEL.RECURRENT.GRAD"),
        ({"GRAD": "phantom", "SOLVER": "anderson", "PENALTY": "none"}, None),
        ({"GRAD": "cbptt", "SOLVER": "anderson"}, "MODEL.RECURRENT.SOLVER='anderson' cannot train with"),
    ],
)
def test_new_keys_are_validated_with_their_name_and_allowed_values(overrides, message):
    from rfpn.modeling import build_recurrent_dynamics

    cfg = _cfg(CHANNELS=2, KERNEL_SIZE=3, **overrides)
    if message is None:
        assert build_recurrent_dynamics(cfg).grad == overrides["GRAD"]
        return
    with pytest.raises(ValueError, match=message):
        build_recurrent_dynamics(cfg)


def test_config_reaches_the_option_groups():
    from rfpn.modeling import build_recurrent_dynamics

    dyn = build_recurrent_dynamics(
        _cfg(CHANNELS=2, KERNEL_SIZE=3, GRAD="phantom", PHANTOM_STEPS=3, PHANTOM_TAU=0.7, PENALTY="jacobian",
             JACOBIAN_PROBES=2, LCP_WEIGHT=0.25)
    )
    assert (dyn.phantom_steps, dyn.phantom_tau, dyn.penalty_kind) == (3, 0.7, "jacobian")
    assert (dyn.penalty_options.probes, dyn.penalty_weight) == (2, 0.25)
    auto = build_recurrent_dynamics(_cfg(CHANNELS=2, KERNEL_SIZE=3, GRAD="crbp", LCP_WEIGHT_AUTO=True, LCP_WEIGHT=3.0))
    assert auto.penalty_weight == 3.0 and "auto_penalty_weight" in auto.state_dict()


def test_flat_keywords_and_groups_are_not_mixed():
    with pytest.raises(TypeError, match="either penalty_options=PenaltyOptions"):
        RecurrentDynamics(GainCell(3, per_channel=True), steps=2, penalty_options=PenaltyOptions(), lcp_lambda=0.5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'neuman_steps'"):
        RecurrentDynamics(GainCell(3, per_channel=True), steps=2, neuman_steps=3)


def test_gradient_agreement_scores_exact_methods_near_one_and_jfb_below():
    from rfpn.analysis import gradient_agreement

    cell = tiny_hgru("gn", scale=0.5)
    dyn = RecurrentDynamics(cell, steps=60, grad="crbp", neumann_steps=200, neumann_tol=1e-12)
    torch.manual_seed(5)
    x = torch.rand(2, 2, 4, 4, dtype=torch.float64)
    weight = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    rows, reference = gradient_agreement(dyn, x, lambda h: (h * weight).sum(), ("bptt", "rbp", "jfb", "phantom"))
    cosine = {r.method: r.cosine for r in rows}
    assert reference["backward_stop"] == "converged" and reference["forward_stop"] == "converged"
    assert cosine["rbp"] > 1 - 1e-6 and cosine["bptt"] > 1 - 1e-6
    assert cosine["jfb"] < cosine["phantom"] < 1 - 1e-6
    assert dyn.penalty_kind == "lcp" and dyn.grad == "crbp", "the probed model is left as it was"
