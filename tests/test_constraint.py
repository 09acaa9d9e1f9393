"""Hard constraints u = A + B f (MATH.md section 6) and derivatives along given directions.

The product rule is checked against autograd of the composite network (exact, float64);
the Stein estimates of u against the closed form of the smoothed f; and the subspace
estimator's ``along`` against the full-space antithetic estimator, values and parameter
gradients (its correction term carries what holding the basis constant leaves out).
"""

from __future__ import annotations

import math

import pytest
import torch
from closed_forms import LayeredQuadratic, SinWave
from test_estimators import ST, SX, assert_within_se, points

import dstein
from dstein.estimators.constraint import OutputTransform
from dstein.models import MLP
from dstein.pdes import build_pde

NEEDS_U = frozenset({"u", "u_t", "grad", "grad_sq", "lap"})


def ball_transform(X: torch.Tensor) -> OutputTransform:
    """A transform with every field: u = sin(x_1) + t + (1 - |x|^2) (1 + t^2) f."""
    x, t = X[:, :-1], X[:, -1]
    r2 = (x * x).sum(1)
    d = x.shape[1]
    grad_A = torch.zeros_like(x)
    grad_A[:, 0] = torch.cos(x[:, 0])
    return OutputTransform(
        A=torch.sin(x[:, 0]) + t, B=(1 - r2) * (1 + t * t), A_t=torch.ones_like(t), A_grad=grad_A,
        A_lap=-torch.sin(x[:, 0]), B_t=(1 - r2) * 2 * t, B_grad=-2 * x * (1 + t * t).unsqueeze(1),
        B_lap=torch.full_like(t, -2.0 * d) * (1 + t * t),
    )  # fmt: skip


class Composite(torch.nn.Module):
    """u(X) = A(X) + B(X) g(X) as one network, for autograd's exact derivatives."""

    def __init__(self, net: torch.nn.Module, transform):
        super().__init__()
        self.net, self.transform = net, transform

    def forward(self, X):
        return self.transform(X).value(self.net(X).reshape(-1)).unsqueeze(-1)


@pytest.mark.parametrize("which", ["hjb", "heat", "heat-modes", "ball"])
def test_product_rule_equals_autograd_of_the_composite(which):
    d = 6
    if which == "heat-modes":
        transform = build_pde("heat", d, {"solution": "modes"}).output_transform
    else:
        transform = ball_transform if which == "ball" else build_pde(which, d).output_transform
    torch.manual_seed(3)
    net = MLP(d + 1, 16, 2, "gelu").double()
    X = points(d, True, n=7)
    f_needs = transform(X).needs_of_f(NEEDS_U)
    directions = transform(X).directions(NEEDS_U)
    D_f = dstein.estimate(net, X, method="autograd", needs=f_needs, sigma_t=1.0,
                          directions=torch.stack(directions, 1) if directions else None)  # fmt: skip
    composed = transform(X).apply(D_f, NEEDS_U)
    exact = dstein.estimate(Composite(net, transform), X, method="autograd", needs=NEEDS_U, sigma_t=1.0)
    for k in NEEDS_U:
        assert torch.allclose(getattr(composed, k), getattr(exact, k), rtol=1e-10, atol=1e-10), k


def test_hjb_transform_holds_the_terminal_condition_and_its_derivatives_are_exact():
    hjb = build_pde("hjb", 4)
    X = points(4, True, n=5).requires_grad_(True)
    T = hjb.output_transform(X)
    (grad_A,) = torch.autograd.grad(T.A.sum(), X, create_graph=True)
    lap = sum(torch.autograd.grad(grad_A[:, i].sum(), X, retain_graph=True)[0][:, i] for i in range(4))
    assert torch.allclose(grad_A[:, :4], T.A_grad) and torch.allclose(lap, T.A_lap)
    terminal = X.detach().clone()
    terminal[:, -1] = hjb.T
    at_T = hjb.output_transform(terminal)
    assert torch.equal(at_T.value(torch.randn(5, dtype=torch.float64)), hjb.condition_target("terminal", terminal))


def test_smoothed_hjb_transform_is_the_smoothed_terminal_value_with_exact_derivatives():
    """model.smooth_constraint: A = ln((1 + |x|^2 + sigma^2 d) / 2) is E[g(x + sigma eps)] up to
    the bound hjb.py states (checked by Monte Carlo at sigma^2 d = 1, where A bends: the
    origin, |x|^2 = 1 and 25), and its derivatives are those of that A."""
    d, sigma = 40, 1 / math.sqrt(40)
    hjb = build_pde("hjb", d)
    hjb.smoothing = sigma
    X = torch.zeros(3, d + 1, dtype=torch.float64)
    X[1, 0], X[2, :25] = 1.0, 1.0
    A = hjb.output_transform(X).A
    eps = torch.randn(400_000, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for i in range(3):
        g = torch.log((1 + ((X[i, :d] + sigma * eps) ** 2).sum(1)) / 2)
        r2 = float((X[i, :d] ** 2).sum())
        bound = (4 * sigma**2 * r2 + 2 * sigma**4 * d) / (2 * (1 + r2) ** 2)
        se = float(g.std()) / math.sqrt(len(g))
        assert abs(float(A[i]) - float(g.mean())) <= bound + 4 * se, i
        assert abs(float(A[i]) - float(torch.log(torch.tensor((1 + r2) / 2)))) > 10 * (bound + 4 * se), i  # not g
    Y = torch.cat([torch.randn(4, d, dtype=torch.float64), torch.rand(4, 1, dtype=torch.float64)], 1)
    Y = torch.cat([X, Y]).requires_grad_(True)
    T = hjb.output_transform(Y)
    (grad_A,) = torch.autograd.grad(T.A.sum(), Y, create_graph=True)
    lap = sum(torch.autograd.grad(grad_A[:, i].sum(), Y, retain_graph=True)[0][:, i] for i in range(d))
    assert torch.allclose(grad_A[:, :d], T.A_grad) and torch.allclose(lap, T.A_lap)


def test_smooth_constraint_sets_the_stein_methods_sigma_only():
    from dstein.build import build_pde as build_configured
    from dstein.config import load_config

    overrides = ["model.smooth_constraint=true", "estimator.sigma_x=0.03"]
    assert build_configured(load_config("configs/quickstart.yaml", overrides)).smoothing == 0.03
    autograd = load_config("configs/quickstart.yaml", [*overrides, "estimator.method=autograd"])
    assert build_configured(autograd).smoothing == 0.0  # no smoothing: A as it is
    assert build_configured(load_config("configs/quickstart.yaml", [])).smoothing == 0.0


@pytest.mark.parametrize("method", ["stein-antithetic", "stein-subspace"])
def test_stein_estimates_of_the_constrained_solution_are_unbiased(method):
    """HJB's transform (B = T - t has no spatial gradient): every derivative of u is linear in
    the estimates of f, so its mean is the product rule applied to the smoothed f."""
    from closed_forms import LayeredSin

    d = 5
    fn = SinWave(d, True) if method == "stein-antithetic" else LayeredSin(d, True)
    X = points(d, True)
    T = build_pde("hjb", d).output_transform(X)
    needs = T.needs_of_f(NEEDS_U - {"grad"})
    directions = torch.stack(T.directions(NEEDS_U), 1)
    est = {k: [] for k in NEEDS_U - {"grad"}}
    for r in range(40):
        D = dstein.estimate(fn, X, method=method, needs=needs, samples=256, sigma_x=SX, sigma_t=ST, seed=r,
                            directions=directions)  # fmt: skip
        composed = T.apply(D, NEEDS_U - {"grad"})
        for k in est:
            est[k].append(getattr(composed, k).detach())
    smooth = fn.smoothed(X, SX, ST)
    exact_f = dstein.estimators.Derivatives(
        u=smooth["u"], u_t=smooth["u_t"], grad_sq=smooth["grad_sq"], lap=smooth["lap"],
        along=torch.einsum("bmd,bd->bm", directions, smooth["grad"]),
    )  # fmt: skip
    exact = T.apply(exact_f, NEEDS_U - {"grad"})
    for k, values in est.items():
        assert_within_se(torch.stack(values), getattr(exact, k), name=f"{method} {k}")


def along_estimates(method: str, reps: int, d: int = 40, width: int = 12, samples: int = 512):
    """Estimates of w . grad f along two directions per point and the parameter gradient of a
    loss linear in them, on a tanh MLP whose row space does not hold the directions."""
    torch.manual_seed(6)
    model = MLP(d + 1, width, 2).double()
    X = points(d, True, n=4)
    gen = torch.Generator().manual_seed(7)
    W = torch.randn(4, 2, d, generator=gen, dtype=torch.float64)
    coef = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    values, grads = [], []
    for r in range(reps):
        D = dstein.estimate(model, X, method=method, needs={"along"}, samples=samples, sigma_x=SX, sigma_t=ST,
                            seed=r, directions=W)  # fmt: skip
        loss = (coef * D.along).sum()
        values.append(D.along.detach())
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
    return torch.stack(values), torch.stack(grads)


def test_subspace_along_agrees_with_antithetic_values_and_parameter_gradients():
    """Same expectation for the values and for the parameter gradient of a loss linear in
    them. Without the correction term the gradient w.r.t. the first layer's weights misses
    grad_h f w_perp', which this test detects (z-score sum far above chi^2)."""
    (va, ga), (vb, gb) = along_estimates("stein-subspace", 40), along_estimates("stein-antithetic", 40)
    for a, b, name in ((va, vb, "values"), (ga, gb, "parameter gradient")):
        se = torch.sqrt(a.var(0) / 40 + b.var(0) / 40)
        fixed = se < 1e-12  # e.g. the output bias, on which w . grad f does not depend
        assert torch.allclose(a.mean(0)[fixed], b.mean(0)[fixed], atol=1e-10), name
        z = (a.mean(0) - b.mean(0))[~fixed] / se[~fixed]
        m = z.numel()
        assert (float((z * z).sum()) - m) / math.sqrt(2 * m) < 4, name


def test_subspace_along_of_a_layered_quadratic_is_exact_in_the_mean():
    d = 30
    fn = LayeredQuadratic(d, True, k=6)
    X = points(d, True)
    W = torch.randn(X.shape[0], 3, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    est = torch.stack([
        dstein.estimate(fn, X, method="stein-subspace", needs={"along"}, samples=256, sigma_x=SX, sigma_t=ST, seed=r,
                        directions=W).along.detach()
        for r in range(40)
    ])  # fmt: skip
    exact = torch.einsum("bmd,bd->bm", W, fn.smoothed(X, SX, ST)["grad"])
    assert_within_se(est, exact, name="layered quadratic along")


def test_along_needs_directions():
    with pytest.raises(ValueError, match="directions of shape"):
        dstein.estimate(SinWave(3, False), points(3, False), method="stein", needs={"along"}, samples=8, sigma_x=SX)
