"""The subspace Stein estimator (MATH.md section 3) against closed forms and against the
full-space antithetic estimator, and memory-bounded chunks (float64 unless stated)."""

from __future__ import annotations

import math

import pytest
import torch
from closed_forms import LayeredQuadratic, LayeredSin, SinWave
from test_estimators import NEEDS, NEEDS_T, ST, SX, assert_within_se, points, repeats

import dstein
from dstein.estimators import make_space, make_spec
from dstein.estimators.sharded import deal_chunks
from dstein.estimators.stein import partial_sums, stein_estimate_halves
from dstein.estimators.subspace import FirstLayer, InputSubspace
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


@pytest.mark.parametrize("c, ct", [(1.0, None), (0.01, None), (0.01, (0.5, 3.0))])
@pytest.mark.parametrize("gram", [True, False])
def test_first_layer_products_equal_the_plain_graph(c, ct, gram):
    """FirstLayer (no scaled or sliced copy of W in the graph) gives the values and the
    gradients, for W and for the points, of the same products written with plain autograd:
    ``c x Wx^T``, ``ct * W[:, d:]`` and ``c^2 Wx sg(Wx)^T``."""
    gen = torch.Generator().manual_seed(3)
    d, k, n, B = 9, 5, 0 if ct is None else len(ct), 4
    W0 = torch.randn(k, d + n, generator=gen, dtype=torch.float64)
    Y0 = torch.randn(B, d + n, generator=gen, dtype=torch.float64)
    scale_t = None if ct is None else torch.tensor(ct, dtype=torch.float64)
    weights = [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in [(B, k), (k, n), (k, k)]]

    def loss(outputs):
        return sum((w * o).sum() for w, o in zip(weights[: len(outputs)], outputs, strict=True))

    W, Y = W0.clone().requires_grad_(), Y0.clone().requires_grad_()
    fused = FirstLayer.apply(W, Y, d, c, scale_t, gram)
    loss(fused).backward()
    W_ref, Y_ref = W0.clone().requires_grad_(), Y0.clone().requires_grad_()
    Wx = W_ref[:, :d] * c
    plain = [Y_ref[:, :d] @ Wx.T, W_ref[:, d:] * (1.0 if scale_t is None else scale_t)]
    if gram:
        plain.append(Wx @ Wx.detach().T)
    loss(plain).backward()
    assert len(fused) == len(plain)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(W.grad, W_ref.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(Y.grad, Y_ref.grad, rtol=1e-12, atol=1e-14)


def test_along_is_linear_in_the_directions():
    """``along`` is ``w . (V coords)``: its gradient with respect to the directions (the points,
    in adversarial steps) is ``V coords`` alone; the correction term, zero for every w, adds
    nothing to it."""
    d, B, m = 40, 3, 2
    torch.manual_seed(5)
    model = MLP(d + 1, 8, 2, input_scale=0.1, dim=d).double()
    X = points(d, True, n=B)
    spec = make_spec("stein-subspace", NEEDS_T, samples=8, sigma_x=SX, sigma_t=ST)
    space = InputSubspace(model, X, spec)
    coords = torch.randn(B, space.rank, dtype=torch.float64)
    directions = torch.randn(B, m, d, dtype=torch.float64, requires_grad=True)
    space.along(coords, directions).sum().backward()
    expected = space.spatial(coords).unsqueeze(1).expand(B, m, d)
    torch.testing.assert_close(directions.grad, expected, rtol=1e-10, atol=1e-12)


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


@pytest.mark.parametrize("d, rank, cholesky", [(40, 8, True), (40, 5, False), (6, 6, False)])
def test_the_scaled_basis_is_orthonormal_and_spans_the_row_space(d, rank, cholesky):
    """``V = Wx^T scaled_basis(Wx Wx^T)`` is an orthonormal basis of Wx's row space: from the
    Cholesky factor where the first layer has full rank width (B = L^-T, upper triangular), from
    the eigendecomposition where it has not (d < width, or rank-deficient weights)."""
    from dstein.estimators.subspace import scaled_basis

    gen = torch.Generator().manual_seed(d + rank)
    width = 8
    Wx = (torch.randn(width, rank, generator=gen, dtype=torch.float64)
          @ torch.randn(rank, d, generator=gen, dtype=torch.float64)) / d  # fmt: skip
    B = scaled_basis(Wx @ Wx.T, d)
    assert torch.equal(B, scaled_basis(Wx @ Wx.T))  # knowing d < width only skips a factorization that fails
    V = Wx.T @ B
    assert V.shape == (d, rank)
    assert torch.allclose(V.T @ V, torch.eye(rank, dtype=torch.float64), atol=1e-10)
    projected = Wx @ V @ V.T  # each row of Wx lies in span(V)
    assert torch.allclose(projected, Wx, atol=1e-10)
    assert torch.equal(B, B.triu()) is cholesky


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


@pytest.mark.parametrize("method", ["stein", "stein-antithetic", "stein-subspace"])
def test_one_evaluation_for_all_chunks_gives_the_chunk_by_chunk_halves(method):
    """Where gradients are kept, the chunks of both halves of a pair are evaluated at once
    (``_fused_sums``); chunk by chunk (recomputed) gives the same estimates and parameter
    gradients up to the rounding of the sums, on a rank's share of the chunks as on all of them."""
    torch.manual_seed(2)
    model = MLP(9, 8, 2).double()
    X = points(8, True, n=5)
    spec = make_spec(method, NEEDS_T, samples=96, sigma_x=SX, sigma_t=ST, chunk=16).at(3, 1)
    space = make_space(model, X, spec)
    for chunks in (range(spec.num_chunks), deal_chunks(spec.num_chunks, 1, 2)):
        results = []
        for recompute in (False, True):
            first, second = stein_estimate_halves(model, X, spec, space, chunks=chunks, recompute=recompute)
            loss = (first.u_t * second.u_t + first.lap * second.lap + first.grad_sq + first.u * second.u).sum()
            results.append([loss.detach(), *torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)])
        for a, b in zip(*results, strict=True):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_auto_method_is_subspace_when_d_exceeds_the_width(root):
    from dstein.config import load_config

    def method(*overrides: str) -> str:
        return load_config(root / "configs/quickstart.yaml", ["estimator.method=auto", *overrides]).estimator.method

    assert method("pde.dim=200", "model.width=128") == "stein-subspace"
    assert method("pde.dim=100", "model.width=128") == "stein-antithetic"


# --- the radial family: a first layer that also sees |x|^2 (docs/MATH.md section 10) ---------


class LinearRadial(torch.nn.Module):
    """g = c . (W x + w t + b + a q), q = (|x|^2 - shift) / scale: a linear body, so that the
    smoothed model is a closed form: f = g + (c . a) d sx^2 / scale, grad f = W'c + (c . a) 2x /
    scale, lap f = (c . a) 2d / scale, u_t = c . w."""

    def __init__(self, d: int, time: bool, k: int = 5, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.d, self.time = d, time
        self.input_layer = torch.nn.Linear(d + (1 if time else 0), k).double()
        with torch.no_grad():
            self.input_layer.weight.copy_(torch.randn(k, d + (1 if time else 0), generator=gen) / math.sqrt(d))
        self.radial = torch.nn.Linear(1, k, bias=False).double()
        with torch.no_grad():
            self.radial.weight.copy_(torch.randn(k, 1, generator=gen))
        self.c = torch.randn(k, generator=gen, dtype=torch.float64)
        self.shift, self.scale = torch.tensor(float(d)), torch.tensor(math.sqrt(2.0 * d))

    def body(self, h):
        return (h @ self.c).unsqueeze(-1)

    def quadratic_feature(self):
        from dstein.models import QuadraticFeature

        return QuadraticFeature(self.radial.weight, self.shift, self.scale, self.d)

    def forward(self, X):
        q = ((X[:, : self.d] ** 2).sum(1, keepdim=True) - self.shift) / self.scale
        return self.body(self.input_layer(X) + self.radial(q))

    def smoothed(self, X, sx, st):
        ca = float(self.c @ self.radial.weight[:, 0].detach())
        W = self.input_layer.weight.detach()
        grad = (W[:, : self.d].T @ self.c).unsqueeze(0) + ca * 2 * X[:, : self.d] / self.scale
        out = {
            "u": self.forward(X).detach().squeeze(-1) + ca * self.d * sx**2 / self.scale,
            "grad": grad,
            "grad_sq": (grad * grad).sum(1),
            "lap": torch.full((X.shape[0],), ca * 2 * self.d / float(self.scale), dtype=X.dtype),
        }
        if self.time:
            out["u_t"] = torch.full((X.shape[0],), float(self.c @ W[:, self.d]), dtype=X.dtype)
        return out


@pytest.mark.parametrize("d", [3, 6, 12])  # width 5: the row space is R^3; one direction beyond it; seven
@pytest.mark.parametrize("laplacian", ["stein", "difference"])
def test_radial_subspace_matches_closed_form(d, laplacian):
    fn, X = LinearRadial(d, True), points(d, True)
    est = {k: [] for k in NEEDS_T}
    for r in range(40):
        D = dstein.estimate(fn, X, method="stein-subspace", needs=NEEDS_T, samples=256, sigma_x=SX, sigma_t=ST,
                            seed=r, laplacian=laplacian)  # fmt: skip
        for k in NEEDS_T:
            est[k].append(getattr(D, k).detach())
    exact = fn.smoothed(X, SX, ST)
    for k in NEEDS_T:
        assert_within_se(torch.stack(est[k]), exact[k], name=f"radial d={d} {laplacian} {k}")


def test_radial_subspace_rank_and_center():
    from dstein.estimators import make_space
    from dstein.models import RadialMLP

    spec = make_spec("stein-subspace", NEEDS_T, samples=8, sigma_x=SX, sigma_t=ST)
    for d, rank, dof in ((3, 3, 0), (6, 6, 0), (12, 6, 6)):  # width 5: r = min(5, d), + x's direction if r < d
        model = RadialMLP(d + 1, d, 5, 2, "gelu", shift=float(d), scale=2.0).double()
        X = points(d, True)
        space = make_space(model, X, spec)
        assert (space.rank, space.width, space.dof) == (rank, rank + 1, dof)
        assert torch.allclose(space.center(), model(X).reshape(-1), rtol=1e-12, atol=1e-12)


def radial_estimates(
    method: str, reps: int, seed0: int, laplacian: str, d: int = 12, width: int = 5, input_scale: float = 1.0,
    feature: str = "square",
):  # fmt: skip
    """Estimates, and the parameter gradient of a loss linear in them, for a radial gelu MLP;
    ``along`` with HJB's hard-constraint direction grad g(x) = 2x / (1 + |x|^2)."""
    from dstein.models import RadialMLP

    torch.manual_seed(3)
    model = RadialMLP(d + 1, d, width, 2, "gelu", shift=float(d), scale=math.sqrt(2.0 * d), input_scale=input_scale,
                      feature=feature)  # fmt: skip
    model = model.double()
    with torch.no_grad():
        model.radial.weight.mul_(3.0)
    X = points(d, True, n=4)
    x = X[:, :d]
    directions = (2 * x / (1 + (x * x).sum(1, keepdim=True))).unsqueeze(1)
    needs = ("u", "u_t", "grad_sq", "lap", "along")
    out: dict[str, list[torch.Tensor]] = {k: [] for k in (*needs, "grad", "param_grad")}
    for r in range(reps):
        kwargs = {"samples": 512, "sigma_x": SX, "sigma_t": ST, "seed": seed0 + r, "laplacian": laplacian}
        D = dstein.estimate(model, X, method=method, needs=needs, directions=directions, **kwargs)
        loss = (D.u_t + D.lap - D.grad_sq + D.u + 3 * D.along[:, 0]).sum()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        for k in needs:
            out[k].append(getattr(D, k).detach())
        out["grad"].append(dstein.estimate(model, X, method=method, needs={"grad"}, **kwargs).grad.detach())
        out["param_grad"].append(torch.cat([g.reshape(-1) for g in grads]))
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize(
    ("laplacian", "input_scale", "feature"),
    [("stein", 1.0, "square"), ("difference", 1.0, "square"), ("difference", 0.3, "square"), ("stein", 1.0, "log"),
     ("difference", 1.0, "log"), ("difference", 1.0, "both")],
)  # fmt: skip
def test_radial_subspace_agrees_with_antithetic_on_a_radial_mlp(laplacian, input_scale, feature):
    """Value, u_t, grad, grad_sq, lap, along (x's direction) and the parameter gradient (V and
    e held constant) have the full-space estimator's means: every difference within its
    standard error (independent noise: other seeds). With model.input_scale the estimator
    reads the weights the layer applies (input_weight); with the log feature it follows
    log(1 + |x + delta|^2) (model.radial_feature=log), with both features both columns' changes."""
    reps = 40
    a = radial_estimates("stein-subspace", reps, 0, laplacian, input_scale=input_scale, feature=feature)
    b = radial_estimates("stein-antithetic", reps, 10_000, laplacian, input_scale=input_scale, feature=feature)
    for k in a:
        z = (a[k].mean(0) - b[k].mean(0)) / torch.sqrt(a[k].var(0) / reps + b[k].var(0) / reps)
        if k in ("grad", "param_grad"):  # many components: their squared z-scores sum like chi^2
            m = z.numel()
            assert (float((z * z).sum()) - m) / math.sqrt(2 * m) < 4, k
        else:
            assert torch.all(z.abs() < 4), (k, z)


def test_radial_subspace_costs_and_varies_alike_at_every_d():
    """The difference Laplacian's spread does not grow with d (the feature's 1 / scale keeps
    the |x|^2 curvature O(1)), and the noise per sample is width + 2 numbers, not d + 1."""
    from dstein.estimators import make_space
    from dstein.models import RadialMLP

    spread = {}
    for d in (50, 2000):
        torch.manual_seed(0)
        model = RadialMLP(d + 1, d, 16, 2, "gelu", shift=float(d), scale=math.sqrt(2.0 * d)).double()
        X = points(d, True)
        kwargs = {"needs": {"lap"}, "samples": 256, "sigma_x": 0.05, "sigma_t": 0.05, "laplacian": "difference"}
        spec = make_spec("stein-subspace", samples=256, sigma_x=0.05, sigma_t=0.05, needs={"lap"})
        assert make_space(model, X, spec).width == 16 + 2
        est = torch.stack([dstein.estimate(model, X, method="stein-subspace", seed=r, **kwargs).lap.detach()
                           for r in range(30)])  # fmt: skip
        spread[d] = float(est.std(0).mean())
    assert spread[2000] < 2 * spread[50], spread


def test_radial_subspace_partial_sums_add_up_over_ranks_and_point_groups():
    from dstein.estimators import make_space
    from dstein.models import RadialMLP

    model = RadialMLP(13, 12, 5, 2, "gelu", shift=12.0, scale=5.0).double()
    X = points(12, True, n=4)
    spec = make_spec("stein-subspace", NEEDS_T, samples=96, sigma_x=SX, sigma_t=ST, chunk=16)
    full = partial_sums(model, X, spec, range(spec.num_chunks), space=make_space(model, X, spec))
    for world in (2, 3):
        parts = [partial_sums(model, X, spec, deal_chunks(spec.num_chunks, r, world), space=make_space(model, X, spec))
                 for r in range(world)]  # fmt: skip
        for key, value in full.items():
            assert torch.allclose(sum(p[key] for p in parts), value, rtol=1e-12, atol=1e-12)
    rows = X[1:3]  # a point group's rows: the same noise, its own c per sample included
    part = partial_sums(model, rows, spec, range(spec.num_chunks), rows=(1, 4), space=make_space(model, rows, spec))
    for key, value in part.items():
        assert torch.allclose(value, full[key][1:3], rtol=1e-12, atol=1e-12), key
