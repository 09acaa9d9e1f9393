"""The PDEs of MATH.md section 5: exact solutions, samplers, the HJB Monte Carlo truth."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import dstein
from dstein.noise import counter_seed
from dstein.pdes import REGISTRY, build_pde
from dstein.pdes.hjb import HJB, cole_hopf, cole_hopf_radial


class Exact(torch.nn.Module):
    """An ExactPDE's solution as a model, so autograd can differentiate it."""

    def __init__(self, pde):
        super().__init__()
        self.pde = pde

    def forward(self, X):
        return self.pde.exact(X).unsqueeze(-1)


def derivatives(model, pde, X):
    return dstein.estimate(
        model, X, method="autograd", needs=pde.needs | {"u", "grad"}, sigma_t=1.0 if pde.time_dependent else None
    )


HEAT_MODES = {"solution": "modes", "modes": 3, "frequency": 2.0}


@pytest.mark.parametrize(
    "name, dim, params",
    [("poisson", 2, None), ("poisson", 7, None), ("heat", 3, None), ("heat", 100, None), ("heat", 3, HEAT_MODES),
     ("heat", 100, HEAT_MODES), ("sine_gordon", 2, None), ("sine_gordon", 9, None), ("allen_cahn", 5, None)],
)  # fmt: skip
def test_exact_solution_has_zero_residual_and_matching_gradient(name, dim, params):
    pde = build_pde(name, dim, params)
    gen = torch.Generator().manual_seed(0)
    X = pde.sample_domain(64, gen)
    D = derivatives(Exact(pde), pde, X)
    assert pde.residual(X, D).abs().max() < 1e-10
    assert torch.allclose(D.grad, pde.exact_grad(X), atol=1e-12)
    for kind in pde.conditions:
        Xc = pde.sample_condition(kind, 64, gen)
        assert torch.allclose(pde.condition_target(kind, Xc), pde.exact(Xc))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_samplers_stay_on_their_sets(dtype):
    """Test points are drawn in float64, training points in float32 (``training_points``)."""
    gen = torch.Generator().manual_seed(1)
    poisson = build_pde("poisson", 4)
    Xb = poisson.training_points("boundary", 500, gen, dtype)
    assert Xb.dtype == dtype
    assert ((Xb == 0) | (Xb == 1)).any(1).all() and (Xb >= 0).all() and (Xb <= 1).all()
    heat = build_pde("heat", 5, {"T": 2.0})
    Xd = heat.training_points("domain", 500, gen, dtype)
    assert Xd.dtype == dtype
    assert (Xd[:, :-1].norm(dim=1) <= 1).all() and (Xd[:, -1] >= 0).all() and (Xd[:, -1] <= 2).all()
    norms = heat.training_points("boundary", 50, gen, dtype)[:, :-1].norm(dim=1)
    assert torch.allclose(norms, torch.ones(50, dtype=dtype))
    assert (heat.training_points("initial", 50, gen, dtype)[:, -1] == 0).all()
    hjb = build_pde("hjb", 6, {"mu": 1.0, "T": 1.0})
    XT = hjb.training_points("terminal", 50, gen, dtype)
    assert XT.dtype == dtype and (XT[:, -1] == 1.0).all()
    Xh = hjb.training_points("domain", 4000, gen, dtype)
    assert abs(float(Xh[:, :-1].mean())) < 4 / math.sqrt(Xh[:, :-1].numel())  # N(0, 1) coordinates
    assert abs(float(Xh[:, :-1].var()) - 1) < 4 * math.sqrt(2 / Xh[:, :-1].numel())
    assert (Xh[:, -1] >= 0).all() and (Xh[:, -1] <= 1).all()
    moved = hjb.project(torch.tensor([[0.0] * 6 + [1.7], [0.0] * 6 + [-0.2]], dtype=dtype))
    assert moved[:, -1].tolist() == [1.0, 0.0]


def test_test_points_are_float64_and_a_sampler_without_dtype_still_trains():
    """``sample_test`` keeps the float64 stream (test sets and their truths do not change);
    a user sampler written without a ``dtype`` parameter is called as before and converted."""
    from tests.user_pde import Reaction

    class Legacy(Reaction):
        def sample_domain(self, n, gen):
            return torch.rand(n, self.dim, generator=gen, dtype=torch.float64)

    hjb = build_pde("hjb", 6)
    X = hjb.test_points(0, 10, seed=3)
    assert X.dtype == torch.float64
    gen = torch.Generator().manual_seed(counter_seed(3, 0, 0x54455354))
    x, t = (
        torch.randn(1024, 6, generator=gen, dtype=torch.float64),
        torch.rand(1024, 1, generator=gen, dtype=torch.float64),
    )
    assert torch.equal(X, torch.cat([x, t], 1)[:10])
    legacy = Legacy(3)
    a = legacy.training_points("domain", 5, torch.Generator().manual_seed(0), torch.float32)
    b = legacy.sample_domain(5, torch.Generator().manual_seed(0)).float()
    assert a.dtype == torch.float32 and torch.equal(a, b)


def test_ball_sampler_is_uniform_in_radius():
    """Uniform in the d-ball: P(|x| <= r) = r^d."""
    from dstein.pdes.base import uniform_ball

    x = uniform_ball(20000, 3, torch.Generator().manual_seed(0))
    frac = float((x.norm(dim=1) <= 0.5).double().mean())
    assert abs(frac - 0.125) < 4 * math.sqrt(0.125 * 0.875 / 20000)


@pytest.mark.parametrize("d, nodes", [(1, 350), (2, 200)])
def test_hjb_cole_hopf_solves_the_equation(d, nodes):
    """The Cole-Hopf formula with Gauss-Hermite quadrature (the exact solution up to quadrature
    error) makes the HJB residual vanish, differentiated by autograd in float64."""
    x1, w1 = np.polynomial.hermite_e.hermegauss(nodes)
    grids = np.meshgrid(*([x1] * d), indexing="ij")
    z = torch.tensor(np.stack([g.ravel() for g in grids], 1))
    w = torch.tensor(np.prod(np.meshgrid(*([w1 / w1.sum()] * d), indexing="ij"), axis=0).ravel())
    pde = HJB(d, mu=1.0, T=1.0)

    class Solution(torch.nn.Module):
        def forward(self, X):
            return cole_hopf(X, z, w, pde.mu, pde.T).unsqueeze(-1)

    gen = torch.Generator().manual_seed(3)
    X = pde.sample_domain(8, gen)
    X[:, -1] = X[:, -1].clamp(max=0.9)
    D = derivatives(Solution(), pde, X)
    assert pde.residual(X, D).abs().max() < 1e-6
    XT = pde.sample_condition("terminal", 8, gen)  # and it meets the terminal condition
    assert torch.allclose(Solution()(XT).squeeze(-1), pde.condition_target("terminal", XT), atol=1e-12)


def test_hjb_monte_carlo_classic_value():
    """Deep BSDE's check: d = 100, x = 0, t = 0: u = 4.5901617 within 3 standard errors."""
    u, grad, se = cole_hopf_radial(np.zeros((1, 100)), np.zeros(1), 1.0, 1.0, 100_000, seed=0)
    assert abs(u[0] - 4.5901617) < 3 * se[0]
    assert se[0] < 1e-3 and np.all(grad == 0)


def test_hjb_gradient_is_the_derivative_of_the_value():
    """Common random numbers: central differences of the MC value match the MC gradient."""
    rng = np.random.default_rng(5)
    x, t = rng.standard_normal((4, 8)), np.array([0.0, 0.3, 0.6, 0.95])
    _, grad, _ = cole_hopf_radial(x, t, 1.0, 1.0, 20_000, seed=2)
    h = 1e-5
    for i in range(8):
        e = np.zeros(8)
        e[i] = h
        up = cole_hopf_radial(x + e, t, 1.0, 1.0, 20_000, seed=2)[0]
        down = cole_hopf_radial(x - e, t, 1.0, 1.0, 20_000, seed=2)[0]
        assert np.allclose((up - down) / (2 * h), grad[:, i], atol=1e-7)


def test_hjb_radial_monte_carlo_matches_full_dimensional_monte_carlo():
    d, n = 6, 200_000
    rng = np.random.default_rng(7)
    x, t = rng.standard_normal((3, d)), np.array([0.0, 0.4, 0.8])
    u, _, se = cole_hopf_radial(x, t, 1.0, 1.0, n, seed=1)
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    X = torch.tensor(np.c_[x, t])
    full = cole_hopf(X, z, torch.full((n,), 1.0 / n, dtype=torch.float64), 1.0, 1.0).numpy()
    # two independent estimates: their difference has standard error about sqrt(2) se
    assert np.all(np.abs(full - u) < 4 * math.sqrt(2) * se)


@pytest.mark.parametrize("mu", [1.0, 0.6])
def test_anisotropic_hjb_quadrature_solves_the_equation(mu):
    """hjb_aniso's truth (a one-dimensional quadrature of the Cole-Hopf formula, no sampling)
    differentiated by autograd in float64: the HJB residual vanishes, the terminal condition
    holds, and the gradient it returns is the derivative of its value."""
    pde = build_pde("hjb_aniso", 3, {"mu": mu, "anisotropy": 0.5, "a_seed": 4})
    assert pde.a.min() >= 0.5 and pde.a.max() <= 1.5 and pde.a.std() > 0.1

    class Solution(torch.nn.Module):
        def forward(self, X):
            return pde.solution(X)[0].unsqueeze(-1)

    gen = torch.Generator().manual_seed(3)
    X = pde.sample_domain(8, gen)
    X[:, -1] = X[:, -1].clamp(max=0.9)
    D = derivatives(Solution(), pde, X)
    assert pde.residual(X, D).abs().max() < 1e-9
    assert torch.allclose(D.grad, pde.solution(X)[1], rtol=1e-9, atol=1e-12)
    XT = pde.sample_condition("terminal", 8, gen)
    assert torch.allclose(pde.solution(XT)[0], pde.condition_target("terminal", XT), atol=1e-12)


def test_anisotropic_hjb_quadrature_matches_monte_carlo_and_the_radial_case():
    d, n = 6, 400_000
    rng = np.random.default_rng(7)
    x, t = rng.standard_normal((3, d)), np.array([0.0, 0.4, 0.8])
    X = torch.tensor(np.c_[x, t])
    radial = build_pde("hjb_aniso", d, {"anisotropy": 0.0}).truth(X, 0, 0)  # a = 1: hjb itself
    u, _, se = cole_hopf_radial(x, t, 1.0, 1.0, n, seed=1)
    assert np.all(np.abs(radial.u.numpy() - u) < 4 * se)
    pde = build_pde("hjb_aniso", d, {"anisotropy": 0.5})
    test = pde.truth(X, 0, 0)
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for i in range(3):  # exp(-g(x + s Z)) by plain Monte Carlo
        Y = X[i, :d] + math.sqrt(2 * (1 - t[i])) * z
        w = torch.exp(-pde.terminal(Y))
        mc = -math.log(float(w.mean()))
        assert abs(float(test.u[i]) - mc) < 4 * float(w.std()) / math.sqrt(n) / float(w.mean())
        grad = (w.unsqueeze(1) * pde.terminal_grad(Y)).mean(0) / w.mean()
        assert torch.allclose(test.grad[i], grad, atol=5e-3)
    name, X0, value, source = pde.start()
    assert name == "u(0,0)" and value == float(pde.truth(X0, 0, 0).u[0]) and "quadrature" in source


def test_anisotropic_hjb_transform_derivatives_are_exact():
    pde = build_pde("hjb_aniso", 5, {"anisotropy": 0.5})
    for smoothing in (0.0, 0.3):
        pde.smoothing = smoothing
        X = torch.cat([torch.randn(6, 5, dtype=torch.float64), torch.rand(6, 1, dtype=torch.float64)], 1)
        X.requires_grad_(True)
        T = pde.output_transform(X)
        (grad_A,) = torch.autograd.grad(T.A.sum(), X, create_graph=True)
        lap = sum(torch.autograd.grad(grad_A[:, i].sum(), X, retain_graph=True)[0][:, i] for i in range(5))
        assert torch.allclose(grad_A[:, :5], T.A_grad) and torch.allclose(lap, T.A_lap)
        x = X.detach()[:, :5]
        shifted = torch.log((1 + (x * x) @ pde.a + smoothing**2 * pde.a.sum()) / 2)
        assert torch.allclose(T.A.detach(), shifted)  # smoothing 0: g itself


def test_heat_modes_are_neither_radial_nor_a_constant_under_the_constraint():
    """heat's ``modes`` solution (the paper's |x|^2 / (2d) + t is both): at d = 100 the best
    function of t, the best radial function and the best constant f in u = u(x, 0) + t f all
    stay far from it, in value and gradient; the modes are the seed's."""
    from dstein.evaluation import baselines

    heat = build_pde("heat", 100, {"solution": "modes"})
    got = baselines(heat, heat.test_set(1000, seed=0, truth_samples=2))
    assert min(v["l2_rel"] for v in got.values()) > 0.15 and min(v["grad_l2_rel"] for v in got.values()) > 0.7
    assert torch.equal(build_pde("heat", 100, {"solution": "modes"}).W, heat.W)
    assert not torch.equal(build_pde("heat", 100, {"solution": "modes", "mode_seed": 1}).W, heat.W)
    assert heat.describe()["solution"] == "modes" and "solution" not in build_pde("heat", 100).describe()


def test_hjb_test_set_carries_standard_errors():
    pde = build_pde("hjb", 10, {"mu": 1.0, "T": 1.0})
    test = pde.test_set(50, seed=0, truth_samples=5000)
    assert test.X.shape == (50, 11) and test.grad.shape == (50, 10)
    assert test.u_se is not None and (test.u_se > 0).all() and (test.u_se < 0.05).all()


def test_registry_and_user_pde():
    assert set(REGISTRY) == {
        "poisson",
        "heat",
        "hjb",
        "hjb_aniso",
        "sine_gordon",
        "allen_cahn",
        "bsde_allen_cahn",
        "bsde_default_risk",
        "bsde_diff_rate",
    }
    pde = build_pde("ignored", 3, target="user_pde:Reaction")
    X = pde.sample_domain(16, torch.Generator().manual_seed(0))
    D = derivatives(Exact(pde), pde, X)
    assert pde.residual(X, D).abs().max() < 1e-10


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="wave", dim=2), "pde.name='wave' is not one of"),
        (dict(name="hjb", dim=0), "pde.dim=0"),
        (dict(name="hjb", dim=2, params={"nu": 1}), "pde.params"),
        (dict(name="hjb", dim=2, params={"mu": -1}), "pde.params.mu"),
        (dict(name="x", dim=2, target="nowhere.module:Cls"), "cannot be imported"),
        (dict(name="x", dim=2, target="no_colon"), "package.module:ClassName"),
        (dict(name="x", dim=2, target="math:sqrt"), "not a subclass"),
        (dict(name="sine_gordon", dim=1), "pde.dim=1: the two-body solution couples neighbouring coordinates"),
        (dict(name="allen_cahn", dim=3, params={"coeff_seed": 0.5}), "pde.params.coeff_seed=0.5 must be an integer"),
        (dict(name="hjb_aniso", dim=3, params={"anisotropy": 1.0}), r"pde.params.anisotropy=1.0 must be >= 0 and < 1"),
        (dict(name="hjb_aniso", dim=3, params={"a_seed": -1}), "pde.params.a_seed=-1 must be an integer >= 0"),
        (dict(name="heat", dim=3, params={"solution": "waves"}), "pde.params.solution='waves' must be one of"),
        (dict(name="heat", dim=3, params={"solution": "modes", "modes": 0}), "pde.params.modes=0 must be an integer"),
    ],
)
def test_bad_pde_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_pde(**kwargs)


def test_test_points_are_drawn_in_blocks_any_slice_alike():
    """Several ranks write one test set, each drawing only its rows (PDE.test_points)."""
    from dstein.pdes.base import TEST_BLOCK

    pde = build_pde("heat", 3)
    n = 2 * TEST_BLOCK + 100
    whole = pde.test_points(0, n, seed=5)
    cuts = [0, 7, TEST_BLOCK + 3, 2 * TEST_BLOCK, n]
    pieces = [pde.test_points(a, b, seed=5) for a, b in itertools.pairwise(cuts)]
    assert torch.equal(torch.cat(pieces), whole) and whole.shape == (n, 4)
    assert pde.test_points(9, 9, seed=5).shape == (0, 4)
    assert not torch.equal(pde.test_points(0, 10, seed=6), whole[:10])
    assert torch.equal(pde.test_set(50, seed=5, truth_samples=2).X, whole[:50])


def test_test_point_blocks_shrink_at_very_large_dimension(monkeypatch):
    """A block holds at most TEST_BLOCK_ELEMENTS numbers (at d = 10^6 a block of 1024 rows
    was 8 GB); any slice is still the same rows, and below the bound nothing changes."""
    from dstein.pdes import base

    pde = build_pde("sine_gordon", 50)
    before = pde.test_points(0, 40, seed=3)
    assert pde.test_block == base.TEST_BLOCK
    monkeypatch.setattr(base, "TEST_BLOCK_ELEMENTS", 50 * 7 + 3)
    assert pde.test_block == 7
    whole = pde.test_points(0, 40, seed=3)
    assert not torch.equal(whole, before)  # other blocks, other draws
    cuts = [0, 3, 7, 15, 40]
    assert torch.equal(torch.cat([pde.test_points(a, b, seed=3) for a, b in itertools.pairwise(cuts)]), whole)


def test_hjb_reference_value_at_the_origin_matches_deep_bsde():
    """u(0, 0) at d = 100 (Deep BSDE's quadrature value 4.5901617): the d-independent
    Cole-Hopf Monte Carlo agrees within 4 standard errors; other d use the Monte Carlo."""
    import numpy as np

    hjb = build_pde("hjb", 100)
    (X, value, source) = hjb.reference_values()["u(0,0)"]
    assert value == 4.5901617 and "Deep BSDE" in source and torch.equal(X, torch.zeros(1, 101, dtype=torch.float64))
    u, _, se = cole_hopf_radial(np.zeros((1, 100)), np.zeros(1), 1.0, 1.0, 10**6, 0)
    assert abs(u[0] - value) < 4 * se[0], (u[0], se[0])
    other = build_pde("hjb", 20).reference_values()["u(0,0)"]
    assert "Monte Carlo" in other[2] and 2.0 < other[1] < 4.0


def test_hjb_training_points_cover_the_domains_of_dependence():
    """spread = 1: at time s, x ~ N(0, (1 + 2 v s) I), v ~ U(0, 1), so |x|^2 / d lies in
    [1, 1 + 2s] (up to its chi-square spread, sqrt(2/d)); origin = 0.25: a quarter of the
    points follow the diffusion from x = 0 instead, |x|^2 / d = 2s."""
    d, n = 400, 4000
    gen = torch.Generator().manual_seed(0)
    X = HJB(d, spread=1.0, origin=0.25).sample_domain(n, gen)
    r, s = (X[:, :-1] ** 2).sum(1) / d, X[:, -1]
    tol = 5 * math.sqrt(2 / d)  # relative
    near = (r - 2 * s).abs() <= tol * 2 * s
    spread = (r >= 1 - tol) & (r <= (1 + 2 * s) * (1 + tol))
    assert bool((near | spread).all())
    early = s < 0.35  # there the two kinds cannot be confused
    share = float(near[early].double().mean())
    assert abs(share - 0.25) < 4 * math.sqrt(0.25 * 0.75 / int(early.sum())), share
    plain = HJB(d, spread=1.0).sample_domain(n, torch.Generator().manual_seed(0))
    rp, sp = (plain[:, :-1] ** 2).sum(1) / d, plain[:, -1]
    assert bool(((rp >= 1 - tol) & (rp <= (1 + 2 * sp) * (1 + tol))).all())
    assert "origin" not in HJB(d, spread=1.0).describe() and HJB(d, origin=0.25).describe()["origin"] == 0.25


@pytest.mark.parametrize("name", ["sine_gordon", "allen_cahn"])
def test_two_body_transform_sampling_and_source(name):
    """u = (1 - |x|^2) f: B's derivatives are those autograd finds, and f = psi gives the exact
    solution; points: the radius uniform in [0, 1] (not in volume), boundary points on the
    sphere; the coefficients follow coeff_seed; g computed in float64 for float32 points."""
    d = 6
    pde = build_pde(name, d, {"coeff_seed": 4})
    gen = torch.Generator().manual_seed(2)
    X = pde.sample_domain(4000, gen)
    r = X.norm(dim=1)
    assert (r <= 1).all() and abs(float(r.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / 4000)
    assert torch.allclose(pde.sample_condition("boundary", 50, gen).norm(dim=1), torch.ones(50, dtype=torch.float64))
    Xg = X[:7].clone().requires_grad_(True)
    T = pde.output_transform(Xg)
    (grad_B,) = torch.autograd.grad(T.B.sum(), Xg, create_graph=True)
    lap_B = sum(torch.autograd.grad(grad_B[:, i].sum(), Xg, retain_graph=True)[0][:, i] for i in range(d))
    assert torch.allclose(grad_B, T.B_grad) and torch.allclose(lap_B, T.B_lap) and T.A.abs().max() == 0
    psi = pde._psi(X[:7])[0]
    assert torch.allclose(T.value(psi).detach(), pde.exact(X[:7]), rtol=1e-12, atol=1e-14)
    other = build_pde(name, d, {"coeff_seed": 5})
    assert not torch.equal(pde.coeffs, other.coeffs) and torch.equal(
        pde.coeffs, build_pde(name, d, {"coeff_seed": 4}).coeffs
    )
    assert torch.allclose(pde.source(X[:7].float()).double(), pde.source(X[:7]), rtol=1e-6, atol=1e-6)
    assert pde.describe() == {"name": name, "dim": d, "coeff_seed": 4}


@pytest.mark.parametrize("block", [1, 20, 50, 1 << 16])
def test_two_body_source_sums_in_blocks_equal_the_whole_rows(block, monkeypatch):
    """The source sums psi, x . grad psi and lap psi over blocks of terms (the last column of a
    block is the first of the next): any block size (elements; 5 points) gives _psi's
    whole-row values."""
    from dstein.pdes import twobody

    pde = build_pde("sine_gordon", 11, {"coeff_seed": 1})
    X = pde.sample_domain(5, torch.Generator().manual_seed(3))
    psi, grad, lap = pde._psi(X)
    monkeypatch.setattr(twobody, "SOURCE_BLOCK", block)
    got = pde._source_sums(X)
    for a, b in zip(got, (psi, (X * grad).sum(1), lap), strict=True):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-13)


def test_exact_truth_in_row_blocks_equals_the_whole(monkeypatch):
    from dstein.pdes import base

    pde = build_pde("allen_cahn", 20, {"coeff_seed": 1})
    X = pde.sample_domain(23, torch.Generator().manual_seed(0))
    monkeypatch.setattr(base, "TRUTH_BLOCK_ELEMENTS", 20 * 4)  # blocks of 4 rows
    got = pde.truth(X, 2, 0)
    assert torch.equal(got.u, pde.exact(X)) and torch.equal(got.grad, pde.exact_grad(X))
    assert pde.truth(X[:0], 2, 0).u.shape == (0,)
    # the slice's values alone: the same numbers, without evaluating the gradient
    monkeypatch.setattr(type(pde), "exact_grad", lambda self, X: pytest.fail("the slice needs no gradient"))
    assert torch.equal(pde.truth_values(X, 2, 0), pde.exact(X))
    hjb = build_pde("hjb", 3, {})  # a Monte Carlo truth: its u, as truth() gives it
    Y = hjb.test_points(0, 4, 0)
    assert torch.equal(hjb.truth_values(Y, 64, 0), hjb.truth(Y, 64, 0).u)


def test_two_body_source_is_kept_for_the_same_points_only(monkeypatch):
    """The unbiased loss's two residuals (and output_init's iterations) ask for the source at
    the same points: it is computed once for them, again when the points change in place or
    are other points, and never kept for points being differentiated."""
    from dstein.estimators.base import Derivatives

    pde = build_pde("sine_gordon", 12, {"coeff_seed": 1})
    calls = []
    sums = pde._source_sums
    monkeypatch.setattr(pde, "_source_sums", lambda x: calls.append(1) or sums(x))
    X = pde.sample_domain(6, torch.Generator().manual_seed(2))
    first = pde.source(X)
    assert pde.source(X) is first and len(calls) == 1
    D = Derivatives(u=torch.zeros(6, dtype=torch.float64), lap=torch.zeros(6, dtype=torch.float64))
    assert torch.equal(pde.residual(X, D), -first) and len(calls) == 1
    other = X.clone()
    assert torch.equal(pde.source(other), first) and len(calls) == 2
    X.mul_(0.5)  # the same tensor, new values
    assert not torch.equal(pde.source(X), first) and len(calls) == 3
    Y = X.clone().requires_grad_(True)
    pde.source(Y).sum().backward()
    pde.source(Y).sum().backward()  # computed again: no graph is kept between calls
    assert len(calls) == 5 and Y.grad is not None


def test_hjb_start_state_and_its_reference():
    """u(0, x0) at the default x0 = 0 (Deep BSDE's published value at d = 100, else Cole-Hopf),
    and at x0 set by pde.params.x0: the same Monte Carlo at that point; x0 joins the stored
    parameters only when set (files written before it stay valid)."""
    name, X, value, source = build_pde("hjb", 100).start()
    assert name == "u(0,0)" and torch.equal(X, torch.zeros(1, 101)) and value == 4.5901617 and "Deep BSDE" in source
    hjb = build_pde("hjb", 8, {"x0": 0.5})
    name, X, value, source = hjb.start()
    assert name == "u(0,x0=0.5)" and torch.equal(X[0, :-1], torch.full((8,), 0.5)) and X[0, -1] == 0
    expected = cole_hopf_radial(np.full((1, 8), 0.5), np.zeros(1), 1.0, 1.0, 10**6, 0)[0][0]
    assert value == expected and source.startswith("Cole-Hopf Monte Carlo, 10^6 samples (standard error")
    assert hjb.params() == {"mu": 1.0, "T": 1.0, "x0": 0.5} and build_pde("hjb", 8).params() == {"mu": 1.0, "T": 1.0}
    with pytest.raises(ValueError, match=r"pde\.params\.x0=inf must be a finite number"):
        build_pde("hjb", 8, {"x0": float("inf")})
    assert build_pde("poisson", 2).start() is None


def test_hjb_training_points_along_the_process_start_at_x0():
    """``origin`` draws along the diffusion from the start state: x0 + sqrt(2 t) Z."""
    hjb = build_pde("hjb", 400, {"origin": 1.0, "x0": 2.0})
    X = hjb.sample_domain(64, torch.Generator().manual_seed(0))
    x, t = X[:, :-1], X[:, -1:]
    z = (x - 2.0) / torch.sqrt(2 * t)
    assert abs(float(z.mean())) < 4 / (64 * 400) ** 0.5 and abs(float(z.var()) - 1) < 0.035


def test_process_share_draws_the_last_rows_along_the_process_from_x0():
    """pde.process_share: of n training points of a kind the process covers, the last
    round(share n) are x0 + sqrt(2 t) Z (t ~ U(0, T) in the domain, t = T on the terminal set),
    drawn after the others, which are the PDE's own draw of n - k points; the share joins the
    stored parameters only when set; a PDE without a process refuses it, naming the option."""
    hjb = build_pde("hjb", 400, {"x0": 2.0}, process_share=0.25)
    assert hjb.describe()["process_share"] == 0.25 and "process_share" not in build_pde("hjb", 4).describe()
    X = hjb.training_points("domain", 64, torch.Generator().manual_seed(0), torch.float64)
    own = build_pde("hjb", 400, {"x0": 2.0}).training_points("domain", 48, torch.Generator().manual_seed(0),
                                                             torch.float64)  # fmt: skip
    assert torch.equal(X[:48], own)
    x, t = X[48:, :-1], X[48:, -1:]
    assert float(t.min()) >= 0 and float(t.max()) <= 1 and float(t.std()) > 0.1
    z = (x - 2.0) / torch.sqrt(2 * t)
    assert abs(float(z.mean())) < 4 / (16 * 400) ** 0.5 and abs(float(z.var()) - 1) < 0.07
    terminal = hjb.training_points("terminal", 8, torch.Generator().manual_seed(1), torch.float32)
    assert terminal.dtype == torch.float32 and torch.all(terminal[:, -1] == 1.0)
    assert float(((terminal[6:, :-1] - 2.0) ** 2).mean()) == pytest.approx(2.0, rel=0.15)  # X_T = x0 + sqrt(2) Z
    with pytest.raises(ValueError, match=r"pde\.process_share=0\.5: pde poisson declares no forward process"):
        build_pde("poisson", 2, process_share=0.5)


@pytest.mark.parametrize("name", ["hjb", "bsde_allen_cahn"])
def test_process_time_power_draws_the_process_points_early(name):
    """pde.process_time_power p: the process rows' times are T v^p (P(t < s) = (s / T)^(1/p),
    checked against the law's quantiles within a Kolmogorov-Smirnov bound), from the same
    uniform draws as p = 1 (so p = 1 is bit for bit the old draw); the along-the-process test
    set keeps t ~ U(0, T); the power joins the stored parameters only when set."""
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    uniform = build_pde(name, 20, process_share=1.0)
    cubed = build_pde(name, 20, process_share=1.0, process_time_power=3.0)
    T = uniform.T
    t1 = uniform.training_points("domain", 2000, gen(), torch.float64)[:, -1]
    t3 = cubed.training_points("domain", 2000, gen(), torch.float64)[:, -1]
    assert torch.allclose(t3, T * (t1 / T) ** 3, rtol=1e-12, atol=0)
    cdf = torch.sort(t3).values
    law = (cdf / T) ** (1 / 3)  # P(t < s) at the sorted draws
    ks = float((law - torch.arange(1, 2001, dtype=torch.float64) / 2000).abs().max())
    assert ks < 1.63 / 2000**0.5  # the 1 % critical value
    assert float((t3 < 1e-3 * T).double().mean()) == pytest.approx(0.1, abs=0.03)  # (1e-3)^(1/3); uniform: 0.001
    assert cubed.describe()["process_time_power"] == 3.0 and "process_time_power" not in uniform.describe()
    test_t = cubed.test_points(0, 400, 3, along_process=True)[:, -1]
    assert float(test_t.mean()) == pytest.approx(T / 2, rel=0.1)  # power 3 would give T / 4


def test_process_time_power_is_refused_where_it_cannot_act():
    """A user's sample_process without ``power`` serves p = 1 only: the error names the option
    and what to add; the config refuses a power without process points."""
    from dstein.config import load_config
    from dstein.errors import ConfigError

    class OldProcess(HJB):
        def sample_process(self, kind, n, gen, dtype=torch.float64):
            return super().sample_process(kind, n, gen, dtype)

    pde = OldProcess(4)
    pde.process_share = 0.5
    assert pde.training_points("domain", 8, torch.Generator().manual_seed(0), torch.float64).shape == (8, 5)
    REGISTRY["old_process"] = OldProcess
    try:
        with pytest.raises(ValueError, match=r"process_time_power=2\.0: OldProcess\.sample_process takes no power"):
            build_pde("old_process", 4, process_share=0.5, process_time_power=2.0)
    finally:
        del REGISTRY["old_process"]
    root = Path(__file__).resolve().parent.parent
    with pytest.raises(ConfigError, match=r"pde\.process_time_power=2\.0 .* needs pde\.process_share > 0"):
        load_config(root / "configs/quickstart.yaml", ["pde.process_share=0", "pde.process_time_power=2"])


def test_the_test_set_along_the_process_and_its_truth():
    """process_test_set: points of x0 + sqrt(2 t) Z (its own stream, not the test set's), and
    the same ground truth as any point gets; none for a PDE without a process."""
    hjb = build_pde("hjb", 50, {"x0": 0.5})
    test = hjb.process_test_set(300, seed=3, truth_samples=2000)
    x, t = test.X[:, :-1], test.X[:, -1:]
    z = (x - 0.5) / torch.sqrt(2 * t)
    assert abs(float(z.var()) - 1) < 0.03 and abs(float(z.mean())) < 4 / (300 * 50) ** 0.5
    assert torch.equal(test.X[:10], hjb.test_points(0, 10, 3, along_process=True))
    again = hjb.truth(test.X, 2000, 3)
    assert torch.equal(again.u, test.u) and torch.equal(again.grad, test.grad)
    assert not torch.equal(test.X[:, -1], hjb.test_set(300, 3, 2000).X[:, -1])
    assert build_pde("poisson", 2).process_test_set(10, 0, 10) is None and hjb.process_test_set(0, 3, 10) is None


def test_the_hjb_slice_passes_through_the_start_state():
    X, coord, label = build_pde("hjb", 6, {"x0": 0.5}).slice(7)
    assert torch.equal(X[3, :-1], torch.full((6,), 0.5)) and float(X[3, -1]) == 0 and coord[3] == 0.5
    assert torch.equal(X[:, 1:-1], torch.full((7, 5), 0.5)) and label == "x_1 (other x_i = 0.5, t = 0)"
