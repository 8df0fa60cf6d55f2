"""Behaviour of the recurrent core: LCP, memory, inference, errors, independence from Detectron2."""
import subprocess
import sys

import pytest
import torch

from rfpn.recurrent import ConvLSTMCell, HGRUCell, RecurrentDynamics, column_sums, lcp_penalty
from rfpn.recurrent.memory import saved_tensor_bytes
from toy_cells import GainCell


@pytest.mark.parametrize("a, expected", [(0.5, 0.0), (0.89, 0.0), (0.95, 0.05**2), (1.3, 0.4**2)])
def test_lcp_matches_hand_computed_values(a, expected):
    cell = GainCell(a=a)
    h = torch.rand(2, 2, 3, 3, requires_grad=True)
    out = cell(torch.rand_like(h), h)
    assert torch.allclose(column_sums(out, h), torch.full_like(h, a))
    assert lcp_penalty(out, h, lam=0.9).item() == pytest.approx(expected, abs=1e-7)


def test_lcp_gradient_step_lowers_penalty():
    torch.manual_seed(0)
    cell = HGRUCell(channels=4, kernel_size=3, norm="gn")
    x = torch.rand(2, 4, 8, 8) * 3
    h = torch.rand(2, 4, 8, 8, requires_grad=True)
    opt = torch.optim.SGD(cell.parameters(), lr=0.5)
    before = lcp_penalty(cell(x, h), h, lam=0.3)
    assert before > 0
    before.backward()
    opt.step()
    after = lcp_penalty(cell(x, h), h, lam=0.3)
    assert after < before


def _saved_bytes(grad: str, steps: int, return_states: bool = False) -> int:
    torch.manual_seed(0)
    dyn = RecurrentDynamics(HGRUCell(4, 3, norm="gn"), steps=steps, grad=grad).train()
    x = torch.rand(2, 4, 12, 12, requires_grad=True)
    with saved_tensor_bytes() as counter:
        h, aux = dyn(x, return_states=return_states)
        (h.mean() + aux["penalty"]).backward()
    return counter.forward_bytes


@pytest.mark.parametrize("grad", ["rbp", "crbp"])
def test_rbp_memory_is_flat_in_steps(grad):
    short, long = _saved_bytes(grad, 5), _saved_bytes(grad, 80)
    assert short > 0 and short == long
    assert _saved_bytes(grad, 80, return_states=True) == long


def test_bptt_memory_grows_linearly_with_steps():
    b5, b10, b20 = (_saved_bytes("bptt", n) for n in (5, 10, 20))
    per_step = (b10 - b5) / 5
    assert per_step > 0
    assert b20 - b10 == pytest.approx(10 * per_step, rel=1e-6)
    assert _saved_bytes("crbp", 80) < _saved_bytes("bptt", 6)


def test_inference_runs_more_steps_and_stops_early_per_sample():
    torch.manual_seed(0)
    dyn = RecurrentDynamics(HGRUCell(4, 3, norm="none"), steps=4, grad="crbp", test_steps=60).eval()
    x = torch.rand(3, 4, 8, 8)
    x[1] = 0.0
    h, aux = dyn(x, return_states=True)
    assert aux["steps"] == 60 and len(aux["states"]) == 60
    h_eps, aux_eps = dyn(x, eps=1e-3)
    per_sample = aux_eps["steps_per_sample"]
    assert (per_sample < 60).all() and (aux_eps["residual_per_sample"] < 1e-3).all()
    assert aux_eps["steps"] == int(per_sample.max())
    assert torch.allclose(h_eps, h, atol=0.05)


def test_convlstm_runs_with_every_method():
    for grad in ("bptt", "cbptt", "rbp", "crbp"):
        torch.manual_seed(0)
        dyn = RecurrentDynamics(ConvLSTMCell(3, 3), steps=3, grad=grad).train()
        x = torch.rand(2, 3, 5, 5, requires_grad=True)
        h, aux = dyn(x)
        assert h.shape == x.shape
        (h.sum() + aux["penalty"]).backward()
        assert torch.isfinite(x.grad).all()


def test_bad_inputs_raise_clear_errors():
    cell = HGRUCell(4, 3)
    dyn = RecurrentDynamics(cell, steps=3, grad="rbp")
    with pytest.raises(ValueError, match="drive of shape"):
        dyn(torch.rand(1, 5, 6, 6))
    with pytest.raises(ValueError, match="Initial state shape"):
        dyn(torch.rand(1, 4, 6, 6), h0=torch.zeros(1, 4, 5, 5))
    with pytest.raises(ValueError, match="state shape"):
        cell(torch.rand(1, 4, 6, 6), torch.zeros(1, 4, 6, 5))
    with pytest.raises(ValueError, match="bptt, cbptt, rbp, crbp"):
        RecurrentDynamics(cell, steps=3, grad="adjoint")
    with pytest.raises(ValueError, match="steps"):
        RecurrentDynamics(cell, steps=0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        RecurrentDynamics(cell, steps=3, lcp_lambda=1.0)


def test_non_finite_state_names_the_step():
    cell = GainCell(a=1.0)
    x = torch.full((1, 2, 2, 2), 1e38)
    for grad in ("bptt", "rbp"):
        with pytest.raises(FloatingPointError, match="step 4 of 6"):
            RecurrentDynamics(cell, steps=6, grad=grad).train()(x)
    with pytest.raises(FloatingPointError, match="step 4 of 6"):
        RecurrentDynamics(cell, steps=6).eval()(x)


def test_recurrent_core_imports_without_detectron2():
    code = (
        "import sys; sys.modules['detectron2'] = None\n"
        "import torch\n"
        "from rfpn.recurrent import HGRUCell, RecurrentDynamics\n"
        "h, aux = RecurrentDynamics(HGRUCell(2, 3), steps=2)(torch.rand(1, 2, 4, 4))\n"
        "assert 'detectron2' not in {m.split('.')[0] for m in sys.modules if sys.modules[m] is not None}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
