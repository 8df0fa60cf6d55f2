"""The numbers behind the dynamics figures, checked on tiny models, and that every figure is written."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rfpn.analysis import (
    GeneralizationMatrix,
    GradientAgreement,
    StepIoU,
    compare_fill_order,
    coverage,
    fit_pca,
    flood_fill_steps,
    ks_test,
    run_steps,
    select_steps,
    split_densities,
    stack_states,
    state_distance,
    voronoi_tessellation,
)
from rfpn.analysis import figures
from rfpn.recurrent import HGRUCell, RecurrentDynamics
from rfpn.recurrent.diagnostics import fixed_point_diagnostics, jacobian_spectral_norm
from test_train_net import CPU_BASE, tiny_pathfinder  # noqa: F401 (fixture)
from toy_cells import GainCell

torch.set_num_threads(1)


def test_distance_is_zero_at_an_exact_fixed_point():
    x = torch.rand(5, 2, 4, 4)
    dyn = RecurrentDynamics(GainCell(2, a=0.0), steps=3).eval()
    _, states = run_steps(dyn, x, 40)
    assert len(states) == 40
    d = state_distance(states, 3, 40)
    assert d.shape == (5,)
    assert torch.equal(d, torch.zeros(5))


def test_distance_matches_the_closed_form_of_a_contraction():
    # h_t = 2 x (1 - 0.5^t), so |h_T - h_N| = 2 |x| (0.5^N - 0.5^T).
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64)
    dyn = RecurrentDynamics(GainCell(2, a=0.5), steps=4).eval()
    _, states = run_steps(dyn, x, 12)
    expected = 2 * x.flatten(1).norm(dim=1) * (0.5**4 - 0.5**12)
    torch.testing.assert_close(state_distance(states, 4, 12).double(), expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="outside the recorded steps"):
        state_distance(states, 4, 13)


def test_ks_statistic_is_zero_on_identical_samples_and_separates_shifted_ones():
    rng = np.random.default_rng(0)
    a = rng.normal(size=200)
    same = ks_test(a, a.copy())
    assert same.statistic == 0.0 and same.pvalue == 1.0
    shifted = ks_test(a, a + 3.0)
    assert shifted.statistic > 0.8 and shifted.pvalue < 1e-3


@pytest.mark.parametrize("dims", [3, 50])  # covariance path (points > dims) and Gram path (dims > points)
def test_pca_recovers_known_principal_axes(dims):
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(dims, dims, generator=gen, dtype=torch.float64))
    # A full factorial design of zero-mean coordinates along the first three axes of ``basis``:
    # the sample covariance is exactly diagonal there, with variances ordered 1st > 2nd > 3rd.
    grid = torch.cartesian_prod(
        torch.linspace(-5, 5, 5, dtype=torch.float64),
        torch.tensor([-2.0, -1.0, 1.0, 2.0], dtype=torch.float64),
        torch.tensor([-0.1, 0.1], dtype=torch.float64),
    )
    points = grid @ basis[:, :3].T + 3.0
    pca = fit_pca(points.float().view(8, 5, dims), k=2)
    cos = (pca.components.double() @ basis[:, :2]).abs().diagonal()
    assert torch.all(cos > 0.9999), cos
    assert pca.explained_ratio[0] > pca.explained_ratio[1] > 0.05
    proj = pca.project(points.float())
    assert proj.shape == (40, 2)
    torch.testing.assert_close(proj.mean(0), torch.zeros(2), atol=1e-3, rtol=0)


def test_spectral_norm_estimate_matches_the_dense_jacobian():
    torch.manual_seed(0)
    cell = HGRUCell(2, 3, norm="none", timesteps=8).double()
    x = torch.rand(1, 2, 4, 4, dtype=torch.float64)
    h = torch.rand(1, 2, 4, 4, dtype=torch.float64)
    dense = torch.autograd.functional.jacobian(lambda s: cell(x, s), h).reshape(32, 32)
    exact = float(torch.linalg.matrix_norm(dense, 2))
    est = jacobian_spectral_norm(lambda s: cell(x, s), h, iters=300, tol=1e-9, generator=torch.Generator().manual_seed(1))
    assert est.value <= exact + 1e-9  # a Rayleigh quotient never overshoots
    assert abs(est.value - exact) / exact < 2e-3, (est.value, exact)


def test_fixed_point_diagnostics_on_a_known_contraction():
    dyn = RecurrentDynamics(GainCell(2, a=0.5), steps=30, grad="crbp", lcp_lambda=0.4)
    diag = fixed_point_diagnostics(dyn, torch.rand(2, 2, 3, 3), power_iters=5)
    # J = 0.5 I: spectral norm 0.5, column sums 0.5, LCP (0.5 - 0.4)^2.
    assert diag["spectral_norm"] == pytest.approx(0.5, abs=1e-5)
    assert diag["max_column_sum"] == pytest.approx(0.5, abs=1e-6)
    assert diag["lcp"] == pytest.approx(0.01, abs=1e-6)
    assert diag["relative_residual"] < 1e-7 and diag["steps"] == 30


def test_flood_fill_of_a_hand_made_tessellation_has_known_coverage():
    # A 4x8 object made of four 4x2 vertical cells; one background column on each side.
    labels = np.zeros((4, 10), dtype=np.int32)
    for k in range(4):
        labels[:, 1 + 2 * k : 3 + 2 * k] = k + 1
    flood = flood_fill_steps(labels, steps=6, start=(1, 1))
    np.testing.assert_allclose(coverage(flood, labels > 0), [0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    # From an inner cell the fill spreads both ways: {2}, {1,2,3}, all.
    np.testing.assert_allclose(coverage(flood_fill_steps(labels, 3, start=(0, 4)), labels > 0), [0.25, 0.75, 1.0])
    # A model filling left to right is in the same order as the first fill; right to left is reversed.
    same = compare_fill_order(flood, flood, labels > 0)
    assert same["spearman"] == pytest.approx(1.0)
    reverse = compare_fill_order(flood_fill_steps(labels, 6, start=(1, 8)), flood, labels > 0)
    assert reverse["spearman"] == pytest.approx(-1.0)


def test_voronoi_tessellation_covers_the_mask_and_fills_it():
    mask = np.zeros((20, 20), dtype=bool)
    mask[3:17, 5:15] = True
    cells = voronoi_tessellation(mask, num_cells=6, seed=0)
    assert set(np.unique(cells[mask])) == set(range(1, 7)) and not cells[~mask].any()
    cov = coverage(flood_fill_steps(cells, 10), mask)
    assert np.all(np.diff(cov) >= 0) and cov[0] < 1.0 and cov[-1] == 1.0


def test_step_iou_pools_over_images_per_step():
    labels = torch.tensor([[[1, 1, 0, 0]], [[0, 1, 1, 255]]])  # (B=2, 1, 4)
    probs = torch.zeros(2, 2, 1, 4)
    probs[0, 0, 0, 0] = 0.9  # step 1: 1 of 4 contour pixels, no false positive
    probs[1] = (labels == 1).float()  # step 2: perfect
    probs[1, 1, 0, 3] = 1.0  # predicted on an ignored pixel: not counted
    acc = StepIoU()
    acc.update(probs, labels)
    np.testing.assert_allclose(acc.ious(), [0.25, 1.0])
    assert select_steps(40, 6, 6)[-1] == 40 and 6 in select_steps(40, 6, 6)


def test_every_figure_file_is_written(tmp_path):
    torch.manual_seed(0)
    dyn = RecurrentDynamics(HGRUCell(2, 3, norm="none", timesteps=4), steps=4).eval()
    _, states = run_steps(dyn, torch.rand(4, 2, 6, 6), 10)
    stacked = stack_states(states)
    proj = fit_pca(stacked).project(stacked).numpy()
    dens = split_densities(proj, 4, grid=20)
    assert dens["early"].shape == (20, 20) and dens["late"].max() > 0
    probs = {"a": np.random.rand(10, 6, 6), "b": np.random.rand(10, 6, 6)}
    dist = {"a": np.random.rand(4), "b": np.random.rand(4) + 1}
    matrix = GeneralizationMatrix(test_lengths=[6, 9])
    matrix.add("crbp", 6, {6: 0.8, 9: 0.6})
    matrix.add("bptt", 6, {6: 0.9})
    assert "n/a" in matrix.to_markdown() and GeneralizationMatrix.from_dict(matrix.to_dict()).to_dict() == matrix.to_dict()
    labels = voronoi_tessellation(np.ones((6, 6), bool), 4)
    flood = flood_fill_steps(labels, 10)
    comp = compare_fill_order(probs["a"] > 0.5, flood, np.ones((6, 6), bool))
    paths = [
        figures.plot_readout_grid(str(tmp_path / "grid.png"), probs, [1, 4, 10], {"a": 4, "b": 4}, np.ones((6, 6)), np.eye(6)),
        figures.plot_state_space(str(tmp_path / "pc.png"), {"a": {"projected": proj, "densities": dens, "n": 4}}),
        figures.plot_distances(str(tmp_path / "dist.png"), dist, {("a", "b"): ks_test(dist["a"], dist["b"])}),
        figures.plot_iou_vs_step(str(tmp_path / "iou.png"), {"a": np.linspace(0, 1, 10)}, {"a": 4}),
        figures.plot_generalization(str(tmp_path / "gen.png"), matrix),
        figures.plot_flood_fill(str(tmp_path / "flood.png"), flood, probs["a"], [1, 5, 10], comp),
        figures.plot_strip(str(tmp_path / "strip.png"), [np.ones((6, 8, 3)), np.zeros((6, 8))], ["t=1", "t=2"]),
        figures.plot_penalty_weight_curves(
            str(tmp_path / "xi.png"),
            {"auto": {"max_column_sum": [(1, 0.95), (2, 0.9)], "penalty_weight": [(1, 1.0), (2, 2.0)]}},
            lam=0.9,
        ),
        figures.plot_gradient_agreement(
            str(tmp_path / "cos.png"), [GradientAgreement("rbp", 1.0, 0.0, 5), GradientAgreement("jfb", 0.8, 0.5, 5)]
        ),
    ]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", p


def test_diagnostics_hook_writes_stability_scalars_every_period():
    from detectron2.config import get_cfg
    from detectron2.engine import SimpleTrainer

    from rfpn.config import add_rfpn_config
    from rfpn.engine.diagnostics_hook import build_diagnostics_hook

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.core = RecurrentDynamics(HGRUCell(2, 3, norm="gn", timesteps=4), steps=4, grad="crbp")

        def forward(self, x):
            h, aux = self.core(x)
            return {"loss": h.mean(), "loss_lcp": aux["penalty"]}

    cfg = get_cfg()
    add_rfpn_config(cfg)
    assert build_diagnostics_hook(cfg) is None  # off by default
    cfg.DIAGNOSTICS.PERIOD = 2
    cfg.DIAGNOSTICS.POWER_ITERS = 3
    cfg.DIAGNOSTICS.MAX_SAMPLES = 1
    torch.manual_seed(0)
    model = Tiny()
    data = iter([torch.rand(2, 2, 5, 5) for _ in range(4)])
    trainer = SimpleTrainer(model, data, torch.optim.SGD(model.parameters(), lr=0.01))
    trainer.register_hooks([build_diagnostics_hook(cfg)])
    trainer.train(0, 4)
    hist = trainer.storage.history("diagnostics/core/spectral_norm")
    assert [it for _, it in hist.values()] == [1, 3]
    assert all(0 < v < 5 for v, _ in hist.values())
    for name in ("lcp", "max_column_sum", "relative_residual", "neumann_terms"):
        assert len(trainer.storage.history(f"diagnostics/core/{name}").values()) == 2
    cfg.DIAGNOSTICS.POWER_ITERS = 0
    with pytest.raises(ValueError, match="DIAGNOSTICS.POWER_ITERS"):
        build_diagnostics_hook(cfg)


def test_test_readout_figure_shows_the_models_own_steps(tiny_pathfinder, tmp_path):  # noqa: F811
    """The grid's last column is what the model itself predicts after TEST_STEPS fixed steps."""
    from detectron2.data import DatasetCatalog

    from rfpn.analysis import step_probabilities
    from rfpn.analysis.readout_figure import draw_test_readouts
    from rfpn.data.pathfinder_mapper import PathfinderDatasetMapper
    from rfpn.utils.cli import load_config
    from rfpn.utils.models import build_eval_model

    cfg = load_config(CPU_BASE, ["MODEL.RECURRENT.CHANNELS", "4", "MODEL.RECURRENT.KERNEL_SIZE", "3",
                                 "MODEL.RECURRENT.STEPS", "3", "MODEL.RECURRENT.TEST_STEPS", "5",
                                 "MODEL.RECURRENT.TEST_SOLVER", "fixed", "MODEL.RECURRENT.EPS", "0.0"])
    torch.manual_seed(0)
    model = build_eval_model(cfg)
    sample = PathfinderDatasetMapper(cfg, is_train=False)(DatasetCatalog.get(f"{tiny_pathfinder}_test")[0])
    probs, states = step_probabilities(model, sample["image"][None].float() / 255.0, 5)
    with torch.no_grad():
        own = model([sample])[0]["sem_seg"][1]
    assert probs.shape[0] == len(states) == 5
    torch.testing.assert_close(probs[-1, 0], own, atol=1e-5, rtol=1e-4)
    path = draw_test_readouts(model, cfg, f"{tiny_pathfinder}_test", str(tmp_path / "readouts.png"), count=3)
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
