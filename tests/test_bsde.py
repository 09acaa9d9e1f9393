"""Deep BSDE's semilinear benchmarks (dstein/pdes/bsde.py): each residual against the equation
written out with autograd's Hessian, the forward processes' laws, the references at the start
state, and a run of a PDE known only at its start state (no test set) through training,
its last line, summary.json, the plots and launch/evaluate.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from distributed_utils import run_here

import dstein
from dstein.pdes import build_pde


class Smooth(torch.nn.Module):
    """A smooth test function of (x, t) of the size of each problem's solution."""

    def __init__(self, d: int, level: float, scale: float, shift: float):
        super().__init__()
        gen = torch.Generator().manual_seed(d)
        self.a = torch.randn(d, generator=gen, dtype=torch.float64) / math.sqrt(d)
        self.level, self.scale, self.shift = level, scale, shift

    def forward(self, X):
        x, t = (X[:, :-1] - self.shift) / self.scale, X[:, -1]
        return (self.level * (1 + 0.3 * torch.sin(x @ self.a + t) + 0.1 * (x * x).mean(1))).unsqueeze(-1)


def written_out(pde, u_fn, X):
    """u_t + L u + f with autograd's derivatives, written from the issue's equations."""
    X = X.clone().requires_grad_(True)
    u = u_fn(X).reshape(-1)
    (first,) = torch.autograd.grad(u.sum(), X, create_graph=True)
    d = pde.dim
    hess_diag = torch.stack([torch.autograd.grad(first[:, i].sum(), X, retain_graph=True)[0][:, i]
                             for i in range(d)], 1)  # fmt: skip
    x, grad, u_t = X[:, :-1], first[:, :-1], first[:, -1]
    if pde.name == "bsde_allen_cahn":
        return u_t + hess_diag.sum(1) + u - u**3
    s = (x * grad).sum(1)
    L = 0.5 * pde.sigma**2 * (x * x * hess_diag).sum(1) + pde.mu_bar * s
    if pde.name == "bsde_default_risk":
        slope = (pde.gamma_h - pde.gamma_l) / (pde.v_h - pde.v_l)
        Q = torch.where(u < pde.v_h, pde.gamma_h, torch.where(u > pde.v_l, pde.gamma_l,
                        pde.gamma_h + slope * (u - pde.v_h)))  # fmt: skip
        return u_t + L - (1 - pde.delta) * Q * u - pde.R * u
    f = -pde.R_l * u - (pde.mu_bar - pde.R_l) * s + (pde.R_b - pde.R_l) * torch.clamp(s - u, min=0)
    return u_t + L + f


@pytest.mark.parametrize("name, level, scale, shift", [
    ("bsde_allen_cahn", 0.1, 1.0, 0.0), ("bsde_default_risk", 60.0, 20.0, 100.0),
    ("bsde_default_risk", 5.0, 20.0, 100.0),  # u below v_h, and across v_h..v_l below
    ("bsde_diff_rate", 20.0, 20.0, 100.0),
])  # fmt: skip
def test_residual_is_the_equation_written_out(name, level, scale, shift):
    pde = build_pde(name, 7)
    fn = Smooth(7, level, scale, shift)
    X = pde.sample_domain(12, torch.Generator().manual_seed(1))
    if name == "bsde_default_risk" and level == 5.0:
        fn.level = 60.0 * torch.linspace(0.7, 1.3, 12, dtype=torch.float64)  # across Q's linear part
        fn.level = fn.level.reshape(-1)
    directions, w = pde.coefficients(X)
    D = dstein.estimate(fn, X, method="autograd", needs=pde.needs, sigma_t=1.0, directions=directions, weights=w)
    assert torch.allclose(pde.residual(X, D), written_out(pde, fn, X), rtol=1e-10, atol=1e-10)


class InLogCoordinates(torch.nn.Module):
    """The same function of y = log(x / x0): u(y, t) = fn(x0 e^y, t)."""

    def __init__(self, fn: torch.nn.Module, x0: float):
        super().__init__()
        self.fn, self.x0 = fn, x0

    def forward(self, Y):
        return self.fn(torch.cat([self.x0 * torch.exp(Y[:, :-1]), Y[:, -1:]], 1))


@pytest.mark.parametrize("name", ["bsde_default_risk", "bsde_diff_rate"])
def test_log_coordinates_give_the_same_residual(name):
    """pde.params.coordinates=log: constant diffusion, constant drift, s = sum du/dy_i; at the
    same point the residual of the same function is the price coordinates' (which the test
    above checks against the equation written out)."""
    price, log = build_pde(name, 6), build_pde(name, 6, {"coordinates": "log"})
    fn = Smooth(6, 40.0, 20.0, 100.0)
    Y = log.sample_domain(10, torch.Generator().manual_seed(2))
    X = torch.cat([log.prices(Y[:, :-1]), Y[:, -1:]], 1)
    residuals = []
    for pde, model, at in ((price, fn, X), (log, InLogCoordinates(fn, log.x0), Y)):
        directions, w = pde.coefficients(at)
        D = dstein.estimate(model, at, method="autograd", needs=pde.needs, sigma_t=1.0, directions=directions,
                            weights=w)  # fmt: skip
        residuals.append(pde.residual(at, D).detach())
    assert torch.allclose(residuals[0], residuals[1], rtol=1e-9, atol=1e-9)
    assert w.shape == (10, 1)  # one diffusion for every coordinate: the Laplacian's second differences
    assert torch.equal(log.start()[1][0, :-1], torch.zeros(6)) and log.start()[0] == price.start()[0]
    assert torch.allclose(log.condition_target("terminal", Y), price.condition_target("terminal", X))
    assert log.start_baselines().keys() == price.start_baselines().keys()
    for (a, _, _), (b, _, _) in zip(log.start_baselines().values(), price.start_baselines().values(), strict=True):
        assert a == pytest.approx(b, rel=1e-12)  # the same draws, mapped to prices


def test_default_risk_rate_is_piecewise_linear():
    pde = build_pde("bsde_default_risk", 3)
    u = torch.tensor([0.0, 50.0, 60.0, 70.0, 100.0], dtype=torch.float64)
    assert torch.allclose(pde.Q(u), torch.tensor([0.2, 0.2, 0.11, 0.02, 0.02], dtype=torch.float64))


@pytest.mark.parametrize("name", ["bsde_allen_cahn", "bsde_default_risk", "bsde_diff_rate"])
def test_forward_process_law_and_widened_training_points(name):
    """X_t from x0: x0 + sqrt(2 t) Z (Allen-Cahn) or x0 exp((mu - sigma^2/2) t + sigma sqrt(t) Z); the
    training points' noise is that law's, widened by spread; terminal points at t = T."""
    pde = build_pde(name, 50, {"spread": 0.5})
    gen = torch.Generator().manual_seed(0)
    X = pde.sample_process("terminal", 4000, gen)
    assert torch.all(X[:, -1] == pde.T)
    if name == "bsde_allen_cahn":
        z = (X[:, :-1] - pde.x0) / math.sqrt(2 * pde.T)
    else:
        z = (torch.log(X[:, :-1] / pde.x0) - (pde.mu_bar - pde.sigma**2 / 2) * pde.T) / (pde.sigma * math.sqrt(pde.T))
    assert abs(float(z.mean())) < 0.01 and abs(float(z.var()) - 1) < 0.01  # 200,000 numbers
    W = pde.sample_condition("terminal", 4000, torch.Generator().manual_seed(0))
    if name == "bsde_allen_cahn":
        zw = (W[:, :-1] - pde.x0) / math.sqrt(2 * pde.T)
    else:
        zw = (torch.log(W[:, :-1] / pde.x0) - (pde.mu_bar - pde.sigma**2 / 2) * pde.T) / (pde.sigma * math.sqrt(pde.T))
    assert abs(float(zw.var()) - 1.25) < 0.02  # E[1 + 0.5 v] = 1.25
    D = pde.sample_domain(4000, gen)
    assert (
        float(D[:, -1].min()) >= 0 and float(D[:, -1].max()) <= pde.T and abs(float(D[:, -1].mean()) - pde.T / 2) < 0.02
    )


@pytest.mark.parametrize("name, value, x0", [("bsde_allen_cahn", 0.052802, 0.0), ("bsde_default_risk", 57.300, 100.0),
                                             ("bsde_diff_rate", 21.299, 100.0)])  # fmt: skip
def test_published_start_values_at_d_100_and_none_elsewhere(name, value, x0):
    pde = build_pde(name, 100)
    label, X, got, source = pde.start()
    assert got == value and torch.all(X[0, :-1] == x0) and X[0, -1] == 0 and "Deep BSDE" in source
    assert list(pde.reference_values()) == [label]
    assert build_pde(name, 1000).start()[2] is None and build_pde(name, 1000).reference_values() == {}
    assert not pde.truth_known
    with pytest.raises(NotImplementedError, match="no solution is known"):
        pde.truth(X, 10, 0)


def test_start_baselines_bound_the_published_values():
    """The simpler problems' Monte Carlo values at x0 (d = 100): Allen-Cahn without -u^3 is
    within 0.1 % of Deep BSDE's reference (u is about 0.05: u^3 hardly matters), the reaction
    dropped too is 26 % below; a constant default intensity gamma_h (gamma_l) is a lower (upper)
    bound of the default-risk price (the comparison principle: a larger discount, a lower
    price); each single rate prices below the two-rate contract (its driver is the larger)."""
    from dstein.evaluation import start_baselines

    ac = start_baselines(build_pde("bsde_allen_cahn", 100))
    assert ac["linear"]["rel_error"] < 1e-3 and ac["linear"]["se"] < 2e-5 and ac["heat"]["value"] < 0.8 * 0.052802
    dr = start_baselines(build_pde("bsde_default_risk", 100))
    assert dr["constant_gamma_h"]["value"] < 57.3 < dr["constant_gamma_l"]["value"]
    rates = start_baselines(build_pde("bsde_diff_rate", 100))
    assert max(rates["one_rate_R_l"]["value"], rates["one_rate_R_b"]["value"]) < 21.299
    assert rates["one_rate_R_l"]["value"] < rates["one_rate_R_b"]["value"]
    assert (
        start_baselines(build_pde("bsde_diff_rate", 7))
        and "rel_error" not in start_baselines(build_pde("bsde_diff_rate", 7))["one_rate_R_l"]
    )  # no published value at d = 7


def test_allen_cahn_transform_is_exact():
    pde = build_pde("bsde_allen_cahn", 5)
    X = pde.sample_domain(6, torch.Generator().manual_seed(0)).requires_grad_(True)
    T = pde.output_transform(X)
    (grad,) = torch.autograd.grad(T.A.sum(), X, create_graph=True)
    lap = sum(torch.autograd.grad(grad[:, i].sum(), X, retain_graph=True)[0][:, i] for i in range(5))
    assert torch.allclose(grad[:, :5], T.A_grad) and torch.allclose(lap, T.A_lap)
    terminal = pde.sample_condition("terminal", 4, torch.Generator().manual_seed(1))
    assert torch.equal(pde.output_transform(terminal).value(torch.randn(4, dtype=torch.float64)),
                       pde.condition_target("terminal", terminal))  # fmt: skip


@pytest.mark.parametrize("bad, message", [({"T": 0.0}, "pde.params.T=0.0 must be > 0"),
                                          ({"sigma": -1.0}, "pde.params.sigma=-1.0 must be > 0"),
                                          ({"x0": -5.0}, "pde.params.x0=-5.0 must be > 0"),
                                          ({"v_h": 80.0}, "pde.params.v_h=80.0 must be below")])  # fmt: skip
def test_bad_parameters_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        build_pde("bsde_default_risk", 4, bad)


#: A tiny run of a PDE known only at its start state (no test set); poisson_2d.yaml has no pde.params.
TINY = ["--config", "configs/poisson_2d.yaml", "model.width=16", "model.depth=2", "estimator.samples=32",
        "train.domain_points=8", "train.condition_points=8", "train.steps=12", "eval.every=6", "eval.samples=8",
        "run.threads=1", "model.input_scale=0.01", "model.output_init=fit", "estimator.sigma_x=0.2"]  # fmt: skip


def test_a_run_known_only_at_its_start_state_reports_it_everywhere(tmp_path):
    """No test set: every evaluation row, summary.json, the last line, TensorBoard's rows, the plots and
    launch/evaluate.py give u(0, x0) against Deep BSDE's value; nothing asks for a truth."""
    out = run_here("train.py", *TINY, "pde.name=bsde_default_risk", "pde.dim=100", f"run.dir={tmp_path}",
                   "eval.plots=true")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "u(0,x0=100)" in out.stdout and "(reference 57.3000" in out.stdout and "L2 rel" not in out.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["start_reference"] == 57.3 and "l2_rel" not in summary and "baselines" in summary
    assert summary["reference"]["u(0,x0=100)"]["reference"] == 57.3
    assert summary["start_baselines"]["constant_gamma_h"]["value"] < 57.3 and "beside it, baseline" in out.stdout
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "start_value" in r]
    assert [r["step"] for r in evals] == [6, 12] and all("start_rel_error" in r for r in evals)
    for name in ("errors.png", "slice.png", "residual_hist.png", "losses.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000, name
    done = run_here("evaluate.py", "--run", str(tmp_path), "--out", str(tmp_path / "again"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "u(0,x0=100): model" in done.stdout and "reference 57.300000" in done.stdout
    assert "baseline constant_gamma_l" in done.stdout
    result = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert result["start_value"] == pytest.approx(summary["start_value"], rel=1e-6) and "l2_rel" not in result


def test_without_a_published_value_the_start_value_alone(tmp_path):
    out = run_here("train.py", *TINY, "pde.name=bsde_allen_cahn", "pde.dim=12", f"run.dir={tmp_path}",
                   "eval.plots=true", "model.input_scale=1.0", "model.hard_constraint=true",
                   "estimator.sigma_x=0.05")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(no reference)" in out.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "start_value" in summary and "start_reference" not in summary and summary["reference"] == {}
    assert (tmp_path / "plots" / "errors.png").is_file()
