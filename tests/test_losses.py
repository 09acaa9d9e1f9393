"""The residual loss choices (train.residual_loss) against a closed-form residual.

A layered quadratic g = |W x + w t + c|^2 / 2 has its smoothed derivatives in closed form as
differentiable functions of its weights, so the HJB residual r(theta) = u_t + lap - |grad|^2
of the smoothed model, r^2 and its parameter gradient are exact. Over repeats with fresh
noise: the squared estimate's mean is r^2 + Var(r_hat) (biased, and the bias is seen); the
product of two independent estimates (halves of the samples) has mean r^2 and its parameter
gradient has mean grad r^2, within standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from closed_forms import LayeredQuadratic
from test_estimators import points

from dstein.config import load_config
from dstein.estimators.sharded import Estimator

NEEDS = frozenset({"u_t", "lap", "grad_sq"})
SX, ST, D, REPS = 0.3, 0.2, 8, 60


def exact_residual(fn: LayeredQuadratic, X: torch.Tensor) -> torch.Tensor:
    """u_t + lap - |grad|^2 of the smoothed layered quadratic, differentiable in its weights."""
    W = fn.input_layer.weight
    Wx, w = W[:, : fn.d], W[:, fn.d]
    h = fn.input_layer(X)
    return h @ w + (Wx * Wx).sum() - ((h @ Wx) ** 2).sum(1)


def repeats(method: str):
    fn = LayeredQuadratic(D, True, k=4, seed=2)
    X = points(D, True, n=5)
    est = Estimator(method=method, samples=64, sigma_x=SX, sigma_t=ST, seed=0, chunk=8)
    params = list(fn.parameters())
    out: dict[str, list[torch.Tensor]] = {"squared": [], "unbiased": [], "r": [], "grad_unbiased": []}
    for rep in range(REPS):
        D_full = est(fn, X, NEEDS, step=rep, stream=0)
        r_hat = D_full.u_t + D_full.lap - D_full.grad_sq
        first, second = est.pair(fn, X, NEEDS, step=rep, stream=0)
        r1, r2 = (Dh.u_t + Dh.lap - Dh.grad_sq for Dh in (first, second))
        unbiased = (r1 * r2).sum()
        out["squared"].append((r_hat * r_hat).sum().detach())
        out["r"].append(r_hat.detach())
        out["unbiased"].append(unbiased.detach())
        out["grad_unbiased"].append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(unbiased, params)]))
    exact_r = exact_residual(fn, X)
    exact_loss = (exact_r * exact_r).sum()
    exact_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(exact_loss, params)])
    return {k: torch.stack(v) for k, v in out.items()}, exact_loss.detach(), exact_grad


@pytest.mark.parametrize("method", ["stein", "stein-antithetic", "stein-subspace"])
def test_unbiased_loss_and_its_gradient_have_the_exact_expectation(method):
    est, exact_loss, exact_grad = repeats(method)
    mean, se = est["unbiased"].mean(), est["unbiased"].std() / math.sqrt(REPS)
    assert abs(float(mean - exact_loss)) < 4 * float(se), (float(mean), float(exact_loss), float(se))
    g = est["grad_unbiased"]
    z = (g.mean(0) - exact_grad) / (g.std(0) / math.sqrt(REPS))
    m = z.numel()
    excess = (float((z * z).sum()) * (REPS - 3) / (REPS - 1) - m) / math.sqrt(2 * m)
    assert excess < 4, f"sum of squared z-scores is {excess:.2f} sd above chi^2({m})"


@pytest.mark.parametrize("method", ["stein", "stein-antithetic"])
def test_squared_loss_adds_the_estimators_variance(method):
    """E[r_hat^2] = r^2 + Var(r_hat): the bias is there, and of that size."""
    est, exact_loss, _ = repeats(method)
    sq = est["squared"]
    bias = float(sq.mean() - exact_loss)
    se_mean = float(sq.std()) / math.sqrt(REPS)
    var = est["r"].var(0)  # per point, over the repeats
    expected, se_var = float(var.sum()), float(torch.sqrt((2 * var * var / (REPS - 1)).sum()))
    assert bias > 4 * se_mean, (bias, se_mean)  # biased, and detectably so
    assert abs(bias - expected) < 4 * math.hypot(se_mean, se_var), (bias, expected)


def test_hybrid_switches_at_the_configured_step(root):
    config = load_config(root / "configs/quickstart.yaml", ["train.residual_loss=hybrid", "train.unbiased_from=7"])
    assert [config.train.unbiased_at(s) for s in (0, 6, 7, 100)] == [False, False, True, True]
    unbiased = load_config(root / "configs/quickstart.yaml", ["train.residual_loss=unbiased"]).train
    squared = load_config(root / "configs/quickstart.yaml", ["train.residual_loss=squared"]).train
    assert unbiased.unbiased_at(0) and not squared.unbiased_at(10**6)


def test_halves_of_one_chunk_are_refused():
    fn = LayeredQuadratic(D, True, k=4)
    est = Estimator(method="stein-antithetic", samples=8, sigma_x=SX, sigma_t=ST, seed=0, chunk=8)
    with pytest.raises(ValueError, match="two independent estimates need at least two"):
        est.pair(fn, points(D, True), NEEDS, step=0, stream=0)
