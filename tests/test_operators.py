"""x-dependent diffusions and drifts (docs/MATH.md section 15): the diagonal-weighted Hessian
trace ``trace`` (``sum_i w_i d^2f/dx_i^2``, w = sigma_i(x)^2) from every estimator against
closed forms, the hard constraint's product rule for it, its partial sums over chunks, and a
user's PDE with the diffusion sigma x_i and drift mu x of geometric Brownian motion trained
end to end with every method."""

from __future__ import annotations

import json

import pytest
import torch
from closed_forms import LayeredQuadratic, Quadratic, SinWave
from test_checkpoint import train_here
from test_constraint import Composite, ball_transform
from test_estimators import ST, SX, assert_within_se, points
from user_pde import BasketGBM

import dstein
from dstein.estimators import make_spec
from dstein.estimators.constraint import OutputTransform
from dstein.estimators.stein import FullSpace, partial_sums
from dstein.models import MLP, RadialMLP


def weights(n: int, d: int, seed: int = 7) -> torch.Tensor:
    """Per-point, per-coordinate weights in (0.2, 3): far from one common weight."""
    gen = torch.Generator().manual_seed(seed)
    return 0.2 + 2.8 * torch.rand(n, d, generator=gen, dtype=torch.float64)


def traces(fn, X, w, method, time, reps=40, samples=256, laplacian="stein", sx=SX):
    return torch.stack([
        dstein.estimate(fn, X, method=method, needs={"trace"}, samples=samples, sigma_x=sx,
                        sigma_t=ST if time else None, seed=r, weights=w, laplacian=laplacian).trace.detach()
        for r in range(reps)
    ])  # fmt: skip


@pytest.mark.parametrize("method, laplacian, family", [
    ("stein", "stein", SinWave), ("stein", "stein", Quadratic), ("stein-antithetic", "stein", SinWave),
    ("stein-antithetic", "stein", Quadratic), ("stein-antithetic", "difference", Quadratic),
])  # fmt: skip
@pytest.mark.parametrize("d", [1, 5, 30])
@pytest.mark.parametrize("time", [False, True])
def test_full_space_trace_matches_closed_form(method, laplacian, family, d, time):
    """Stein's weight on the deviations from the mean weight plus the mean weight times the
    Laplacian's weight: unbiased for the smoothed model's weighted trace (the difference form:
    the network's trace up to O(sx^2), so exact in the mean for quadratics, time curvature
    weighted out)."""
    fn, X = family(d, time), points(d, time)
    w = weights(X.shape[0], d)
    exact = (w * fn.hessian_diag(X, SX, ST if time else 0.0)).sum(1)
    assert_within_se(traces(fn, X, w, method, time, laplacian=laplacian), exact, name=f"{method} {laplacian} d={d}")


@pytest.mark.parametrize("d", [3, 12])  # the layer's 6 rows span R^3; in R^12 most directions are outside
@pytest.mark.parametrize("laplacian", ["stein", "difference"])
@pytest.mark.parametrize("time", [False, True])
def test_subspace_trace_matches_closed_form(d, laplacian, time):
    """In the row space: z' V' diag(w) V z - tr(V' diag(w) V), the full weight's conditional mean."""
    fn, X = LayeredQuadratic(d, time), points(d, time)
    w = weights(X.shape[0], d)
    exact = (w * fn.hessian_diag(X, SX, ST if time else 0.0)).sum(1)
    est = traces(fn, X, w, "stein-subspace", time, laplacian=laplacian)
    assert_within_se(est, exact, name=f"subspace {laplacian} d={d}")


@pytest.mark.parametrize("d, width, feature", [(6, 3, "square"), (12, 4, "log"), (4, 8, "square")])
def test_radial_subspace_trace_agrees_with_autograd(d, width, feature):
    """The radial family: x's own direction e and the chi-square part of the perturbation
    (its share (c / m)(sum w - tr M)) in the weight; the network's trace by autograd (sigma small)."""
    torch.manual_seed(d)
    model = RadialMLP(d + 1, d, width, 2, "gelu", shift=float(d), scale=3.0, feature=feature).double()
    X = points(d, True, n=4)
    w = weights(4, d)
    exact = dstein.estimate(model, X, method="autograd", needs={"trace"}, sigma_t=1.0, weights=w).trace.detach()
    for laplacian in ("stein", "difference"):
        est = traces(model, X, w, "stein-subspace", True, reps=20, samples=4096, laplacian=laplacian, sx=0.01)
        assert_within_se(est, exact, name=f"radial subspace {laplacian} d={d}")


@pytest.mark.parametrize("d", [4, 20])  # the reverse loop (d <= 16) and forward-over-reverse products
def test_autograd_trace_is_exact_and_hutchinson_unbiased(d):
    fn, X = SinWave(d, True), points(d, True)
    w = weights(X.shape[0], d)
    exact = (w * fn.hessian_diag(X, 0.0, 0.0)).sum(1)
    got = dstein.estimate(fn, X, method="autograd", needs={"trace", "lap"}, sigma_t=1.0, weights=w)
    assert torch.allclose(got.trace, exact, atol=1e-12)
    assert torch.allclose(got.lap, (fn.hessian_diag(X, 0.0, 0.0)).sum(1), atol=1e-12)
    same = dstein.estimate(fn, X, method="autograd", needs={"trace"}, sigma_t=1.0, weights=torch.full((3, 1), 2.0,
                           dtype=torch.float64))  # fmt: skip
    assert torch.allclose(same.trace, 2 * got.lap, atol=1e-12)  # (B, 1): one weight per point
    hutch = torch.stack([dstein.estimate(fn, X, method="hutchinson", needs={"trace"}, samples=8, sigma_t=1.0,
                                         seed=r, weights=w).trace.detach() for r in range(40)])  # fmt: skip
    assert_within_se(hutch, exact, name=f"hutchinson d={d}")


def test_trace_partial_sums_add_up_over_chunks():
    """Sharding: the trace's sums over two sets of chunks add up to the sums over all."""
    fn, X = Quadratic(8, True), points(8, True)
    w = weights(3, 8)
    spec = make_spec("stein-antithetic", {"trace", "u"}, samples=64, chunk=16, sigma_x=SX, sigma_t=ST,
                     laplacian="difference")  # fmt: skip
    space = FullSpace(fn, X, spec)
    whole = partial_sums(fn, X, spec, range(4), space=space, weights=w)
    parts = [partial_sums(fn, X, spec, chunks, space=space, weights=w) for chunks in (range(0, 1), range(1, 4))]
    for key in whole:
        assert torch.allclose(parts[0][key] + parts[1][key], whole[key], atol=1e-12), key


def with_hessian_diagonals(X: torch.Tensor) -> OutputTransform:
    """ball_transform with the diagonals of its Hessians: A = sin(x_1) + t, B = (1 - |x|^2)(1 + t^2)."""
    T = ball_transform(X)
    x, t = X[:, :-1], X[:, -1]
    T.A_hess_diag = torch.zeros_like(x)
    T.A_hess_diag[:, 0] = -torch.sin(x[:, 0])
    T.B_hess_diag = torch.full_like(x, -2.0) * (1 + t * t).unsqueeze(1)
    return T


@pytest.mark.parametrize("which", ["ball", "gbm"])
def test_product_rule_for_trace_and_along_equals_autograd_of_the_composite(which):
    """u = A + B f: tr(W H_u) = tr(W H_A) + f tr(W H_B) + 2 (W grad B) . grad f + B tr(W H_f) and
    the PDE's own directions w . grad u = w . (grad A + f grad B) + B w . grad f, exact in float64."""
    d = 5
    transform = with_hessian_diagonals if which == "ball" else BasketGBM(d).output_transform
    torch.manual_seed(3)
    net = MLP(d + 1, 16, 2, "gelu").double()
    X = points(d, True, n=7)
    w = weights(7, d)
    own = torch.randn(7, 2, d, dtype=torch.float64)
    needs = frozenset({"u", "u_t", "trace", "along", "lap"})
    T = transform(X)
    directions = T.directions(needs, own, w)
    D_f = dstein.estimate(net, X, method="autograd", needs=T.needs_of_f(needs, own), sigma_t=1.0,
                          directions=torch.stack(directions, 1), weights=w)  # fmt: skip
    composed = T.apply(D_f, needs, own, w)
    exact = dstein.estimate(Composite(net, transform), X, method="autograd", needs=needs, sigma_t=1.0,
                            directions=own, weights=w)  # fmt: skip
    for k in needs:
        assert torch.allclose(getattr(composed, k), getattr(exact, k), rtol=1e-10, atol=1e-10), k


def test_gbm_residual_of_the_exact_solution_is_zero():
    """The user's PDE as written: generator and residual vanish on its closed form."""
    pde = BasketGBM(6)

    class Exact(torch.nn.Module):
        def forward(self, X):
            return pde.exact(X).unsqueeze(-1)

    X = pde.sample_domain(9, torch.Generator().manual_seed(0))
    directions, w = pde.coefficients(X)
    D = dstein.estimate(Exact(), X, method="autograd", needs=pde.needs, sigma_t=1.0, directions=directions,
                        weights=w)  # fmt: skip
    assert float(pde.residual(X, D).detach().abs().max()) < 1e-12
    assert float((pde.generator(D) - pde.r * D.u).detach().abs().max()) > 0.1  # not trivially zero: u_t balances it


#: The quickstart's run (tests/test_checkpoint.py's TINY) with the user's PDE in place of HJB.
GBM = ["pde.target=user_pde:BasketGBM", "pde.params={}", "pde.process_share=0"]


@pytest.mark.parametrize("method, extra", [
    ("stein-antithetic", ["estimator.laplacian=difference"]),
    ("stein-subspace", ["estimator.laplacian=difference"]),
    ("autograd", []),
    ("hutchinson", ["estimator.samples=4"]),
])  # fmt: skip
def test_gbm_user_pde_trains_with_every_method(tmp_path, method, extra):
    """pde.target with a diffusion sigma x_i and drift mu x: a short run with the hard constraint
    (whose trace needs A's Hessian diagonal) halves the error of the best function of t and of
    the best constant f with each method. (Without the constraint the estimates are the
    network's own, checked against closed forms above.)"""
    text = train_here(tmp_path, *GBM, "model.hard_constraint=true",
                      f"estimator.method={method}", "model.family=mlp", "model.width=32", "train.domain_points=32",
                      "estimator.condition_samples=null", "train.steps=300", "eval.every=300", "train.lr=1e-2",
                      "estimator.sigma_x=0.02", "eval.points=64", *extra)  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["pde"] == "basket-gbm", text[-2000:]
    beside = {k: summary["baselines"][k]["l2_rel"] for k in ("t_only", "constrained_constant")}
    assert summary["l2_rel"] < 0.5 * min(beside.values()), (method, summary["l2_rel"], beside)


def test_missing_hessian_diagonal_and_bad_diffusion_are_refused(tmp_path):
    text = train_here(
        tmp_path / "a",
        "pde.target=user_pde:NoHessianDiagonal",
        *GBM[1:],
        "model.hard_constraint=true",
        "estimator.method=stein-antithetic",
        "model.family=mlp",
        status=2,
    )
    assert "A_hess_diag" in text and "Traceback" not in text, text[-2000:]
    text = train_here(
        tmp_path / "b",
        "pde.target=user_pde:BadDiffusion",
        *GBM[1:],
        "model.family=mlp",
        "estimator.method=stein-antithetic",
        status=2,
    )
    assert "BadDiffusion.diffusion gives (3, 6)" in text and "Traceback" not in text, text[-2000:]
