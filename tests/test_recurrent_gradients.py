"""Gradients of the recurrent core: BPTT vs finite differences, RBP vs the exact implicit gradient."""
import pytest
import torch
from torch.func import functional_call

from rfpn.recurrent import HGRUCell, RecurrentDynamics, neumann_solve


def tiny_hgru(norm: str = "none", scale: float = 1.0, seed: int = 0) -> HGRUCell:
    """A 2-channel float64 hGRU with its recurrent kernels scaled by ``scale`` (shared with test_solvers)."""
    torch.manual_seed(seed)
    cell = HGRUCell(channels=2, kernel_size=3, norm=norm, timesteps=6).double()
    with torch.no_grad():
        for conv in (cell.w_inh, cell.w_exc, cell.u1, cell.u2):
            conv.weight.mul_(scale)
    return cell


@pytest.mark.parametrize("norm", ["none", "gn", "bn"])
def test_bptt_matches_finite_differences(norm):
    dyn = RecurrentDynamics(tiny_hgru(norm), steps=3, grad="bptt").train()
    x = torch.rand(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    names = ["w_inh.weight", "alpha", "u2.bias"]
    params = {n: p.detach().clone().requires_grad_() for n, p in dyn.named_parameters()}

    def loss(x, *chosen):
        values = dict(params, **{f"cell.{n}": v for n, v in zip(names, chosen)})
        h, _ = functional_call(dyn, values, (x,))
        return (h * torch.linspace(-1, 1, h.numel(), dtype=h.dtype).view_as(h)).sum()

    chosen = [params[f"cell.{n}"] for n in names]
    assert torch.autograd.gradcheck(loss, (x, *chosen), eps=1e-6, atol=1e-6, rtol=1e-4)


def _exact_implicit_grads(cell, x, h_star, weight):
    """(I - J)^-T g pushed through one step, with J the dense Jacobian at the fixed point."""
    n = h_star.numel()
    jac = torch.autograd.functional.jacobian(lambda h: cell(x, h.view_as(h_star)).flatten(), h_star.flatten())
    g = weight.flatten()
    u = torch.linalg.solve((torch.eye(n, dtype=jac.dtype) - jac).T, g)
    x_leaf = x.detach().requires_grad_()
    out = cell(x_leaf, h_star)
    grads = torch.autograd.grad(out, [x_leaf, *cell.parameters()], u.view_as(out))
    return grads, jac


def _method_grads(cell, x, weight, grad, steps):
    dyn = RecurrentDynamics(cell, steps=steps, grad=grad, neumann_steps=400, neumann_tol=1e-14).train()
    x_leaf = x.detach().requires_grad_()
    h, aux = dyn(x_leaf)
    (h * weight).sum().backward()
    grads = [x_leaf.grad] + [p.grad.clone() for p in cell.parameters()]
    cell.zero_grad()
    return grads, aux


def _rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_rbp_matches_bptt_and_exact_implicit_gradient():
    cell = tiny_hgru("none", scale=0.3)
    torch.manual_seed(1)
    x = torch.rand(1, 2, 4, 4, dtype=torch.float64)
    weight = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        h, aux = RecurrentDynamics(cell, steps=300, grad="rbp").eval()(x)
    assert aux["residual"] < 1e-12, "the tiny cell must be contractive and converged for this test"
    exact, jac = _exact_implicit_grads(cell, x, h, weight)
    assert torch.linalg.matrix_norm(jac, ord=2) < 1.0
    rbp, rbp_aux = _method_grads(cell, x, weight, "rbp", steps=300)
    bptt, _ = _method_grads(cell, x, weight, "bptt", steps=300)
    assert rbp_aux["neumann_stats"].stop_reason == "converged"
    for r, b, e in zip(rbp, bptt, exact):
        assert _rel_err(r, e) < 1e-3
        assert _rel_err(r, b) < 1e-3


def test_neumann_series_solves_linear_system_and_stops_on_growth():
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    a = 0.5 * a / torch.linalg.matrix_norm(a, ord=2)
    g = torch.randn(6, dtype=torch.float64)
    u, terms, reason = neumann_solve(lambda v: a.T @ v, g, max_terms=200, tol=1e-15)
    assert reason == "converged" and terms < 200
    assert torch.allclose(u, torch.linalg.solve(torch.eye(6, dtype=a.dtype) - a.T, g), atol=1e-12)
    u, terms, reason = neumann_solve(lambda v: 2.0 * v, g, max_terms=10)
    assert reason == "not_shrinking" and terms == 0 and torch.equal(u, g)
    u, terms, reason = neumann_solve(lambda v: 0.999 * v, g, max_terms=1000, norm_cap=5.0)
    assert reason == "norm_cap" and u.norm() <= 5.0 * g.norm()


@pytest.mark.parametrize("grad", ["bptt", "cbptt", "rbp", "crbp"])
def test_every_method_trains_parameters_and_drive(grad):
    torch.manual_seed(0)
    cell = HGRUCell(channels=4, kernel_size=3, norm="gn")
    dyn = RecurrentDynamics(cell, steps=4, grad=grad, lcp_lambda=0.0).train()
    x = torch.rand(2, 4, 6, 6, requires_grad=True)
    h, aux = dyn(x)
    loss = h.mean() + aux["penalty"]
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in cell.parameters())
    if grad in ("cbptt", "crbp"):
        assert aux["penalty"] > 0
    else:
        assert aux["penalty"] == 0
