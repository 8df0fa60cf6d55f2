"""Momentum (MomentumRNN, seed 003): the seed's momentum LSTM, state momentum on any cell, the heavy-ball solver."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rfpn.recurrent import (
    ConvMomentumLSTMCell,
    MomentumLSTMCell,
    RecurrentDynamics,
    StateMomentumCell,
    heavy_ball_parameters,
    momentum_inverse,
    solve_fixed_point,
)

from test_recurrent_gradients import _exact_implicit_grads, _rel_err, tiny_hgru


def test_momentum_lstm_equals_the_seed_equations_and_reduces_to_a_scaled_lstm():
    torch.manual_seed(0)
    cell = MomentumLSTMCell(3, 4, mu=0.6, s=0.6).double()
    xs = torch.randn(5, 2, 3, dtype=torch.float64)
    state = cell.init_state(xs[0])
    h, c, v = (t.clone() for t in state)
    wx, wh, b = cell.w_x.weight, cell.w_h.weight, cell.w_h.bias
    for x in xs:
        state = cell(x, state)
        v = 0.6 * v + 0.6 * x @ wx.T
        gates = v + h @ wh.T + b
        i, f, g, o = gates[:, :4], gates[:, 4:8], gates[:, 8:12], gates[:, 12:]
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        assert torch.allclose(state[0], h, atol=1e-12) and torch.allclose(state[2], v, atol=1e-12)

    plain = MomentumLSTMCell(3, 4, mu=0.0, s=0.5).double()
    lstm = nn.LSTMCell(3, 4).double()
    with torch.no_grad():
        lstm.weight_ih.copy_(plain.w_x.weight)
        lstm.weight_hh.copy_(plain.w_h.weight)
        lstm.bias_ih.zero_()
        lstm.bias_hh.copy_(plain.w_h.bias)
    state, hc = plain.init_state(xs[0]), None
    for x in xs:
        state = plain(x, state)
        hc = lstm(0.5 * x, hc)
        assert torch.allclose(state[0], hc[0], atol=1e-12) and torch.allclose(state[1], hc[1], atol=1e-12)


def test_conv_momentum_lstm_keeps_spatial_shapes():
    cell = ConvMomentumLSTMCell(2, 3, kernel_size=3)
    x = torch.rand(2, 2, 5, 5)
    h, c, v = cell(x, cell.init_state(x))
    assert h.shape == c.shape == (2, 3, 5, 5) and v.shape == (2, 12, 5, 5)


def test_state_momentum_with_no_momentum_and_a_full_step_is_the_plain_cell_bit_for_bit():
    cell = tiny_hgru("gn", scale=0.5)
    x = torch.rand(2, 2, 4, 4, dtype=torch.float64)
    plain = RecurrentDynamics(cell, steps=7).eval()
    wrapped = RecurrentDynamics(StateMomentumCell(cell, mu=0.0, s=1.0), steps=7).eval()
    with torch.no_grad():
        assert torch.equal(plain(x)[0], wrapped(x)[0])


@pytest.mark.parametrize("mu,s", [(0.5, 0.5), (0.3, 1.0), (0.0, 0.6)])
def test_state_momentum_has_the_plain_fixed_point_and_exact_rbp(mu, s):
    cell = tiny_hgru("none", scale=0.3)
    torch.manual_seed(1)
    x = torch.rand(1, 2, 4, 4, dtype=torch.float64)
    opts = dict(solver="iterate", tol=1e-13, max_steps=2000)
    with torch.no_grad():
        h_plain, _ = RecurrentDynamics(cell, steps=1, **opts).eval()(x)
        wrapper = StateMomentumCell(cell, mu, s)
        h_mom, aux = RecurrentDynamics(wrapper, steps=1, **opts).eval()(x)
    assert aux["solver_stop"] == "converged"
    assert torch.allclose(h_mom, h_plain, atol=1e-8)

    weight = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    dyn = RecurrentDynamics(wrapper, steps=1, grad="rbp", backward_solver="anderson", backward_tol=1e-12,
                            backward_max_steps=400, **opts).train()
    x_leaf = x.clone().requires_grad_()
    h, _ = dyn(x_leaf)
    (h * weight).sum().backward()
    got = [x_leaf.grad] + [p.grad for p in cell.parameters()]
    with torch.no_grad():
        state = dyn.evaluate(x, torch.cat([h_mom, torch.zeros_like(h_mom)], 1))
    readout_weight = torch.cat([weight, torch.zeros_like(weight)], 1)
    exact, _ = _exact_implicit_grads(wrapper, x, state, readout_weight)
    for g, e in zip(got, exact):
        assert _rel_err(g, e) < 1e-6


def test_momentum_inverse_recovers_the_previous_state():
    cell = tiny_hgru("none", scale=0.5)
    x = torch.rand(1, 2, 4, 4, dtype=torch.float64)
    wrapper = StateMomentumCell(cell, mu=0.8, s=0.2)
    states = [wrapper.init_state(x) + 0.1]
    with torch.no_grad():
        for _ in range(5):
            states.append(wrapper(x, states[-1]))
        h, v = wrapper.split(states[-1])
        for previous in reversed(states[:-1]):
            h, v = momentum_inverse(h, v, lambda s: cell(x, s), 0.8, 0.2)
            assert torch.allclose(torch.cat([h, v], 1), previous, atol=1e-9)
    with pytest.raises(ValueError, match="needs mu > 0"):
        momentum_inverse(h, v, lambda s: s, 0.0, 1.0)


def _linear(rho: float, n: int = 30):
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.linspace(-rho, rho, n, dtype=torch.float64)
    a = q @ torch.diag(eig) @ q.T
    b = torch.randn(2, n, generator=gen, dtype=torch.float64)
    return (lambda h: h @ a.T + b), torch.zeros(2, n, dtype=torch.float64), torch.linalg.solve(torch.eye(n, dtype=a.dtype) - a, b.T).T


def test_heavy_ball_reaches_a_linear_fixed_point_in_fewer_evaluations_and_reports_a_missing_one():
    f, x0, exact = _linear(0.95)
    plain = solve_fixed_point(f, x0, "iterate", 1e-8, 2000)
    heavy = solve_fixed_point(f, x0, "heavyball", 1e-8, 2000)
    assert plain.stop_reason == heavy.stop_reason == "converged"
    assert heavy.evals < plain.evals, (heavy.evals, plain.evals)
    assert torch.allclose(heavy.image, exact, atol=1e-6)
    given = solve_fixed_point(f, x0, "heavyball", 1e-8, 2000, heavy_ball=heavy_ball_parameters(0.95))
    assert given.stop_reason == "converged" and given.evals * 4 <= plain.evals, (given.evals, plain.evals)
    drifting = solve_fixed_point(lambda h: h + 1.0, x0, "heavyball", 1e-6, 50)
    assert drifting.stop_reason == "max_steps" and drifting.evals == 50 and not drifting.converged.any()


def test_heavy_ball_parameters_are_plain_iteration_without_contraction():
    assert heavy_ball_parameters(0.0) == (0.0, 1.0)
    mu, s = heavy_ball_parameters(0.9)
    assert 0.3 < mu < 0.5 and 1.0 < s < 1.5


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"MOMENTUM": 1.0}, r"MODEL.RECURRENT.MOMENTUM=1.0 is not valid; allowed values: a number in \[0, 1\)"),
        ({"MOMENTUM_STEP": 0.0}, r"MODEL.RECURRENT.MOMENTUM_STEP=0.0 is not valid; allowed values: a number in \(0, 1\]"),
        ({"SOLVER": "heavyball", "HEAVY_BALL_MU": 1.5, "HEAVY_BALL_STEP": 1.0}, "MODEL.RECURRENT.HEAVY_BALL_MU=1.5"),
        ({"SOLVER": "heavyball", "HEAVY_BALL_MU": 0.5}, "HEAVY_BALL_MU and MODEL.RECURRENT.HEAVY_BALL_STEP are set together"),
        ({"SOLVER": "heavyball", "GRAD": "bptt"}, "SOLVER='heavyball' cannot train with MODEL.RECURRENT.GRAD='bptt'"),
    ],
)
def test_momentum_keys_are_validated(overrides, message):
    from detectron2.config import get_cfg

    from rfpn.config import add_rfpn_config
    from rfpn.modeling import build_recurrent_dynamics

    cfg = get_cfg()
    add_rfpn_config(cfg)
    cfg.MODEL.RECURRENT.update(CHANNELS=2, KERNEL_SIZE=3, **overrides)
    with pytest.raises(ValueError, match=message):
        build_recurrent_dynamics(cfg)


def test_config_wraps_the_cell_with_state_momentum():
    from detectron2.config import get_cfg

    from rfpn.config import add_rfpn_config
    from rfpn.modeling import build_recurrent_dynamics

    cfg = get_cfg()
    add_rfpn_config(cfg)
    cfg.MODEL.RECURRENT.update(CHANNELS=2, KERNEL_SIZE=3, MOMENTUM=0.6, MOMENTUM_STEP=0.5, SOLVER="heavyball")
    dyn = build_recurrent_dynamics(cfg)
    assert isinstance(dyn.cell, StateMomentumCell) and (dyn.cell.mu, dyn.cell.s) == (0.6, 0.5)
    h, aux = dyn.train()(torch.rand(2, 2, 5, 5))
    assert h.shape == (2, 2, 5, 5) and aux["solver"] == "heavyball"


def test_sequence_tasks_and_variants_are_what_they_claim():
    import numpy as np

    from rfpn.sequences import VARIANTS, SequenceModel, make_task, train_run

    adding = make_task("adding", length=20)
    x, y = adding.batch(np.random.default_rng(0), 4)
    assert x.shape == (4, 20, 2) and torch.allclose(y[:, 0], (x[..., 0] * x[..., 1]).sum(1))
    assert (x[..., 1].sum(1) == 2).all()
    digits, permuted = make_task("digits"), make_task("permuted_digits")
    assert digits.test[0].shape == (360, 64, 1) and torch.equal(digits.test[1], permuted.test[1])
    assert torch.equal(digits.test[0].sort(1).values, permuted.test[0].sort(1).values)
    counts = {v: sum(p.numel() for p in SequenceModel(1, 8, 10, v).parameters()) for v in VARIANTS}
    assert len(set(counts.values())) == 1, "every variant has the same parameters"
    result = train_run(digits, "momentum", seed=0, iters=40, hidden=16, eval_every=20)
    assert [it for it, _ in result.curve] == [20, 40] and 0.0 <= result.final_metric <= 1.0
    with pytest.raises(ValueError, match="task='mnist' is not valid"):
        make_task("mnist")


def test_sequence_benchmark_keeps_finished_runs_and_summarises_over_seeds(tmp_path, monkeypatch):
    import json

    from rfpn.benchmarks import momentum_sequences as bench

    monkeypatch.setitem(bench.ITERS, "adding", 50)
    common = ["--tasks", "adding", "--variants", "lstm", "momentum", "--hidden", "4", "--length", "10",
              "--output-dir", str(tmp_path)]
    rows = bench.main(common + ["--seeds", "0", "1"])
    assert [(r["variant"], r["seeds"]) for r in rows] == [("lstm", 2), ("momentum", 2)]
    runs = json.loads((tmp_path / "momentum_sequences.json").read_text())["runs"]
    lstm = [r["final_metric"] for r in runs if r["variant"] == "lstm"]
    assert rows[0]["final_mean"] == pytest.approx(sum(lstm) / 2)
    assert (tmp_path / "momentum_sequences.png").stat().st_size > 0
    kept = tmp_path / "runs" / "adding_lstm_seed0" / "row.json"
    record = json.loads(kept.read_text())
    record["final_metric"] = 123.0  # a kept run is read back, not retrained
    kept.write_text(json.dumps(record))
    rows = bench.main(common + ["--seeds", "0"])
    assert rows[0]["final_mean"] == 123.0
    other_length = [a if a != "10" else "12" for a in common]
    rows = bench.main(other_length + ["--seeds", "0"])
    assert rows[0]["final_mean"] != 123.0, "a run kept from another sequence length was reused"
    assert json.loads(kept.read_text())["settings"] == {"iters": 50, "hidden": 4, "length": 12}
