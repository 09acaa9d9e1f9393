"""The quadratic family (dstein.models.QuadraticMLP, docs/MATH.md section 20): its first layer
also sees x's squared coordinates through Q, so its input gradient W' g + 2 s (Q' g) * x may turn
with x in directions of its own. The full-space estimators perturb X itself for it (a closed
form of the smoothed model checks them), stein-subspace is refused, and its gradient floor is
the part of the true gradient outside span(rows of Wx, rows of Q diag(x)) at each point."""

from __future__ import annotations

import pytest
import torch
from test_estimators import assert_within_se, points, repeats

from dstein.config import ConfigError, load_config
from dstein.estimators.stein import layered
from dstein.evaluation import floor_sums
from dstein.models import QuadraticMLP

D, WIDTH, SCALE = 7, 4, 0.5


def linear_body(seed: int = 0, time: bool = False) -> QuadraticMLP:
    """A quadratic-family model with a linear body: g = c . (W (s x, t) + b + s Q (x * x)) + c0, so
    that the smoothed model is a closed form (``closed_form``)."""
    torch.manual_seed(seed)
    model = QuadraticMLP(D + (1 if time else 0), D, WIDTH, 1, "tanh", input_scale=SCALE).double()
    model.body = torch.nn.Sequential(torch.nn.Linear(WIDTH, 1)).double()
    with torch.no_grad():
        model.quadratic.weight.normal_()
    return model


def closed_form(model: QuadraticMLP, X: torch.Tensor, sx: float) -> dict[str, torch.Tensor]:
    """f = E[g(X + delta)], delta ~ N(0, sx^2 I_d) on x: g plus s sx^2 c . Q 1; grad f = s W_x' c +
    2 s (Q' c) * x; lap f = 2 s sum_i (Q' c)_i."""
    c = model.body[0].weight[0].detach()
    Q, W = model.quadratic.weight.detach(), model.input_layer.weight.detach()
    x = X[:, :D]
    qc = Q.T @ c  # (d,)
    with torch.no_grad():
        g = model(X).reshape(-1)
    return {
        "u": g + SCALE * sx**2 * qc.sum(),
        "grad": SCALE * (W[:, :D].T @ c).unsqueeze(0) + 2 * SCALE * qc.unsqueeze(0) * x,
        "lap": torch.full((X.shape[0],), 2 * SCALE * float(qc.sum()), dtype=X.dtype),
    }


def test_the_model_is_what_its_first_layer_says_and_perturbs_its_input():
    model = linear_body()
    X = points(D, False, n=5)
    x = X[:, :D]
    W, b, Q = model.input_layer.weight, model.input_layer.bias, model.quadratic.weight
    h = (SCALE * x) @ W.T + b + SCALE * (x * x) @ Q.T
    assert torch.allclose(model.pre_activation(X), h, rtol=1e-13, atol=1e-13)
    assert layered(model) is None  # no shortcut through the pre-activation: it misses Q (delta * delta)


@pytest.mark.parametrize("method", ["stein", "stein-antithetic"])
def test_full_space_stein_estimates_match_the_closed_form(method):
    """Value, gradient and Laplacian of the smoothed model within 4 standard errors of the
    closed form (an estimator that followed only W delta through the first layer misses
    2 s (Q' c) * x in the gradient and 2 s sum Q' c in the Laplacian, many errors away)."""
    model = linear_body(1)
    X = points(D, False, n=4)
    sx = 0.3
    est = repeats(model, X, method, ("u", "grad", "lap"), 512, 40, False, sx=sx)
    exact = closed_form(model, X, sx)
    for key in ("u", "grad", "lap"):
        assert_within_se(est[key], exact[key], name=key)


def test_autograd_gives_the_closed_form_derivatives_of_the_network():
    import dstein

    model = linear_body(2)
    X = points(D, False, n=3)
    D_ = dstein.estimate(model, X, method="autograd", needs={"u", "grad", "lap"}, samples=2, sigma_x=1e-9, seed=0)
    exact = closed_form(model, X, 0.0)
    assert torch.allclose(D_.grad, exact["grad"], rtol=1e-10, atol=1e-12)
    assert torch.allclose(D_.lap, exact["lap"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("block_bytes", [1 << 28, 1])
def test_gradient_floor_spans_the_rows_of_w_and_of_q_diag_x(block_bytes, monkeypatch):
    """Zero for the model's own gradient and for a * x when a is a row of Q; for a random
    target, the part outside span(Wx's rows, Q diag(x)'s rows), found per point from an SVD of
    those rows (some of them zero: the spans have rank 6 of the 8 rows); the same in blocks of
    one point (``FLOOR_BLOCK_BYTES``: how d = 100,000 fits in memory)."""
    import dstein.evaluation

    monkeypatch.setattr(dstein.evaluation, "FLOOR_BLOCK_BYTES", block_bytes)
    assert dstein.evaluation.floor_block(8 * D) == (1 if block_bytes == 1 else dstein.evaluation.FLOOR_BLOCK)
    model = linear_body(3)
    X = points(D, False, n=6) * 2
    x = X[:, :D]
    with torch.no_grad():
        model.input_layer.weight[2:] = 0  # a row space of rank 2 < d, so the Q directions matter
        model.quadratic.weight[:, 5:] = 0
    Xg = X.clone().requires_grad_(True)
    (own,) = torch.autograd.grad(model(Xg).sum(), Xg)
    u = torch.zeros(X.shape[0], dtype=X.dtype)
    assert float(floor_sums(model, X, u, own)[0]) < 1e-20
    a = model.quadratic.weight[1].detach()
    assert float(floor_sums(model, X, u, a.unsqueeze(0) * x * torch.rand(X.shape[0], 1, dtype=X.dtype))[0]) < 1e-20
    target = torch.randn(X.shape[0], D, generator=torch.Generator().manual_seed(4), dtype=X.dtype)
    outside = 0.0
    for i in range(X.shape[0]):
        basis = torch.cat([model.input_layer.weight.detach()[:, :D], model.quadratic.weight.detach() * x[i]]).T
        U, S, _ = torch.linalg.svd(basis, full_matrices=False)
        P = U[:, S / S.max() > 1e-10]
        outside += float(((target[i] - P @ (P.T @ target[i])) ** 2).sum())
    got, total = floor_sums(model, X, u, target)
    assert float(got) == pytest.approx(outside, rel=1e-9) and 0 < float(got) < float(total)


def test_subspace_is_refused_and_auto_picks_antithetic(root):
    base = root / "configs/quickstart.yaml"
    refused = r"stein-subspace cannot follow a perturbation through model\.family=quadratic"
    with pytest.raises(ConfigError, match=refused):
        load_config(base, ["model.family=quadratic", "estimator.method=stein-subspace"])
    wide = load_config(base, ["model.family=quadratic", "estimator.method=auto", "pde.dim=200", "model.width=16"])
    assert wide.estimator.method == "stein-antithetic"


def test_a_run_of_the_family_trains_evaluates_and_loads(tmp_path):
    """hjb_aniso with the quadratic family through the whole run: its gradient floor in the
    evaluations (below the mlp's for the same first layer width: the Q directions add to W's),
    and dstein.load gives back the model that was evaluated."""
    from test_train import SMALL_NET, small_config

    import dstein
    from dstein.train import run

    cfg = small_config("quickstart.yaml", tmp_path, "pde.name=hjb_aniso", "pde.dim=40", "model.family=quadratic",
                       "model.input_scale=0.025", "eval.points=200", *SMALL_NET[1:], "model.width=8")  # fmt: skip
    summary = run(cfg)
    assert cfg.estimator.method == "stein-antithetic"
    floor = summary["gradient_floor"]
    mlp = small_config("quickstart.yaml", tmp_path / "mlp", "pde.name=hjb_aniso", "pde.dim=40", "eval.points=200",
                       *SMALL_NET[1:], "model.width=8")  # fmt: skip
    assert 0 <= floor < run(mlp)["gradient_floor"]
    solution = dstein.load(tmp_path)
    x = torch.zeros(3, 40, dtype=torch.float64)
    u, grad = solution.u(x, 0.5), solution.grad(x, 0.5)
    assert u.shape == (3,) and grad.shape == (3, 40) and torch.isfinite(grad).all()
