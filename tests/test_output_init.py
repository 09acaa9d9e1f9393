"""model.output_init=fit (dstein/output_init.py): the output bias is moved to the minimum of
the first step's loss over constant shifts of f.

Checked against the training loss itself (train.loss_terms, float64, the same noise): after
the fit its derivative with respect to the output bias vanishes and its value is the one the
fit reports (the derivatives of u are exact quadratics in the shift, not approximations)."""

from __future__ import annotations

import pytest
import torch

from dstein.build import build_estimator, build_model
from dstein.config import load_config
from dstein.data.points import collocation
from dstein.output_init import fit_output_bias, output_bias
from dstein.pdes import build_pde
from dstein.train import loss_terms, total_loss

SMALL = ["model.width=16", "model.depth=2", "estimator.samples=16", "train.domain_points=12",
         "train.condition_points=8", "train.residual_loss=squared"]  # fmt: skip
CASES = {
    # |x|^2-scaled level far from 0: f ~ sin(1) sum c_i = -14 (coeff_seed 2, d = 300)
    "sine_gordon": ("configs/sine_gordon_1k.yaml", ["pde.dim=300", "pde.params.coeff_seed=2"]),
    # the terminal condition as a loss beside the residual, |grad u|^2 in the residual
    "hjb": ("configs/quickstart.yaml", ["model.hard_constraint=false"]),
    # an autograd method (its estimates differentiate the network)
    "hjb-hutchinson": ("configs/quickstart.yaml", ["estimator.method=hutchinson", "estimator.laplacian=stein"]),
    # hard constraint with grad B != 0 and the subspace estimator
    "allen_cahn-subspace": ("configs/sine_gordon_1k.yaml", ["pde.name=allen_cahn", "pde.dim=40"]),
    # a diffusion and drift of x (trace, along), Q's kinks, an output scale (the bias before a Scale)
    "default_risk": (
        "configs/poisson_2d.yaml",
        [
            "pde.name=bsde_default_risk",
            "pde.dim=6",
            "model.output_scale=20",
            "model.input_scale=0.05",
            "estimator.sigma_x=0.2",
        ],
    ),
}


def _loss(model, pde, estimator, points, weight):
    return total_loss(loss_terms(model, pde, estimator, points, 0), weight)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fitted_bias_minimizes_the_first_steps_loss(root, case):
    path, overrides = CASES[case]
    cfg = load_config(root / path, [*SMALL, *overrides, "model.output_init=fit"])
    pde = build_pde(cfg.pde.name, cfg.pde.dim, dict(cfg.pde.params))
    estimator = build_estimator(cfg, pde)
    model = build_model(cfg, pde, torch.float64, torch.device("cpu"))
    points = collocation(pde, cfg, 0, torch.float64, torch.device("cpu"))
    weight = cfg.train.condition_weight
    bias = output_bias(model)
    start = float(bias.detach())
    (slope_before,) = torch.autograd.grad(_loss(model, pde, estimator, points, weight), bias)

    t, before, after = fit_output_bias(model, pde, estimator, points, weight)

    assert float(bias.detach()) == pytest.approx(start + t, rel=1e-12)
    loss = _loss(model, pde, estimator, points, weight)
    assert float(loss.detach()) == pytest.approx(after, rel=1e-9)  # the interpolated loss is the loss
    assert after < before
    (slope,) = torch.autograd.grad(loss, bias)
    assert abs(float(slope)) <= 1e-6 * abs(float(slope_before)), (float(slope), float(slope_before))
    for shift in (-0.01, 0.01):  # a minimum, not a maximum
        with torch.no_grad():
            bias.add_(shift)
        assert float(_loss(model, pde, estimator, points, weight).detach()) > after
        with torch.no_grad():
            bias.sub_(shift)


def test_level_far_from_zero_is_reached(root):
    """The two-body solution's level: the fitted constant is close to the best constant f
    under the hard constraint (the least-squares fit of u's values), which the network's
    initial output (about 0) is far from."""
    cfg = load_config(root / "configs/sine_gordon_1k.yaml", [*SMALL, "pde.dim=300", "pde.params.coeff_seed=2"])
    pde = build_pde(cfg.pde.name, cfg.pde.dim, dict(cfg.pde.params))
    model = build_model(cfg, pde, torch.float64, torch.device("cpu"))
    points = collocation(pde, cfg, 0, torch.float64, torch.device("cpu"))
    t, _, _ = fit_output_bias(model, pde, build_estimator(cfg, pde), points, cfg.train.condition_weight)
    X = points["domain"].X
    B = 1 - (X * X).sum(1)
    best = float((B * pde.exact(X)).sum() / (B * B).sum())
    assert abs(best) > 10
    assert t == pytest.approx(best, rel=0.05)


def test_a_model_without_an_output_bias_is_refused():
    with pytest.raises(ValueError, match=r"model\.output_init=fit needs"):
        output_bias(torch.nn.Sequential(torch.nn.Linear(3, 1, bias=False)))


def test_output_scale_multiplies_the_network_and_keeps_its_state():
    """model.output_scale: the body's last module multiplies by the constant; the weights (and
    what a checkpoint holds) are those of the unscaled network."""
    torch.manual_seed(0)
    from dstein.models import MLP

    plain, scaled = MLP(5, 8, 2, "gelu"), MLP(5, 8, 2, "gelu", output_scale=20.0)
    scaled.load_state_dict(plain.state_dict())
    X = torch.randn(7, 5)
    assert torch.allclose(scaled(X), 20.0 * plain(X)) and list(scaled.state_dict()) == list(plain.state_dict())
    assert output_bias(scaled) is scaled.body[-2].bias
