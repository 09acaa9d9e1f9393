"""Estimators against closed forms (MATH.md section 2), float64.

Statistical checks use fixed seeds: an estimate is repeated with different noise seeds and
its mean must lie within 4 standard errors (of that mean, measured over the repeats) of
the exact value.
"""

from __future__ import annotations

import math

import pytest
import torch
from closed_forms import Quadratic, SinWave

import dstein
from dstein.estimators import make_spec
from dstein.estimators.sharded import deal_chunks
from dstein.estimators.stein import partial_sums

NEEDS_T = ("u", "u_t", "grad", "grad_sq", "lap")
NEEDS = ("u", "grad", "grad_sq", "lap")
SX, ST = 0.3, 0.2


def points(d: int, time: bool, n: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + d)
    return torch.rand(n, d + (1 if time else 0), generator=gen, dtype=torch.float64) * 2 - 1


def repeats(fn, X, method, needs, samples, reps, time, sx=SX, st=ST):
    out = {k: [] for k in needs}
    for r in range(reps):
        D = dstein.estimate(
            fn,
            X,
            method=method,
            needs=needs,
            samples=samples,
            sigma_x=sx,
            sigma_t=st if time else None,
            seed=r,
            step=0,
        )
        for k in needs:
            out[k].append(getattr(D, k).detach())
    return {k: torch.stack(v) for k, v in out.items()}


def assert_within_se(est: torch.Tensor, exact: torch.Tensor, k: float = 4.0, name: str = ""):
    mean = est.mean(0)
    se = est.std(0) / math.sqrt(est.shape[0])
    err = (mean - exact).abs()
    tight = se < 1e-12  # a zero-variance estimate must then be exact
    assert torch.all(err[tight] < 1e-9), f"{name}: zero-variance estimate is off by {err[tight].max()}"
    z = err[~tight] / se[~tight]
    if est.dim() == 2:  # scalar per point: each within k standard errors
        assert torch.all(z < k), f"{name}: |mean - exact| = {z.max():.2f} standard errors"
    else:  # a vector per point: its squared z-scores sum like chi^2(m); k standard deviations
        m = z.numel()
        excess = (float((z * z).sum()) * (est.shape[0] - 3) / (est.shape[0] - 1) - m) / math.sqrt(2 * m)
        assert excess < k, f"{name}: sum of squared z-scores is {excess:.2f} sd above chi^2({m})"


@pytest.mark.parametrize("method", ["stein", "stein-antithetic"])
@pytest.mark.parametrize("d", [1, 5, 50])
@pytest.mark.parametrize("family", [SinWave, Quadratic])
@pytest.mark.parametrize("time", [False, True])
def test_stein_matches_closed_form(method, d, family, time):
    fn = family(d, time)
    X = points(d, time)
    needs = NEEDS_T if time else NEEDS
    est = repeats(fn, X, method, needs, samples=256, reps=40, time=time)
    exact = fn.smoothed(X, SX, ST if time else 0.0)
    for k in needs:
        assert_within_se(est[k], exact[k], name=f"{method} {family.__name__} d={d} {k}")


@pytest.mark.parametrize("method", ["stein", "stein-antithetic"])
def test_error_shrinks_like_one_over_sqrt_samples(method):
    fn, X = SinWave(5, True), points(5, True)
    exact = fn.smoothed(X, SX, ST)
    rmse = {}
    for samples in (128, 2048):
        est = repeats(fn, X, method, NEEDS_T, samples=samples, reps=40, time=True)
        rmse[samples] = {k: float(((est[k] - exact[k]) ** 2).mean().sqrt()) for k in NEEDS_T}
    for k in NEEDS_T:
        ratio = rmse[128][k] / rmse[2048][k]  # 16x samples: expect 4x smaller error
        assert 2.5 < ratio < 6.5, f"{method} {k}: RMSE ratio {ratio:.2f} for 16x samples"


@pytest.mark.parametrize("family", [SinWave, Quadratic])
@pytest.mark.parametrize("d", [1, 5, 50])
def test_autograd_is_exact(family, d):
    for time in (False, True):
        fn, X = family(d, time), points(d, time)
        needs = NEEDS_T if time else NEEDS
        D = dstein.estimate(fn, X, method="autograd", needs=needs, sigma_t=1.0 if time else None)
        exact = fn.exact(X)
        for k in needs:
            assert torch.allclose(getattr(D, k), exact[k], rtol=0, atol=1e-10), k


@pytest.mark.parametrize("d", [5, 50])
def test_hutchinson_is_exact_but_for_an_unbiased_laplacian(d):
    """Value, time derivative and gradient exact; the trace estimate within 4 SE of the
    Laplacian (sin(a.x + bt): v'Hv = -sin(.) (a.v)^2 has mean -|a|^2 sin(.))."""
    fn, X = SinWave(d, True), points(d, True)
    exact = fn.exact(X)
    est = repeats(fn, X, "hutchinson", NEEDS_T, samples=16, reps=40, time=True)
    for k in ("u", "u_t", "grad", "grad_sq"):
        assert torch.allclose(est[k][0], exact[k], rtol=0, atol=1e-10), k
    assert_within_se(est["lap"], exact["lap"], name=f"hutchinson d={d}")
    assert est["lap"].std(0).min() > 0


def test_forward_over_reverse_laplacian_equals_the_loop():
    import dstein.estimators.autograd as ag
    from dstein.models import MLP

    torch.manual_seed(2)
    model, X = MLP(31, 16, 3).double(), points(30, True, n=5)
    fast = dstein.estimate(model, X, method="autograd", needs={"lap"}, sigma_t=1.0).lap
    loop_max, ag.LOOP_MAX_DIM = ag.LOOP_MAX_DIM, 10**9
    try:
        slow = dstein.estimate(model, X, method="autograd", needs={"lap"}, sigma_t=1.0).lap
    finally:
        ag.LOOP_MAX_DIM = loop_max
    assert torch.allclose(fast, slow, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["autograd", "hutchinson"])
def test_blocked_hessian_forms_equal_the_kept_graph(monkeypatch, method):
    """Above RECOMPUTE_TANGENT_BYTES the Hessian-vector products are taken in blocks recomputed
    in the backward pass: same Laplacian, same parameter and input gradients (float64)."""
    import dstein.estimators.autograd as ag
    from dstein.models import MLP

    torch.manual_seed(4)
    model, X0 = MLP(41, 16, 3).double(), points(40, True, n=6)

    def run():
        model.zero_grad()
        X = X0.clone().requires_grad_(True)  # as in the adversarial steps
        D = dstein.estimate(model, X, method=method, needs={"u", "lap", "grad_sq"}, sigma_t=1.0, samples=24, seed=3)
        (D.lap.square().sum() + D.grad_sq.sum()).backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
        return D.lap.detach(), grads, X.grad.clone()

    lap, param_grads, x_grad = run()
    monkeypatch.setattr(ag, "RECOMPUTE_TANGENT_BYTES", 6 * 41 * 7 * 8)  # blocks of 7 probes: 6 or 4 blocks
    blocked = []
    monkeypatch.setattr(ag._RecomputedForms, "apply", _counting(ag._RecomputedForms.apply, blocked))
    lap_b, param_grads_b, x_grad_b = run()
    assert len(blocked) == (6 if method == "autograd" else 4)
    assert torch.allclose(lap_b, lap, rtol=1e-12, atol=1e-12)
    assert torch.allclose(x_grad_b, x_grad, rtol=1e-10, atol=1e-12)
    for a, b in zip(param_grads_b, param_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def _counting(fn, calls):
    def wrapper(*args):
        calls.append(1)
        return fn(*args)

    return wrapper


@pytest.mark.parametrize("method", ["stein", "stein-antithetic"])
def test_grad_sq_unbiased_where_squared_mean_is_not(method):
    """d = 50, 256 samples: the U-statistic passes; squaring the mean gradient is biased."""
    d = 50
    fn, X = SinWave(d, False, seed=3), points(d, False)
    exact = fn.smoothed(X, SX, 0.0)["grad_sq"]
    est = repeats(fn, X, method, ("grad", "grad_sq"), samples=256, reps=60, time=False)
    assert_within_se(est["grad_sq"], exact, name=f"{method} U-statistic")
    squared_mean = (est["grad"] ** 2).sum(-1)
    mean = squared_mean.mean(0)
    se = squared_mean.std(0) / math.sqrt(60)
    z = (mean - exact) / se
    assert torch.all(z > 4), f"squared mean gradient should be biased upwards, z = {z}"
    # the relative bias is about (d + 2) / n for the antithetic estimator (MATH.md section 2)
    if method == "stein-antithetic":
        rel = (mean / exact - 1).mean()
        assert 0.5 * (d + 2) / 128 < rel < 2.0 * (d + 2) / 128


def test_antithetic_laplacian_has_lower_variance():
    fn, X = SinWave(20, False, seed=1), points(20, False)
    var = {}
    for method in ("stein", "stein-antithetic"):
        est = repeats(fn, X, method, ("lap",), samples=256, reps=40, time=False)
        var[method] = est["lap"].var(0)
    # measured ratios 10 to 18 here; 4 leaves room for the sampling error of 40-repeat variances
    assert torch.all(var["stein-antithetic"] * 4 < var["stein"]), var


def test_partial_sums_add_up_and_noise_is_world_size_invariant():
    """Sums over disjoint chunk sets add to the full sums; chunks are dealt without gaps."""
    fn, X = SinWave(7, True), points(7, True, n=4)
    spec = make_spec("stein-antithetic", NEEDS_T, samples=96, sigma_x=SX, sigma_t=ST, chunk=16)
    full = partial_sums(fn, X, spec, range(spec.num_chunks))
    for world in (1, 2, 3, 6):
        dealt = [deal_chunks(spec.num_chunks, r, world) for r in range(world)]
        assert sorted(c for rng in dealt for c in rng) == list(range(spec.num_chunks))
        assert max(map(len, dealt)) - min(map(len, dealt)) <= 1
        parts = [partial_sums(fn, X, spec, rng) for rng in dealt]
        for key, value in full.items():
            assert torch.allclose(sum(p[key] for p in parts), value, rtol=1e-12, atol=1e-12)
    # a point group's rows draw the same noise as in the full batch
    half = partial_sums(fn, X[2:], spec, range(spec.num_chunks), rows=(2, 4))
    for key, value in full.items():
        assert torch.allclose(half[key], value[2:], rtol=1e-12, atol=1e-12)


def test_noise_drawn_in_parallel_is_the_same_noise(monkeypatch):
    """Chunks' noise drawn at once by the noise threads (training on CPU) gives bit-identical
    sums and gradients to drawing it chunk by chunk, and the threads do draw it."""
    import threading

    from dstein.estimators import stein
    from dstein.models import RadialMLP

    torch.manual_seed(5)
    model = RadialMLP(9, 8, 12, 2, "tanh", shift=3.0, scale=2.0).double()
    spec = make_spec("stein-antithetic", NEEDS_T, samples=64, sigma_x=SX, sigma_t=ST, chunk=16, seed=2)
    drawn_by = set()
    draw = stein._chunk_noise

    def spy(*args):
        drawn_by.add(threading.current_thread().name.split("_")[0])
        return draw(*args)

    monkeypatch.setattr(stein, "_chunk_noise", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for smallest in (1 << 62, 1):  # chunk by chunk, then every chunk by the threads
            monkeypatch.setattr(stein, "PARALLEL_NOISE_NUMBERS", smallest)
            X = points(8, True, n=5).requires_grad_(True)
            sums = partial_sums(model, X, spec, range(spec.num_chunks))
            total = sum((v * (1.0 + i)).sum() for i, v in enumerate(sums.values()))
            results.append((sums, torch.autograd.grad(total, [X, *model.parameters()])))
    finally:
        torch.set_num_threads(threads)
    assert drawn_by == {"MainThread", "dstein-noise"}
    (a, ga), (b, gb) = results
    assert all(torch.equal(a[k], b[k]) for k in a) and all(map(torch.equal, ga, gb))


def test_deal_chunks_refuses_too_many_ranks():
    with pytest.raises(ValueError, match="at least one chunk"):
        deal_chunks(2, 0, 3)


def test_same_seed_same_estimate_other_seed_other_estimate():
    fn, X = SinWave(5, False), points(5, False)
    kw = dict(method="stein-antithetic", needs={"lap"}, samples=64, sigma_x=SX)
    a = dstein.estimate(fn, X, seed=1, **kw).lap
    b = dstein.estimate(fn, X, seed=1, **kw).lap
    c = dstein.estimate(fn, X, seed=2, **kw).lap
    d = dstein.estimate(fn, X, seed=1, step=1, **kw).lap
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


@pytest.mark.parametrize(
    ("method", "d"), [("autograd", 2), ("autograd", 20), ("hutchinson", 20), ("stein", 2), ("stein-antithetic", 2)]
)
def test_parameter_gradient_is_exact_derivative_of_the_estimate(method, d):
    """gradcheck: every estimate is a differentiable function of the parameters (noise fixed).
    autograd at d = 20 takes the forward-over-reverse Laplacian, at d = 2 the loop."""
    from dstein.models import MLP

    torch.manual_seed(0)
    model = MLP(d + 1, 4, 2).double()
    names = [n for n, _ in model.named_parameters()]
    X = points(d, True)

    class WithParams(torch.nn.Module):
        def __init__(self, flat):
            super().__init__()
            self.flat = flat

        def forward(self, Y):
            return torch.func.functional_call(model, dict(zip(names, self.flat, strict=True)), (Y,))

    def f(*flat):
        D = dstein.estimate(WithParams(flat), X, method=method, needs=NEEDS_T, samples=16, sigma_x=0.3, sigma_t=0.2)
        return D.u, D.u_t, D.grad_sq, D.lap

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


def test_precision_guard_refuses_bf16_with_small_sigma():
    from dstein.models import MLP

    model = MLP(3, 8, 2).to(torch.bfloat16)
    X = torch.zeros(2, 3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"sigma_x=0\.01 is too small for bfloat16"):
        dstein.estimate(model, X, method="stein-antithetic", needs={"lap"}, samples=8, sigma_x=0.01)
    model32 = MLP(3, 8, 2)
    dstein.estimate(model32, X.float(), method="stein-antithetic", needs={"lap"}, samples=8, sigma_x=0.01)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="stein", needs={"lap"}, samples=1, sigma_x=0.1), "estimator.samples"),
        (dict(method="stein-antithetic", needs={"lap"}, samples=7, sigma_x=0.1), "must be even"),
        (dict(method="stein", needs={"lap"}, samples=10, sigma_x=0.0), "sigma_x"),
        (dict(method="stein", needs={"lap"}, samples=10, sigma_x=0.1, chunk=3), "whole number of chunks"),
        (dict(method="stein", needs={"hessian"}, samples=10, sigma_x=0.1), "subset"),
        (dict(method="stein", needs={"u_t"}, samples=10, sigma_x=0.1), "sigma_t"),
        (dict(method="magic", needs={"u"}, samples=10, sigma_x=0.1), "not a Stein method"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    fn = SinWave(2, False)
    with pytest.raises(ValueError, match=message):
        dstein.estimate(fn, points(2, False), **kwargs)


@pytest.mark.parametrize("method", ["stein-antithetic", "stein-subspace"])
@pytest.mark.parametrize("d", [1, 5, 50])
@pytest.mark.parametrize("time", [False, True])
def test_difference_laplacian_is_exact_in_the_mean_for_quadratics(method, d, time):
    """estimator.laplacian=difference: mean((3 - z_t^2) e) / sx^2 (2 e without time) has the
    network's Laplacian as its mean for a quadratic network, time curvature included (it is
    weighted out), so it equals the smoothed model's there."""
    from closed_forms import LayeredQuadratic

    fn = Quadratic(d, time) if method == "stein-antithetic" else LayeredQuadratic(d, time)
    X = points(d, time)
    est = torch.stack([
        dstein.estimate(fn, X, method=method, needs={"lap"}, samples=256, sigma_x=SX, sigma_t=ST if time else None,
                        seed=r, laplacian="difference").lap.detach()
        for r in range(40)
    ])  # fmt: skip
    assert_within_se(est, fn.smoothed(X, SX, ST if time else 0.0)["lap"], name=f"difference {method} d={d}")


def test_difference_laplacian_is_far_less_noisy_at_high_d():
    """Per pair the Stein term (|z|^2 - d) z'Hz / 2 has variance about d (tr(H)^2 + 2 tr(H^2)) / 2,
    the second difference z'Hz has 2 tr(H^2): the ratio is between d / 2 (a traceless or
    rank-one Hessian: this sine, measured 22 to 59 at d = 50) and (d / 2)^2 (an isotropic one)."""
    fn, X = SinWave(50, False, seed=1), points(50, False)
    var = {}
    for laplacian in ("stein", "difference"):
        est = torch.stack([
            dstein.estimate(fn, X, method="stein-antithetic", needs={"lap"}, samples=256, sigma_x=0.01, seed=r,
                            laplacian=laplacian).lap.detach()
            for r in range(30)
        ])  # fmt: skip
        var[laplacian] = est.var(0)
    assert torch.all(var["difference"] * 10 < var["stein"]), var


def test_difference_laplacian_needs_pairs():
    with pytest.raises(ValueError, match="laplacian=difference needs antithetic pairs"):
        dstein.estimate(SinWave(2, False), points(2, False), method="stein", needs={"lap"}, samples=8, sigma_x=SX,
                        laplacian="difference")  # fmt: skip


@pytest.mark.parametrize("family", ["mlp", "radial-square", "radial-log", "radial-both"])
@pytest.mark.parametrize("time", [False, True])
@pytest.mark.parametrize("method", ["stein", "stein-antithetic"])
def test_perturbing_the_first_layer_equals_perturbing_the_input(family, time, method):
    """The full-space estimator perturbs a layered model's pre-activation (``h0 +- W eps`` and
    the quadratic feature's change) instead of its input: the same sums of the same noise, and
    the same parameter and point gradients, as ``g(X +- eps)`` (float64, to rounding)."""
    from dstein.estimators.stein import FullSpace
    from dstein.models import MLP, RadialMLP

    d = 7
    torch.manual_seed(11)
    if family == "mlp":
        model = MLP(d + time, 12, 2, "gelu", input_scale=0.5, dim=d).double()
    else:
        model = RadialMLP(d + time, d, 12, 2, "gelu", shift=3.0, scale=2.0, input_scale=0.5,
                          feature=family.removeprefix("radial-")).double()  # fmt: skip
    needs = NEEDS_T if time else NEEDS
    spec = make_spec(method, needs, samples=16, sigma_x=0.3, sigma_t=0.2 if time else None, chunk=8, seed=4)
    X = points(d, time, n=5).requires_grad_(True)
    results = []
    for through_input in (True, False):
        space = FullSpace(model, X, spec, through_input=through_input)
        assert (space.h0 is None) == through_input
        sums = partial_sums(model, X, spec, range(spec.num_chunks), space=space)
        total = sum((v * (1.0 + i)).sum() for i, v in enumerate(sums.values())) + space.center().sum()
        grads = torch.autograd.grad(total, [X, *model.parameters()])
        results.append((sums, grads))
    (a, ga), (b, gb) = results
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-10, atol=1e-12, msg=key)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(y, x, rtol=1e-9, atol=1e-11)
