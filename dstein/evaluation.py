"""The trained solution at test points, and its errors against the ground truth.

Autograd-trained models are evaluated as the network itself. Stein-trained models are
evaluated as the smoothed model ``f = E[g(X + eps)]``: its value averaged over
``eval.samples`` perturbations in antithetic pairs ``g(X + eps)`` and ``g(X - eps)`` (an odd
number is rounded up), whose mean cancels the part of g linear in eps exactly (single
perturbations leave a noise of about ``sigma_x |grad g| / sqrt(n)``: 1.6% of the solution on
the two-body problems at d = 1000, where |grad g| is about 24), and its gradient by
differentiating that average with respect to the points (pathwise, far less noisy than the
Stein gradient; this is evaluation, not training). Test points go in blocks of
``EVAL_BLOCK``; block ``b``'s noise is keyed by ``(seed, Streams.EVAL, b)``, so that any rank
can evaluate any block and the errors do not depend on the number of ranks. With a hard
constraint the prediction is ``A + B f``.

Every evaluation stands beside baselines that know nothing of how u depends on x, on the
same test set (``baselines``): the best constant (the test mean), the best function of t
alone (a least-squares polynomial of degree 8 in t fitted to the test set itself: an upper
bound on what ignoring x can do) and the condition value taken as the solution everywhere;
and beside the gradient floor of the model (``gradient_floor``): the share of the true
gradients that no model with this first layer can represent.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from dstein.config import Config
from dstein.distributed import sum_values
from dstein.estimators import STEIN_METHODS, SteinSpec
from dstein.estimators.constraint import OutputTransform
from dstein.estimators.stein import FullSpace
from dstein.estimators.subspace import input_weight, row_basis
from dstein.metrics import error_sums, errors_from_sums, relative_errors
from dstein.noise import Streams, counter_seed, split_evenly
from dstein.pdes import PDE, TestSet

#: Test points are evaluated in blocks of this size; a block's noise is keyed by its index.
EVAL_BLOCK = 64
#: At most this many noise numbers go through the network at once (256 MB in float64): a
#: block of higher-dimensional points is evaluated in parts (``predict``).
EVAL_NOISE_ELEMENTS = 2**25
#: Degree of the polynomial in t of the t-only baseline.
T_ONLY_DEGREE = 8
#: The best radial predictor's degrees: in the radial variable, and in t (time-dependent PDEs).
RADIAL_DEGREE, RADIAL_T_DEGREE = 8, 4
#: The along-the-process test set's errors are reported under these keys' prefix, and its
#: blocks' evaluation noise is keyed from this block index on (apart from the test set's).
PROCESS, PROCESS_BLOCKS = "process_", 1 << 30

Transform = Callable[[torch.Tensor], OutputTransform | None]


def _smoothing(config: Config, X: torch.Tensor) -> SteinSpec:
    """The evaluation's perturbations of points ``X`` (time, if any, in the last column)."""
    n = config.eval.samples + config.eval.samples % 2  # evaluations, two per pair
    sigma_t = config.estimator.time_sigma if X.shape[1] > config.pde.dim else None
    return SteinSpec(
        antithetic=True, needs=frozenset({"u"}), samples=n, chunk=n, sigma_x=config.estimator.sigma_x,
        sigma_t=sigma_t, seed=config.seed,
    )  # fmt: skip


def predict(
    model: torch.nn.Module,
    X: torch.Tensor,
    config: Config,
    first_block: int = 0,
    progress: bool = False,
    transform: Transform | None = None,
    gradient: bool = True,
    smooth: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The trained solution and its spatial gradient at test points (blocks of EVAL_BLOCK;
    block ``b``'s noise keyed by ``first_block + b``); ``transform``: the hard constraint.
    ``progress`` shows a bar over the blocks (on standard error). ``gradient=False``: the
    solution alone (None for the gradient), without autograd: the same values for a third of
    the work, what a plot's slice needs. ``smooth=False``: the network g itself for Stein
    methods too, not its smoothing f = E[g(x + eps)] (they differ by about sigma^2 lap g / 2;
    the closed-loop simulation's thousands of gradients cost one pass each instead of
    eval.samples).

    A block whose noise would exceed EVAL_NOISE_ELEMENTS numbers (64 points x 32 pairs at
    d = 10^6 would be 8 GB) goes through the network in parts of fewer points, their noise
    drawn one after another from the block's generator."""
    d = config.pde.dim
    us, grads = [], []
    stein = smooth and config.estimator.method in STEIN_METHODS
    spec = _smoothing(config, X)
    # the network alone draws no noise: its blocks are as large as EVAL_NOISE_ELEMENTS numbers allow
    block = EVAL_BLOCK if stein else max(EVAL_BLOCK, EVAL_NOISE_ELEMENTS // X.shape[1])
    rows = max(1, EVAL_NOISE_ELEMENTS // (spec.terms * X.shape[1])) if stein else block
    starts = range(0, X.shape[0], block)
    for b, lo in enumerate(tqdm(starts, desc="evaluating", unit="block", disable=not progress, leave=False)):
        gen = None
        if stein:
            gen = torch.Generator(device=X.device).manual_seed(counter_seed(config.seed, Streams.EVAL, first_block + b))
        for part in range(lo, min(lo + block, X.shape[0]), rows):
            with torch.set_grad_enabled(gradient):
                Xb = X[part : min(part + rows, lo + block)].detach().requires_grad_(gradient)
                u = _smoothed_value(model, Xb, spec, gen) if gen is not None else model(Xb).reshape(-1)
                constraint = transform(Xb) if transform is not None else None
                if constraint is not None:
                    u = constraint.value(u)
                if gradient:
                    (g,) = torch.autograd.grad(u.sum(), Xb)
                    grads.append(g[:, :d].detach())
            us.append(u.detach())
    return torch.cat(us), (torch.cat(grads) if gradient else None)


def _smoothed_value(model: torch.nn.Module, X: torch.Tensor, spec: SteinSpec, gen: torch.Generator) -> torch.Tensor:
    """The antithetic average of g over ``spec.terms`` pairs of perturbations of each point."""
    z = torch.randn((X.shape[0], spec.terms, X.shape[1]), generator=gen, dtype=X.dtype, device=X.device)
    g_plus, g_minus = FullSpace(model, X, spec).values(z, antithetic=True)
    assert g_minus is not None
    return 0.5 * (g_plus + g_minus).mean(1)


def floor_sums(
    model: torch.nn.Module,
    X: torch.Tensor,
    u: torch.Tensor,
    grad_true: torch.Tensor,
    transform: Transform | None = None,
) -> torch.Tensor | None:
    """Sums (over points) of the squared part of the true gradients that no choice of the
    network's gradient can reach, and of the true gradients squared; None when the model's
    first layer is not linear (the floor is then unknown).

    The network's input gradient lies in the row space of its first layer, span(V), so the
    model's gradient is ``grad A + f grad B + B V c`` under a hard constraint (``grad A = 0``,
    ``B = 1`` without), and the smallest error any c can give is the part of
    ``true - grad A - f grad B`` outside span(V)."""
    layer = getattr(model, "input_layer", None)
    if not isinstance(layer, torch.nn.Linear):
        return None
    d = grad_true.shape[1]
    Wx = input_weight(model, layer).detach().double()[:, :d]
    U, s = row_basis(Wx @ Wx.T)
    V = Wx.T @ (U / s)  # (d, r) orthonormal
    target = grad_true.double().to(V.device)
    constraint = transform(X) if transform is not None else None
    if constraint is not None:
        if constraint.A_grad is not None:
            target = target - constraint.A_grad.detach().double()
        if constraint.B_grad is not None:
            f = (u.double() - constraint.A.detach().double()) / constraint.B.detach().double()
            target = target - f.unsqueeze(1) * constraint.B_grad.detach().double()
    outside = target - (target @ V) @ V.T
    directions = getattr(model, "gradient_directions", None)
    first = directions(X[:1]) if callable(directions) else None
    if first is not None:  # per-point directions beyond the row space, in blocks of points
        block = floor_block(first.shape[1] * first.shape[2])
        parts = []
        for lo in range(0, X.shape[0], block):
            extra = directions(X[lo : lo + block]).detach().double().to(V.device)
            parts.append(_outside_of(outside[lo : lo + block], extra, V))
        outside = torch.cat(parts)
    return torch.stack([(outside * outside).sum(), (grad_true.double() * grad_true.double()).sum()]).cpu()


#: Points per block of the per-point directions (the quadratic family's are width x d each), at
#: most: a block's directions in float64 are held to FLOOR_BLOCK_BYTES (its QR holds about four
#: such copies; at d = 100,000 and width 128 64 points took 23.7 GB, the whole machine).
FLOOR_BLOCK = 64
FLOOR_BLOCK_BYTES = 1 << 28


def floor_block(numbers_per_point: int) -> int:
    """Points per block when each point has ``numbers_per_point`` direction entries."""
    return max(1, min(FLOOR_BLOCK, FLOOR_BLOCK_BYTES // (8 * numbers_per_point)))


def _outside_of(outside: torch.Tensor, extra: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``outside`` (B, d), already orthogonal to span(V), less its projection onto the span of
    each point's directions ``extra`` (B, m, d): one direction (the radial family's x) by
    normalizing it, several (the quadratic family's rows of Q diag(x)) by an orthonormal basis
    from a QR factorization, directions that add nothing (|R_jj| below 1e-10 of the largest)
    left out."""
    e = extra - (extra @ V) @ V.T
    if e.shape[1] == 1:
        e = e[:, 0] / e[:, 0].norm(dim=1, keepdim=True).clamp_min(1e-300)
        return outside - (outside * e).sum(1, keepdim=True) * e
    Q, R = torch.linalg.qr(e.transpose(1, 2))  # (B, d, m) orthonormal columns
    size = R.diagonal(dim1=1, dim2=2).abs()
    Q = Q * (size > 1e-10 * size.amax(1, keepdim=True).clamp_min(1e-300)).unsqueeze(1)
    return outside - (Q @ (Q.transpose(1, 2) @ outside.unsqueeze(2))).squeeze(2)


def evaluate(
    model: torch.nn.Module,
    test: TestSet,
    config: Config,
    device: torch.device,
    dtype: torch.dtype,
    transform: Transform | None = None,
    rank: int = 0,
    world_size: int = 1,
    block_offset: int = 0,
) -> dict[str, float]:
    """Errors on the test set and the gradient floor. With ``world_size`` ranks (each calls
    this), the test blocks are dealt to them and the sums added; the result does not depend
    on the number of ranks. Block ``b``'s noise is keyed by ``block_offset + b``. Time-dependent
    PDEs also get ``l2_rel_beyond_t``: the solution error less its best function of t (the
    t_only baseline's polynomials), relative like l2_rel: what the model gets wrong about x
    (a level drifting in t is what the residual constrains least)."""
    n = test.X.shape[0]
    blocks = math.ceil(n / EVAL_BLOCK)
    first, last = split_evenly(blocks, rank, world_size)
    lo, hi = first * EVAL_BLOCK, min(n, last * EVAL_BLOCK)
    basis = time_basis(test.X, config.pde.dim)  # (n, k) or None: stationary, or too few times
    k = 0 if basis is None else basis.shape[1]
    sums = torch.zeros(8 + k, dtype=torch.float64, device=device)
    if hi > lo:
        X = test.X[lo:hi].to(device=device, dtype=dtype)
        u, grad = predict(model, X, config, first_block=block_offset + first, transform=transform)
        assert grad is not None
        sums[:6] = error_sums(u, grad, test.u[lo:hi], test.grad[lo:hi]).to(device)
        floor = floor_sums(model, X, u, test.grad[lo:hi], transform)
        if floor is not None:
            sums[6:8] = floor.to(device)
        if basis is not None:  # the error's inner products with functions of t
            error = u.detach().double().cpu() - test.u[lo:hi].double()
            sums[8:] = (basis[lo:hi] * error.unsqueeze(1)).sum(0).to(device)
    total = sum_values(sums).cpu()
    out = errors_from_sums(total[:6])
    if isinstance(getattr(model, "input_layer", None), torch.nn.Linear):
        out["gradient_floor"] = float(total[6] / total[7]) ** 0.5
    if basis is not None:  # |e|^2 less its projection on the functions of t: b' G^-1 b
        b = total[8:]
        explained = float(b @ torch.linalg.lstsq(basis.T @ basis, b.unsqueeze(1)).solution[:, 0])
        out["l2_rel_beyond_t"] = max(float(total[2]) - explained, 0.0) ** 0.5 / float(total[3]) ** 0.5
    return out


def time_basis(X: torch.Tensor, dim: int) -> torch.Tensor | None:
    """Legendre polynomials in t (X's column after ``dim``) of the t_only baseline's degree,
    over the test set (float64, (n, degree + 1)); None: no time column, or one time only."""
    if X.shape[1] <= dim:
        return None
    t = X[:, dim].double().cpu().numpy()
    degree = t_only_degree(t)
    if degree < 1:
        return None
    return torch.from_numpy(np.polynomial.legendre.legvander(_unit(t)[0], degree))


def t_only_degree(t: np.ndarray) -> int:
    """The t_only baseline's degree: T_ONLY_DEGREE, lower on small test sets (at least 20 test
    points per coefficient)."""
    return min(T_ONLY_DEGREE, (len(np.unique(t)) - 1) // 20)


def evaluate_all(
    model: torch.nn.Module, pde: PDE, test: TestSet | None, process_test: TestSet | None, config: Config,
    device: torch.device, dtype: torch.dtype, transform: Transform | None = None, rank: int = 0, world_size: int = 1,
) -> dict[str, float]:  # fmt: skip
    """What every evaluation reports: the test set's errors and gradient floor, the same along
    the forward process from the start state (keys prefixed ``process_``; ``process_test`` None:
    the PDE has no process) and the value at the start state (``start_errors``); ``test`` None
    (the PDE knows no solution there, ``PDE.truth_known``): the start state's alone."""
    out = {} if test is None else evaluate(model, test, config, device, dtype, transform, rank, world_size)
    if process_test is not None:
        along = evaluate(model, process_test, config, device, dtype, transform, rank, world_size, PROCESS_BLOCKS)
        out.update({PROCESS + key: value for key, value in along.items()})
    return {**out, **start_errors(model, pde, config, device, dtype, transform)}


def reference_errors(
    model: torch.nn.Module, pde: PDE, config: Config, device: torch.device, dtype: torch.dtype,
    transform: Transform | None = None,
) -> dict[str, dict[str, float | str]]:  # fmt: skip
    """The model beside the PDE's reference values (e.g. HJB's u(0, 0)), one process."""
    out: dict[str, dict[str, float | str]] = {}
    for name, (X, value, source) in pde.reference_values().items():
        u, _ = predict(model, X.to(device=device, dtype=dtype), config, transform=transform, gradient=False)
        got = float(u[0])
        out[name] = {"model": got, "reference": value, "rel_error": abs(got - value) / abs(value), "source": source}
    return out


def start_errors(
    model: torch.nn.Module, pde: PDE, config: Config, device: torch.device, dtype: torch.dtype,
    transform: Transform | None = None,
) -> dict[str, float]:  # fmt: skip
    """The model at the PDE's start state beside its reference (``PDE.start``): what a control
    or pricing user asks first, and what a test set of x ~ N(0, I) does not show at high d.
    Every rank computes the same (one point, its noise keyed by block 0); {} without a start."""
    start = pde.start()
    if start is None:
        return {}
    _, X, value, _ = start
    u, _ = predict(model, X.to(device=device, dtype=dtype), config, transform=transform, gradient=False)
    got = float(u[0])
    if value is None:  # a start state without a known value (Deep BSDE's problems at d = 1000)
        return {"start_value": got}
    return {"start_value": got, "start_reference": value, "start_rel_error": abs(got - value) / abs(value)}


def start_baselines(pde: PDE) -> dict[str, dict[str, float | str]]:
    """The PDE's baselines at its start state (``PDE.start_baselines``: values of simpler
    problems there) with their errors against its reference; {} where it has none."""
    start = pde.start()
    out: dict[str, dict[str, float | str]] = {}
    for name, (value, se, what) in pde.start_baselines().items():
        out[name] = {"value": value, "se": se, "what": what}
        if start is not None and start[2] is not None:
            out[name]["rel_error"] = abs(value - start[2]) / abs(start[2])
    return out


def baselines(pde: PDE, test: TestSet) -> dict[str, dict[str, float]]:
    """The errors of predictors that ignore how u depends on x, on the test set itself:
    ``constant`` (the test mean), ``t_only`` (time-dependent PDEs: the least-squares
    polynomial of degree T_ONLY_DEGREE in t, fitted to the test values; a lower degree on
    small test sets, at least 20 points per coefficient), ``condition_value``
    (the terminal or initial value everywhere, where the PDE has one) and
    ``constrained_constant`` (where the PDE has a hard constraint u = A + B f: the best
    constant f, ``sum B (u - A) / sum B^2`` on the test set, with gradient ``grad A + f grad B``;
    on STDE's two-body problems it already scores an error of order 1/sqrt(d)). The first two
    have gradient error 1. ``radial``: the best function of (|x|^2, t) (``radial_fit``), with
    the gradient of the fit: what a model that has learned nothing beyond radial symmetry
    scores (0 error for hjb, about std(a) / mean(a) in gradient for hjb_aniso)."""
    u, grad = test.u.double(), test.grad.double()
    zero = torch.zeros_like(grad)
    out = {"constant": relative_errors(torch.full_like(u, float(u.mean())), zero, u, grad)}
    if pde.time_dependent:
        t = test.X[:, -1].double().numpy()
        fit = np.polynomial.Polynomial.fit(t, u.numpy(), t_only_degree(t))
        out["t_only"] = relative_errors(torch.from_numpy(fit(t)), zero, u, grad)
    radial = radial_fit(test.X.double(), u, grad, pde.dim)
    if radial is not None:
        out["radial"] = relative_errors(radial[0], radial[1], u, grad)
    predictor = pde.condition_predictor(test.X.double())
    if predictor is not None:
        out["condition_value"] = relative_errors(predictor[0], predictor[1], u, grad)
    transform = pde.output_transform(test.X.double())
    if transform is not None:
        A, B = transform.A.double(), transform.B.double()
        f = float((B * (u - A)).sum() / (B * B).sum().clamp_min(1e-300))
        value_grad = zero if transform.A_grad is None else transform.A_grad.double()
        if transform.B_grad is not None:
            value_grad = value_grad + f * transform.B_grad.double()
        out["constrained_constant"] = relative_errors(A + f * B, value_grad, u, grad)
    return out


def radial_fit(
    X: torch.Tensor, u: torch.Tensor, grad: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The best function p(|x|^2, t) on the test points X (t: the columns after ``dim``, if any)
    and its gradient in x, ``2 x dp/d|x|^2``: the least-squares fit of the sum of the squared
    relative errors of u and of grad u (a gradient c x has error |c x - grad u|^2 = |x|^2 (c -
    x . grad u / |x|^2)^2 + const, so both parts are linear in the coefficients, one row per
    point each). Legendre polynomials of degree up to RADIAL_DEGREE in the radial variable times
    up to RADIAL_T_DEGREE in t, at least 20 points per coefficient; two radial variables are
    tried, |x|^2 and ln(1 + |x|^2) (HJB's solutions are logarithms of |x|^2, which spans orders
    of magnitude along the process), each mapped onto [-1, 1] over the points, and the better
    kept. A fit of the values alone has a noisy derivative where u is not radial (hjb_aniso,
    d = 100: gradient error 0.40 at degree 8 against 0.26 for the best c(x) x). None: too few
    points."""
    x = X[:, :dim].double()
    r2 = (x * x).sum(1).numpy()
    t = X[:, dim].double().numpy() if X.shape[1] > dim else None
    n, values = len(r2), u.double().numpy()
    t_degree = 0 if t is None else min(RADIAL_T_DEGREE, len(np.unique(t)) - 1)
    degree = min(RADIAL_DEGREE, n // (20 * (t_degree + 1)) - 1, len(np.unique(r2)) - 1)
    if degree < 1:
        return None
    g = grad.double()
    radial_part = ((x * g).sum(1) / torch.from_numpy(r2).clamp_min(1e-300)).numpy()  # x . grad u / |x|^2
    u_norm, g_norm = float(np.linalg.norm(values)) or 1.0, float(g.norm())
    tb = None if t is None else np.polynomial.legendre.legvander(_unit(t)[0], t_degree)
    best = None
    for phi, dphi in ((r2, np.ones_like(r2)), (np.log1p(r2), 1 / (1 + r2))):
        rho, slope = _unit(phi)  # rho in [-1, 1]; d rho / d phi
        basis = np.polynomial.legendre.legvander(rho, degree)
        d_basis = np.polynomial.legendre.legvander(rho, degree - 1) @ np.polynomial.legendre.legder(np.eye(degree + 1))
        d_basis = d_basis * (slope * dphi)[:, None]  # d / d|x|^2
        if tb is not None:
            basis = (basis[:, :, None] * tb[:, None, :]).reshape(n, -1)
            d_basis = (d_basis[:, :, None] * tb[:, None, :]).reshape(n, -1)
        rows, targets = [basis / u_norm], [values / u_norm]
        if g_norm > 0:
            weight = np.sqrt(r2)[:, None] / g_norm
            rows.append(2 * d_basis * weight), targets.append(radial_part * weight[:, 0])
        coef, *_ = np.linalg.lstsq(np.concatenate(rows), np.concatenate(targets), rcond=None)
        fit, d_r2 = basis @ coef, d_basis @ coef
        score = float(np.sum(((fit - values) / u_norm) ** 2))
        if g_norm > 0:
            score += float(np.sum(r2 * (2 * d_r2 - radial_part) ** 2) / g_norm**2)
        if best is None or score < best[0]:
            best = (score, fit, d_r2)
    _, fit, d_r2 = best
    return torch.from_numpy(fit), 2 * x * torch.from_numpy(d_r2).unsqueeze(1)


def _unit(v: np.ndarray) -> tuple[np.ndarray, float]:
    """v mapped affinely onto [-1, 1], and the map's slope."""
    low, high = float(v.min()), float(v.max())
    slope = 2 / (high - low) if high > low else 1.0
    return (v - low) * slope - 1, slope


def not_beaten(errors: dict[str, float], reference: dict[str, dict[str, float]], prefix: str = "") -> str | None:
    """A warning line when the solution error does not beat the best function of t alone
    (stationary PDEs: the best constant); None when it does, or where there are no baselines (no
    test set). ``prefix``: of the along-the-process set (``PROCESS``, with its own baselines as
    ``reference``)."""
    if not reference or prefix + "l2_rel" not in errors:
        return None
    name, what = ("t_only", "the best function of t alone") if "t_only" in reference else ("constant", "a constant")
    bound, key = reference[name]["l2_rel"], prefix + "l2_rel"
    if errors[key] < bound:
        return None
    where = "test set" if not prefix else "test set along the process from the start state"
    beyond = errors.get(prefix + "l2_rel_beyond_t")
    if beyond is not None and beyond < bound / 3:  # the shape in x is right; the level in t is not
        return (
            f"warning: the solution error {key}={errors[key]:.4g} does not beat {what} ({bound:.4g}, fitted to the "
            f"{where}), but all of it save {beyond:.2g} is a function of t: the model has the solution's "
            "dependence on x and misses its level over time"
        )
    return (
        f"warning: the solution error {key}={errors[key]:.4g} does not beat {what} ({bound:.4g}, fitted to the "
        f"{where}): the model has not learned how the solution depends on x"
    )
