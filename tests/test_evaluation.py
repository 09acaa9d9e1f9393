"""Baselines and the gradient floor (dstein/evaluation.py) against independent figures.

The baselines are checked against REFERENCE.md's table of null predictors (measured with
another script on the same test sets); the gradient floor against its closed-form value for
radial gradients, sqrt(1 - k/d), and against the families that can reach it.
"""

from __future__ import annotations

import pytest
import torch

from dstein.config import load_config
from dstein.evaluation import baselines, evaluate, floor_sums, not_beaten
from dstein.models import MLP, RadialMLP
from dstein.pdes import build_pde

# REFERENCE.md, "Null predictors": PDE.test_set(1000, seed=0, truth_samples=20000)
REFERENCE = {  # d: (constant, t only, terminal value, its gradient error)
    10: (0.168, 0.114, 0.283, 0.82),
    100: (0.069, 0.0173, 0.155, 0.84),
}


@pytest.mark.parametrize("d", sorted(REFERENCE))
def test_hjb_baselines_match_the_reference_table(d):
    hjb = build_pde("hjb", d)
    got = baselines(hjb, hjb.test_set(1000, seed=0, truth_samples=20000))
    constant, t_only, terminal, terminal_grad = REFERENCE[d]
    assert got["constant"]["l2_rel"] == pytest.approx(constant, abs=6e-4)
    assert got["t_only"]["l2_rel"] == pytest.approx(t_only, abs=6e-4 if t_only > 0.1 else 6e-5)
    assert got["condition_value"]["l2_rel"] == pytest.approx(terminal, abs=6e-4)
    assert got["condition_value"]["grad_l2_rel"] == pytest.approx(terminal_grad, abs=6e-3)
    assert got["constant"]["grad_l2_rel"] == got["t_only"]["grad_l2_rel"] == 1.0


def test_heat_and_poisson_baselines():
    heat = build_pde("heat", 10)
    got = baselines(heat, heat.test_set(1000, seed=0, truth_samples=2))
    assert got["t_only"]["l2_rel"] == pytest.approx(0.0113, abs=6e-5)  # REFERENCE.md
    assert got["condition_value"]["grad_l2_rel"] == pytest.approx(0.0, abs=1e-12)  # x/d is the exact gradient
    # u = |x|^2 / (2d) + t f: heat's solution is f = 1, a constant under its hard constraint
    assert got["constrained_constant"]["l2_rel"] == pytest.approx(0.0, abs=1e-12)
    sg = build_pde("sine_gordon", 50)
    test = sg.test_set(400, seed=0, truth_samples=2)
    B = 1 - (test.X * test.X).sum(1)
    f = float((B * test.u).sum() / (B * B).sum())  # least squares: no other constant does better
    got = baselines(sg, test)["constrained_constant"]
    for c in (f, 0.99 * f, 1.01 * f):
        assert got["l2_rel"] <= float((c * B - test.u).norm() / test.u.norm()) + 1e-15
    assert got["l2_rel"] == pytest.approx(float((f * B - test.u).norm() / test.u.norm()), rel=1e-12)
    poisson = build_pde("poisson", 2)
    assert set(baselines(poisson, poisson.test_set(200, seed=0, truth_samples=2))) == {"constant", "radial"}


def test_best_radial_predictor():
    """``radial``: the best function of (|x|^2, t). On hjb, whose solution is one, it is exact
    up to the Monte Carlo truth's noise; on hjb_aniso its gradient error is that of the best
    c(x) x at each point (beside the issue's std(a) / mean(a) = 0.29) and no better; without
    a time column it fits a function of |x|^2 alone."""
    from dstein.evaluation import radial_fit

    hjb = build_pde("hjb", 100)
    got = baselines(hjb, hjb.test_set(1000, seed=0, truth_samples=20000))
    assert got["radial"]["l2_rel"] < got["t_only"]["l2_rel"] / 100 and got["radial"]["grad_l2_rel"] < 0.01
    aniso = build_pde("hjb_aniso", 100)
    test = aniso.test_set(1000, seed=0, truth_samples=0)
    got = baselines(aniso, test)["radial"]
    x = test.X[:, :100]
    c = (test.grad * x).sum(1) / (x * x).sum(1)  # the best multiple of x at each point
    best = float((test.grad - c.unsqueeze(1) * x).norm() / test.grad.norm())
    assert 0.2 < best <= got["grad_l2_rel"] <= best + 0.005
    X = torch.randn(400, 5, dtype=torch.float64)
    r2 = (X * X).sum(1)
    u, grad = torch.exp(-r2 / 8), -X * torch.exp(-r2 / 8).unsqueeze(1) / 4
    fit, fit_grad = radial_fit(X, u, grad, 5)
    assert float((fit - u).norm() / u.norm()) < 1e-4 and float((fit_grad - grad).norm() / grad.norm()) < 1e-3


def test_warning_names_the_baseline_not_beaten():
    ref = {"constant": {"l2_rel": 0.07}, "t_only": {"l2_rel": 0.017}}
    assert not_beaten({"l2_rel": 0.01}, ref) is None
    line = not_beaten({"l2_rel": 0.03}, ref)
    assert line.startswith("warning: ") and "0.017" in line and "function of t alone" in line
    assert "a constant" in not_beaten({"l2_rel": 0.1}, {"constant": {"l2_rel": 0.07}})
    # an error that is all a level drifting in t (hjb_10k with the smoothed constraint)
    line = not_beaten({"l2_rel": 0.03, "l2_rel_beyond_t": 0.001}, ref)
    assert "all of it save 0.001 is a function of t" in line and "not learned" not in line
    assert "not learned" in not_beaten({"l2_rel": 0.03, "l2_rel_beyond_t": 0.01}, ref)


class HeatWithError(torch.nn.Module):
    """heat's paper solution |x|^2 / (2d) + t plus an error: a function of t, and of x."""

    def __init__(self, d: int, of_x: float):
        super().__init__()
        self.d, self.of_x = d, of_x
        self.w = torch.nn.Parameter(torch.ones(1))  # DeepSpeed-free: predict needs no parameters

    def forward(self, X):
        x, t = X[:, :-1], X[:, -1]
        u = (x * x).sum(1) / (2 * self.d) + t
        return (u + 0.05 * torch.sin(3 * t) + self.of_x * x[:, 0]).unsqueeze(-1)


def test_the_error_beyond_a_function_of_t():
    """l2_rel_beyond_t: the solution error less its best polynomial in t. An error that is a
    function of t alone leaves nothing; one in x leaves about its own size."""
    d = 5
    heat = build_pde("heat", d)
    test = heat.test_set(600, seed=0, truth_samples=2)
    cfg = load_config("configs/quickstart.yaml", ["estimator.method=autograd", f"pde.dim={d}"])
    norm = float(test.u.norm())
    for of_x in (0.0, 0.02):
        got = evaluate(HeatWithError(d, of_x).double(), test, cfg, torch.device("cpu"), torch.float64)
        assert got["l2_rel"] > 0.02
        x_part = float((of_x * test.X[:, 0]).norm()) / norm
        assert got["l2_rel_beyond_t"] == pytest.approx(x_part, rel=0.05, abs=1e-7)


def _floor(model, pde, test, transform=None) -> float:
    X = test.X.float()
    sums = floor_sums(model, X, torch.zeros(X.shape[0]), test.grad, transform)
    return float(sums[0] / sums[1]) ** 0.5


def test_gradient_floor_of_a_narrow_first_layer_is_sqrt_of_one_minus_k_over_d():
    hjb = build_pde("hjb", 250)
    test = hjb.test_set(400, seed=0, truth_samples=200)
    torch.manual_seed(0)
    assert _floor(MLP(251, 128, 2), hjb, test) == pytest.approx((1 - 128 / 250) ** 0.5, abs=0.02)
    assert _floor(MLP(251, 300, 2), hjb, test) < 1e-6  # the row space is all of R^d
    # the radial family reaches the radial truth whatever its width
    assert _floor(RadialMLP(251, 250, 16, 2), hjb, test) < 1e-6
    # under the hard constraint the network's part is grad u - grad g: radial too, and as
    # large as the terminal-value predictor's gradient error
    terminal = baselines(hjb, test)["condition_value"]["grad_l2_rel"]
    assert _floor(MLP(251, 128, 2), hjb, test, hjb.output_transform) == pytest.approx(
        terminal * (1 - 128 / 250) ** 0.5, abs=0.02
    )
    assert _floor(RadialMLP(251, 250, 16, 2), hjb, test, hjb.output_transform) < 1e-6


def test_evaluate_reports_the_floor_and_does_not_depend_on_the_blocks(root):
    config = load_config(root / "configs/quickstart.yaml", ["eval.samples=8", "estimator.method=stein-antithetic"])
    hjb = build_pde("hjb", 10)
    test = hjb.test_set(150, seed=1, truth_samples=500)
    torch.manual_seed(1)
    model = MLP(11, 8, 2)
    out = evaluate(model, test, config, torch.device("cpu"), torch.float32)
    assert set(out) == {"l1_rel", "l2_rel", "grad_l2_rel", "gradient_floor", "l2_rel_beyond_t"}
    assert out["gradient_floor"] == pytest.approx(_floor(model, hjb, test), rel=1e-6)


def test_the_smoothed_value_of_a_linear_network_is_exact(root):
    """The evaluation averages antithetic pairs, whose mean holds no part of g linear in the
    noise: for a linear g the smoothed model is g itself, to rounding, with any number of
    samples. Single perturbations would leave sigma_x |w| / sqrt(n) of noise (here 0.3)."""
    from dstein.evaluation import predict

    config = load_config(root / "configs/quickstart.yaml", ["eval.samples=7", "estimator.sigma_x=0.1"])
    torch.manual_seed(0)
    model = torch.nn.Linear(11, 1).double()
    with torch.no_grad():
        model.weight.mul_(30.0)
    X = torch.randn(70, 11, dtype=torch.float64)
    u, grad = predict(model, X, config)
    assert torch.allclose(u, model(X).reshape(-1), rtol=0, atol=1e-12)
    assert torch.allclose(grad, model.weight[:, :10].expand(70, 10), rtol=0, atol=1e-12)


def test_the_value_alone_is_the_value_of_the_full_prediction(root):
    """``gradient=False`` (the plot's slice, the reference values) draws the same noise per
    block and keeps no graph: the same values, bit for bit, with and without the constraint."""
    from dstein.build import output_transform
    from dstein.evaluation import predict

    config = load_config(root / "configs/quickstart.yaml", ["eval.samples=6"])
    pde = build_pde("hjb", 10, {"mu": 1.0, "T": 1.0})
    torch.manual_seed(0)
    model = MLP(11, 8, 2).double()
    X = torch.randn(150, 11, dtype=torch.float64)  # three blocks, the last one short
    for transform in (None, output_transform(config, pde)):
        u, grad = predict(model, X, config, first_block=3, transform=transform)
        alone, none = predict(model, X, config, first_block=3, transform=transform, gradient=False)
        assert none is None and grad is not None and not alone.requires_grad
        assert torch.equal(alone, u)


def test_a_block_too_large_for_the_noise_budget_goes_in_parts_with_the_same_noise(root, monkeypatch):
    """At d = 10^6 a block of 64 points with 32 pairs would be 8 GB of noise: ``predict`` draws
    it in parts of fewer points from the block's generator. On the CPU, draws of a multiple of
    16 numbers one after another are the numbers of one draw, so the parts give the values and
    gradients of the whole block bit for bit, and no part exceeds the budget."""
    import dstein.evaluation as evaluation

    config = load_config(root / "configs/quickstart.yaml", ["eval.samples=8"])  # 4 pairs of 11 numbers
    torch.manual_seed(0)
    model = MLP(11, 8, 2).double()
    X = torch.randn(128, 11, dtype=torch.float64)
    whole = evaluation.predict(model, X, config)
    sizes = []

    def recorded(model, X, spec, gen):
        sizes.append(X.shape[0] * spec.terms * X.shape[1])
        return smoothed(model, X, spec, gen)

    smoothed = evaluation._smoothed_value
    monkeypatch.setattr(evaluation, "EVAL_NOISE_ELEMENTS", 8 * 4 * 11)
    monkeypatch.setattr(evaluation, "_smoothed_value", recorded)
    parts = evaluation.predict(model, X, config)
    assert len(sizes) == 16 and max(sizes) <= 8 * 4 * 11
    assert torch.equal(parts[0], whole[0]) and torch.equal(parts[1], whole[1])
