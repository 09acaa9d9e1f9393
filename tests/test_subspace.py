"""The subspace Stein estimator (MATH.md section 3) against closed forms and against the
full-space antithetic estimator, and memory-bounded chunks (float64 unless stated)."""

from __future__ import annotations

import math

import pytest
import torch
from closed_forms import LayeredQuadratic, LayeredSin, SinWave
from test_estimators import NEEDS, NEEDS_T, ST, SX, assert_within_se, points, repeats

import dstein
from dstein.estimators import make_spec
from dstein.estimators.sharded import deal_chunks
from dstein.estimators.stein import partial_sums
from dstein.estimators.subspace import InputSubspace
from dstein.models import MLP


@pytest.mark.parametrize("d", [1, 5, 50])
@pytest.mark.parametrize("family", [LayeredSin, LayeredQuadratic])
@pytest.mark.parametrize("time", [False, True])
def test_subspace_matches_closed_form(d, family, time):
    fn, X = family(d, time), points(d, time)
    needs = NEEDS_T if time else NEEDS
    est = repeats(fn, X, "stein-subspace", needs, samples=256, reps=40, time=time)
    exact = fn.smoothed(X, SX, ST if time else 0.0)
    for k in needs:
        assert_within_se(est[k], exact[k], name=f"subspace {family.__name__} d={d} {k}")


def test_rank_is_the_row_space_dimension():
    X = points(50, True)
    spec = make_spec("stein-subspace", NEEDS_T, samples=8, sigma_x=SX, sigma_t=ST)
    assert InputSubspace(LayeredQuadratic(50, True, k=6), X, spec).rank == 6
    assert InputSubspace(LayeredSin(50, True), X, spec).rank == 1
    assert InputSubspace(LayeredQuadratic(3, True, k=6), points(3, True), spec).rank == 3  # d < width
    V = InputSubspace(MLP(51, 16, 2).double(), X, spec).V
    assert torch.allclose(V.T @ V, torch.eye(16, dtype=V.dtype), atol=1e-10)


def test_model_without_linear_input_layer_is_refused():
    with pytest.raises(ValueError, match=r"stein-subspace needs a model whose first layer is linear.*SinWave has no"):
        dstein.estimate(SinWave(5, False), points(5, False), method="stein-subspace", needs={"lap"}, samples=8,
                        sigma_x=SX)  # fmt: skip


def mlp_estimates(method: str, reps: int, d: int = 40, width: int = 12, samples: int = 512):
    """Estimates and the parameter gradient of an HJB-style loss that is linear in them
    (its expected gradient is then the same for every unbiased estimator) on a tanh MLP."""
    torch.manual_seed(5)
    model = MLP(d + 1, width, 2).double()
    X = points(d, True, n=4)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("u", "u_t", "grad_sq", "lap", "param_grad")}
    for r in range(reps):
        D = dstein.estimate(model, X, method=method, needs={"u", "u_t", "grad_sq", "lap"}, samples=samples,
                            sigma_x=SX, sigma_t=ST, seed=r)  # fmt: skip
        loss = (D.u_t + D.lap - D.grad_sq + D.u).sum()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        for k in ("u", "u_t", "grad_sq", "lap"):
            out[k].append(getattr(D, k).detach())
        out["param_grad"].append(torch.cat([g.reshape(-1) for g in grads]))
    return {k: torch.stack(v) for k, v in out.items()}


def test_subspace_agrees_with_antithetic_on_an_mlp():
    """Same expectations for value, u_t, grad_sq, lap and the parameter gradient (with the
    basis held constant): the difference of the means is within its standard error."""
    a, b = mlp_estimates("stein-subspace", 40), mlp_estimates("stein-antithetic", 40)
    for k in a:
        diff = a[k].mean(0) - b[k].mean(0)
        se = torch.sqrt(a[k].var(0) / 40 + b[k].var(0) / 40)
        z = diff / se
        if a[k].dim() == 2 and k != "param_grad":
            assert torch.all(z.abs() < 4), (k, z)
        else:  # 600 gradient components: their squared z-scores sum like chi^2(600)
            m = z.numel()
            assert (float((z * z).sum()) - m) / math.sqrt(2 * m) < 4, k
    # and it is the less noisy one
    assert torch.all(a["lap"].var(0) < b["lap"].var(0))


def test_subspace_laplacian_variance_is_5x_lower_at_d_1000():
    d, width = 1000, 64
    torch.manual_seed(0)
    model = MLP(d, width, 2).double()
    X = points(d, False, n=3)
    var = {}
    for method in ("stein-subspace", "stein-antithetic"):
        est = torch.stack([
            dstein.estimate(model, X, method=method, needs={"lap"}, samples=256, sigma_x=0.05, seed=r).lap.detach()
            for r in range(30)
        ])  # fmt: skip
        var[method] = est.var(0)
    ratio = var["stein-antithetic"] / var["stein-subspace"]
    assert torch.all(ratio > 5), ratio


def test_subspace_partial_sums_add_up_over_ranks():
    fn, X = MLP(8, 5, 2).double(), points(7, True, n=4)
    spec = make_spec("stein-subspace", NEEDS_T, samples=96, sigma_x=SX, sigma_t=ST, chunk=16)
    space = InputSubspace(fn, X, spec)
    full = partial_sums(fn, X, spec, range(spec.num_chunks), space=space)
    for world in (2, 3):
        parts = [partial_sums(fn, X, spec, deal_chunks(spec.num_chunks, r, world), space=space) for r in range(world)]
        for key, value in full.items():
            assert torch.allclose(sum(p[key] for p in parts), value, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["stein", "stein-antithetic", "stein-subspace"])
def test_recompute_gives_the_same_estimates_and_gradients(method):
    torch.manual_seed(1)
    model = MLP(9, 8, 2).double()
    X = points(8, True, n=5)
    results = []
    for recompute in (False, True):
        D = dstein.estimate(model, X, method=method, needs=set(NEEDS_T), samples=64, chunk=16, sigma_x=SX,
                            sigma_t=ST, recompute=recompute)  # fmt: skip
        loss = (D.u_t + D.lap - D.grad_sq + D.u * D.u).sum()
        results.append([loss.detach(), *torch.autograd.grad(loss, list(model.parameters()))])
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_auto_method_is_subspace_when_d_exceeds_the_width(root):
    from dstein.config import load_config

    def method(*overrides: str) -> str:
        return load_config(root / "configs/quickstart.yaml", ["estimator.method=auto", *overrides]).estimator.method

    assert method("pde.dim=200", "model.width=128") == "stein-subspace"
    assert method("pde.dim=100", "model.width=128") == "stein-antithetic"
