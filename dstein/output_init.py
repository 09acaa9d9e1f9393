"""The output's starting level (``model.output_init=fit``): before the first step the
network's output bias is moved by the constant ``t`` that minimizes the first step's loss.

Why: Adam moves the output bias by about ``train.lr`` per step whatever its gradient, so a
solution whose level is far from the network's initial output (about 0) takes level / lr
steps to reach. STDE's two-body problems have ``f ~ sin(1) sum_i c_i`` under their hard
constraint, of order sqrt(d): about -130 at d = 10,000 for coeff_seed 0, which 2000 steps at
lr 1e-3 cannot reach (L2 0.19 against the best constant's 0.0017).

How: adding ``t`` to the output bias adds ``t`` to the smoothed network ``f`` and leaves its
derivatives unchanged, so every estimated derivative of ``u = A + B f`` is a polynomial in
``t`` of degree at most two (u, u_t, grad, lap: affine; |grad u|^2: quadratic through
``f grad B``). Three estimates with the first step's noise, at shifts -1, 0 and 1, give each
derivative exactly as a function of ``t`` (interpolation); the loss (squared residual plus
the weighted condition misfits) is then minimized over ``t`` by Newton's method with
backtracking, its value and derivatives summed over all ranks (each point group's once) at
every iteration, so every rank takes the same ``t``. Nothing else in the model changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dstein.data.points import Batch
from dstein.distributed import sum_values
from dstein.estimators import Derivatives
from dstein.estimators.sharded import Estimator
from dstein.noise import Streams
from dstein.pdes import PDE

#: Newton iterations at most, and halvings of a step that does not lower the loss.
MAX_ITERATIONS = 50
MAX_HALVINGS = 40


def output_bias(model: torch.nn.Module) -> torch.nn.Parameter:
    """The bias of the model's last layer (dstein's MLP families: ``body[-1]``, or ``body[-2]``
    before a ``Scale`` (model.output_scale): the shift found is then in the bias's units, the
    output moving by the scale times it, which the fit takes into account as it varies the bias)."""
    body = getattr(model, "body", None)
    layers = [m for m in body if isinstance(m, torch.nn.Linear)] if isinstance(body, torch.nn.Sequential) else []
    last = layers[-1] if layers else None
    if not isinstance(last, torch.nn.Linear) or last.bias is None or last.out_features != 1:
        raise ValueError("model.output_init=fit needs a model whose last layer is a Linear with one output and a bias")
    return last.bias


Polynomial = Callable[[torch.Tensor], Derivatives]


def _interpolate(at: list[Derivatives]) -> Polynomial:
    """``D(t)`` from the estimates at shifts -1, 0, 1: each field a quadratic in t (exact
    for fields of degree <= 2), in float64."""
    fields = sorted(at[1].available())
    coeffs = {}
    for name in fields:
        lo, mid, hi = (getattr(D, name).detach().double() for D in at)
        coeffs[name] = (mid, (hi - lo) / 2, (hi - 2 * mid + lo) / 2)

    def D(t: torch.Tensor) -> Derivatives:
        return Derivatives(**{name: c0 + t * (c1 + t * c2) for name, (c0, c1, c2) in coeffs.items()})

    return D


def fit_output_bias(
    model: torch.nn.Module,
    pde: PDE,
    estimator: Estimator,
    points: dict[str, Batch],
    condition_weight: float,
) -> tuple[float, float, float]:
    """Move the output bias by the loss-minimizing constant (see the module); returns it
    with the first step's loss (squared residual) before and after."""
    bias = output_bias(model)
    dom = points["domain"]
    kinds = [(k, kind) for k, kind in enumerate(pde.conditions) if kind in points]
    estimates: list[tuple[Derivatives, list[Derivatives]]] = []
    for shift in (-1.0, 0.0, 1.0):  # with autograd on: the autograd methods differentiate g
        with torch.no_grad():
            bias.add_(shift)
        cache: dict = {}
        D = estimator(model, dom.X, pde.needs, step=0, stream=Streams.DOMAIN, rows=dom.rows, cache=cache)
        conds = [
            estimator(model, points[kind].X, frozenset({"u"}), step=0, stream=Streams.condition(k),
                      samples=estimator.condition_samples, rows=points[kind].rows, cache=cache)
            for k, kind in kinds
        ]  # fmt: skip
        with torch.no_grad():
            bias.sub_(shift)
        estimates.append((D, conds))
    residual_at = _interpolate([D for D, _ in estimates])
    condition_at = [_interpolate([conds[i] for _, conds in estimates]) for i in range(len(kinds))]
    copies = estimator.shard.size  # the ranks of a sample group hold the same residuals
    X = dom.X.double()
    targets = [pde.condition_target(kind, points[kind].X.double()) for _, kind in kinds]

    def loss(t: torch.Tensor) -> torch.Tensor:
        r = pde.residual(X, residual_at(t))
        total = (r * r).sum() / dom.total
        for (_, kind), u_at, target in zip(kinds, condition_at, targets, strict=True):
            diff = u_at(t).require("u") - target
            total = total + condition_weight * (diff * diff).sum() / points[kind].total
        return total

    def newton_terms(t: float) -> tuple[float, float, float]:
        tt = torch.tensor(t, dtype=torch.float64, requires_grad=True)
        value = loss(tt)
        (slope,) = torch.autograd.grad(value, tt, create_graph=True)
        curvature = torch.autograd.grad(slope, tt)[0] if slope.requires_grad else torch.zeros(())
        out = sum_values(torch.stack([value.detach(), slope.detach(), curvature.detach()])) / copies
        return float(out[0]), float(out[1]), float(out[2])

    def value_at(t: float) -> float:
        with torch.no_grad():
            return float(sum_values(loss(torch.tensor(t, dtype=torch.float64)).reshape(1))[0] / copies)

    t, before = 0.0, None
    for _ in range(MAX_ITERATIONS):
        value, slope, curvature = newton_terms(t)
        before = value if before is None else before
        if slope == 0.0:
            break
        step = -slope / curvature if curvature > 0 else -slope
        for _ in range(MAX_HALVINGS):
            if value_at(t + step) < value:
                break
            step /= 2
        else:
            break  # no step lowers the loss: t is a minimum to rounding
        t += step
        if abs(step) <= 1e-9 * (1.0 + abs(t)):
            break
    with torch.no_grad():
        bias.add_(t)
    assert before is not None
    return t, before, value_at(t)
