"""Fixed-point solvers: forward (iterate, Anderson), solved implicit backward, safeguards."""
import math

import pytest
import torch
from torch import nn

from rfpn.recurrent import (
    AndersonMixer,
    HGRUCell,
    RecurrentDynamics,
    anderson_adjoint_solve,
    neumann_solve,
    relative_residual,
    solve_fixed_point,
)

from test_recurrent_gradients import tiny_hgru


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny float64 shapes run fastest on one thread (and do not contend on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _drive(batch: int = 3, size: int = 5, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return 2 * torch.rand(batch, 2, size, size, dtype=torch.float64)


class WrapCell(nn.Module):
    """F(x, h) = (h + x) mod 2 pi: Jacobian I, no fixed point, bounded. Nothing can converge."""

    channels = state_channels = 2

    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.tensor(0.0, dtype=torch.float64))

    def init_state(self, x):
        return torch.zeros_like(x)

    def readout(self, h):
        return h

    def forward(self, x, h):
        return torch.remainder(h + x + self.shift, 2 * math.pi)


class PoisonedCell(WrapCell):
    """Contractive map that returns NaN from its ``bad_call``-th evaluation on."""

    def __init__(self, bad_call: int):
        super().__init__()
        self.calls, self.bad_call = 0, bad_call

    def forward(self, x, h):
        self.calls += 1
        out = 0.5 * h + x + self.shift
        return out * math.nan if self.calls >= self.bad_call else out


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_anderson_reaches_fixed_point_of_long_iteration_with_fewer_evaluations(norm):
    cell, x = tiny_hgru(norm), _drive(size=4)
    with torch.no_grad():
        h_ref, ref_aux = RecurrentDynamics(cell, steps=1, solver="iterate", tol=1e-12, max_steps=3000).eval()(x)
    assert ref_aux["solver_stop"] == "converged"
    tol = 1e-8
    results = {}
    for solver in ("iterate", "anderson"):
        dyn = RecurrentDynamics(cell, steps=1, solver=solver, tol=tol, max_steps=3000).eval()
        h, aux = dyn(x)
        assert aux["solver"] == solver and aux["solver_stop"] == "converged"
        assert aux["converged"].all() and (aux["relative_residual_per_sample"] < tol).all()
        assert (aux["steps_per_sample"] <= aux["steps"]).all() and aux["steps_per_sample"].max() == aux["steps"]
        assert (relative_residual(h, h_ref) < 1e-6).all()
        results[solver] = aux["steps"]
    assert 2 * results["anderson"] < results["iterate"], results


def test_iterate_reports_per_sample_steps_and_residuals_of_the_trajectory():
    cell, x = tiny_hgru("gn"), _drive(size=4)
    x[1] *= 0.1
    tol, cap = 1e-6, 400
    with torch.no_grad():
        _, aux = RecurrentDynamics(cell, steps=1, solver="iterate", tol=tol, max_steps=cap).eval()(x)
        trajectory = [cell.init_state(x)]
        for _ in range(aux["steps"]):
            trajectory.append(cell(x, trajectory[-1]))
    rel = torch.stack([relative_residual(b, a) for a, b in zip(trajectory, trajectory[1:])])  # (T, B)
    above = rel >= tol
    last_above = torch.tensor([int(torch.nonzero(above[:, i]).max()) + 1 for i in range(x.shape[0])])
    assert torch.equal(aux["steps_per_sample"], last_above + 1)
    assert len(set(aux["steps_per_sample"].tolist())) > 1
    assert torch.allclose(aux["relative_residual_per_sample"], rel[-1])


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_rbp_with_anderson_both_ways_matches_exact_implicit_gradient(norm):
    cell, x = tiny_hgru(norm), _drive(batch=2, size=4)
    weight = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    dyn = RecurrentDynamics(
        cell,
        steps=1,
        grad="rbp",
        solver="anderson",
        tol=1e-12,
        max_steps=400,
        backward_solver="anderson",
        backward_tol=1e-12,
        backward_max_steps=400,
    ).train()
    x_leaf = x.clone().requires_grad_()
    h, aux = dyn(x_leaf)
    (h * weight).sum().backward()
    stats = aux["neumann_stats"]
    assert aux["converged"].all() and aux["solver_stop"] == "converged"
    assert stats.solver == "anderson" and stats.stop_reason == "converged" and stats.residual < 1e-12
    assert stats.cap_hits == 0 and 0 < stats.terms < 400

    h_star = h.detach()
    n = h_star.numel()
    jac = torch.autograd.functional.jacobian(lambda v: cell(x, v.view_as(h_star)).flatten(), h_star.flatten())
    u = torch.linalg.solve((torch.eye(n, dtype=jac.dtype) - jac).T, weight.flatten())
    x_ref = x.clone().requires_grad_()
    exact = torch.autograd.grad(cell(x_ref, h_star), [x_ref, *cell.parameters()], u.view_as(h_star))
    for got, want in zip([x_leaf.grad] + [p.grad for p in cell.parameters()], exact):
        assert float((got - want).norm() / want.norm().clamp_min(1e-30)) < 1e-6


def test_anderson_adjoint_solve_beats_neumann_on_a_linear_system():
    torch.manual_seed(0)
    a = torch.randn(40, 40, dtype=torch.float64)
    a = 0.95 * a / torch.linalg.matrix_norm(a, ord=2)
    g = torch.randn(40, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(40, dtype=a.dtype) - a.T, g)
    u, iters, reason, res = anderson_adjoint_solve(lambda v: a.T @ v, g, tol=1e-10, max_iter=500)
    assert reason == "converged" and res < 1e-10
    assert torch.allclose(u, exact, rtol=0, atol=1e-8 * exact.norm())
    _, terms, neumann_reason = neumann_solve(lambda v: a.T @ v, g, max_terms=2000, tol=1e-10, norm_cap=1e6)
    assert iters < terms, (iters, terms, neumann_reason)


def test_non_contractive_cell_stops_every_solver_at_its_cap():
    cell, cap = WrapCell(), 12
    x = torch.ones(2, 2, 3, 3, dtype=torch.float64)
    for solver in ("iterate", "anderson"):
        with torch.no_grad():
            h, aux = RecurrentDynamics(cell, steps=1, solver=solver, tol=1e-6, max_steps=cap).eval()(x)
        assert aux["steps"] == cap and aux["solver_stop"] == "max_steps" and not aux["converged"].any()
        assert torch.isfinite(h).all() and (aux["relative_residual_per_sample"] > 0.1).all()
    for backward, reason in (("neumann", "max_terms"), ("anderson", "max_steps")):
        for solver in ("iterate", "anderson"):
            dyn = RecurrentDynamics(
                cell, 1, "rbp", neumann_steps=7, solver=solver, max_steps=cap, backward_solver=backward,
                backward_max_steps=9,
            ).train()
            x_leaf = x.clone().requires_grad_()
            h, aux = dyn(x_leaf)
            h.sum().backward()
            stats = aux["neumann_stats"]
            assert aux["steps"] == cap and aux["solver_stop"] == "max_steps" and not aux["converged"].any()
            assert stats.stop_reason == reason and stats.terms in (7, 9)
            assert torch.isfinite(x_leaf.grad).all()
            if backward == "anderson":
                assert stats.cap_hits == 1 and stats.residual == pytest.approx(1.0)
    dyn = RecurrentDynamics(cell, 1, "bptt", solver="iterate", max_steps=cap).train()
    h, aux = dyn(x.clone().requires_grad_())
    assert aux["steps"] == cap and aux["solver_stop"] == "max_steps"


def test_backward_safeguards_report_non_finite_growth_and_norm_cap():
    g = torch.ones(5, dtype=torch.float64)
    u, iters, reason, res = anderson_adjoint_solve(lambda v: v * math.nan, g, tol=1e-8, max_iter=20)
    assert reason == "non_finite" and iters == 1 and torch.equal(u, g) and math.isinf(res)
    diag = torch.linspace(1.5, 3.0, 5, dtype=torch.float64)
    u, iters, reason, _ = anderson_adjoint_solve(lambda v: 40 * diag * v, g, tol=1e-8, max_iter=50, m=1)
    assert reason in ("diverged", "norm_cap") and torch.isfinite(u).all()
    u, iters, reason, _ = anderson_adjoint_solve(lambda v: v, g, tol=1e-8, max_iter=500, norm_cap=5.0)
    assert reason == "norm_cap" and iters < 10 and u.norm() <= 5.0 * g.norm()


def test_non_finite_state_raises_naming_the_step_for_every_solver():
    x = torch.ones(1, 2, 2, 2, dtype=torch.float64)
    for solver in ("iterate", "anderson"):
        with pytest.raises(FloatingPointError, match=f"step 3 of 20 \\({solver} solver\\)"):
            RecurrentDynamics(PoisonedCell(3), 1, solver=solver, max_steps=20).eval()(x)
        with pytest.raises(FloatingPointError, match=f"step 3 of 19 \\({solver} solver\\)"):
            RecurrentDynamics(PoisonedCell(3), 1, "crbp", solver=solver, max_steps=20).train()(x)


def test_bptt_iterate_stops_on_tolerance_and_equals_fixed_bptt_of_that_length():
    cell, x = tiny_hgru("gn", scale=0.5), _drive(batch=2, size=4)

    def grads(dyn):
        x_leaf = x.clone().requires_grad_()
        h, aux = dyn.train()(x_leaf)
        (h.sum() + aux["penalty"]).backward()
        flat = torch.cat([x_leaf.grad.flatten()] + [p.grad.flatten() for p in cell.parameters()])
        cell.zero_grad()
        return flat, aux

    solved, aux = grads(RecurrentDynamics(cell, steps=1, grad="cbptt", solver="iterate", tol=1e-4, max_steps=200))
    assert aux["solver_stop"] == "converged" and 1 < aux["steps"] < 200 and aux["converged"].all()
    fixed, _ = grads(RecurrentDynamics(cell, steps=aux["steps"], grad="cbptt"))
    assert torch.allclose(solved, fixed, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="anderson"):
        RecurrentDynamics(cell, steps=3, grad="bptt", solver="anderson").train()(x)


def test_test_solver_switches_inference_only():
    """Trained with Anderson, inferred with a fixed TEST_STEPS: equal to that many plain steps; training unchanged."""
    cell, x = tiny_hgru("gn", scale=0.5), _drive(batch=2, size=4)
    plain = RecurrentDynamics(cell, steps=7, grad="crbp").eval()
    mixed = RecurrentDynamics(
        cell, steps=3, grad="crbp", solver="anderson", tol=1e-6, max_steps=50, test_solver="fixed", test_steps=7
    )
    want, _ = plain(x)
    got, aux = mixed.eval()(x)
    assert torch.equal(got, want) and aux["steps"] == 7 and aux["solver"] == "fixed"
    _, aux = mixed.train()(x)
    assert aux["solver"] == "anderson" and aux["steps"] != 3
    with pytest.raises(ValueError, match="test_solver='newton'.*None \\(reuse the solver\\), fixed, iterate, anderson"):
        RecurrentDynamics(cell, steps=3, test_solver="newton")


def test_anderson_mixer_falls_back_to_plain_steps_on_degenerate_history():
    mixer = AndersonMixer(m=3)
    x = torch.zeros(2, 4)
    for _ in range(5):
        nxt = mixer.step(x, x + 1.0)  # constant residual: the history carries no information
        assert torch.equal(nxt, x + 1.0)
        x = nxt
    with pytest.raises(ValueError, match="m must be >= 1"):
        AndersonMixer(m=0)


def test_bad_solver_arguments_raise_clear_errors():
    cell = HGRUCell(2, 3)
    with pytest.raises(ValueError, match="fixed, iterate, anderson"):
        RecurrentDynamics(cell, steps=3, solver="newton")
    with pytest.raises(ValueError, match="neumann, anderson"):
        RecurrentDynamics(cell, steps=3, backward_solver="gmres")
    with pytest.raises(ValueError, match="tol"):
        RecurrentDynamics(cell, steps=3, solver="iterate", tol=0.0)
    with pytest.raises(ValueError, match="max_steps"):
        RecurrentDynamics(cell, steps=3, solver="iterate", max_steps=0)
    with pytest.raises(ValueError, match="fixed, iterate, anderson"):
        solve_fixed_point(lambda h: h, torch.zeros(1, 2), "broyden", 1e-3, 5)


def test_config_keys_are_validated_and_reach_the_dynamics():
    from detectron2.config import get_cfg

    from rfpn.config import add_rfpn_config
    from rfpn.modeling import build_recurrent_dynamics

    cfg = get_cfg()
    add_rfpn_config(cfg)
    cfg.merge_from_list(
        ["MODEL.RECURRENT.SOLVER", "anderson", "MODEL.RECURRENT.TOL", 1e-5, "MODEL.RECURRENT.MAX_STEPS", 60,
         "MODEL.RECURRENT.ANDERSON_M", 4, "MODEL.RECURRENT.BACKWARD_SOLVER", "anderson",
         "MODEL.RECURRENT.BACKWARD_TOL", 1e-6, "MODEL.RECURRENT.BACKWARD_MAX_STEPS", 30,
         "MODEL.RECURRENT.CHANNELS", 2, "MODEL.RECURRENT.KERNEL_SIZE", 3, "MODEL.RECURRENT.TEST_SOLVER", "fixed"]
    )
    dyn = build_recurrent_dynamics(cfg)
    got = (dyn.solver, dyn.tol, dyn.max_steps, dyn.anderson_m, dyn.backward_solver, dyn.backward_tol,
           dyn.backward_max_steps, dyn.test_solver)
    assert got == ("anderson", 1e-5, 60, 4, "anderson", 1e-6, 30, "fixed")
    cfg.MODEL.RECURRENT.TEST_SOLVER = ""
    assert build_recurrent_dynamics(cfg).inference_solver == "anderson"
    bad = {
        "SOLVER": ("broyden", "fixed, iterate, anderson"),
        "TEST_SOLVER": ("newton", "'' or None \\(reuse the solver\\), fixed, iterate, anderson"),
        "BACKWARD_SOLVER": ("cg", "neumann, anderson"),
        "TOL": (0.0, "a number > 0"),
        "MAX_STEPS": (0, "an integer >= 1"),
        "ANDERSON_M": (0, "an integer >= 1"),
        "BACKWARD_TOL": (-1.0, "a number > 0"),
        "BACKWARD_MAX_STEPS": (0, "an integer >= 1"),
    }
    for key, (value, allowed) in bad.items():
        broken = cfg.clone()
        broken.MODEL.RECURRENT[key] = value
        with pytest.raises(ValueError, match=f"MODEL.RECURRENT.{key}=.*{allowed}"):
            build_recurrent_dynamics(broken)
    broken = cfg.clone()
    broken.MODEL.RECURRENT.GRAD = "bptt"
    with pytest.raises(ValueError, match="SOLVER='anderson' cannot train with MODEL.RECURRENT.GRAD='bptt'"):
        build_recurrent_dynamics(broken)


def test_training_steps_are_the_fixed_steps_or_the_solvers_cap():
    from detectron2.config import get_cfg

    from rfpn.config import add_rfpn_config, training_steps

    cfg = get_cfg()
    add_rfpn_config(cfg)
    cfg.merge_from_list(["MODEL.RECURRENT.STEPS", 7, "MODEL.RECURRENT.MAX_STEPS", 60])
    assert training_steps(cfg) == 7
    for solver in ("iterate", "anderson"):
        cfg.MODEL.RECURRENT.SOLVER = solver
        assert training_steps(cfg) == 60, solver


def test_benchmark_solvers_writes_json_and_png(tmp_path):
    import json

    from rfpn.benchmarks import solvers as bench

    bench.main(
        ["--batch", "2", "--tols", "1e-2", "1e-4", "--heavy-ball-grid", "0", "0.3", "--heavy-ball-steps", "1",
         "--repeats", "1", "--threads", "1", "--output-dir", str(tmp_path),
         "MODEL.RECURRENT.CHANNELS", "4", "MODEL.RECURRENT.KERNEL_SIZE", "3"]
    )
    report = json.loads((tmp_path / "solvers.json").read_text())
    grid = {(r["mu"], r["tol"]): r["evals"] for r in report["heavy_ball_grid"]}
    plain = {r["tol"]: r["evals"] for r in report["results"] if r["solver"] == "iterate"}
    assert set(grid) == {(mu, t) for mu in (0.0, 0.3) for t in (1e-2, 1e-4)}
    assert grid[0.0, 1e-4] == plain[1e-4], "mu 0, s 1 is plain iteration"
    assert (tmp_path / "residual_vs_evals.png").stat().st_size > 0
    assert {(r["solver"], r["tol"]) for r in report["results"]} == {
        (s, t) for s in ("iterate", "anderson", "heavyball") for t in (1e-2, 1e-4)
    }
    assert set(report["speedup_over_iterate"]) == {"anderson", "heavyball"}
    for row in report["results"]:
        assert row["stop_reason"] == "converged" and row["max_relative_residual"] < row["tol"]
        trace = [p["max_relative_residual"] for p in report["traces"][row["solver"]]]
        assert row["evals"] == next(i for i, r in enumerate(trace, 1) if r < row["tol"])
