"""The Feynman-Kac consistency of a trained solution along its PDE's forward process: a value
of u(0, x0) that needs no reference (docs/MATH.md section 19).

A terminal-value PDE with a forward process X (generator L, ``PDE.sample_process``) has the
residual ``u_t + L u + f(t, x, u, grad u)``. Freeze f at the trained solution, ``F(s, x) =
f(s, x, u~, grad u~)``: the linear equation ``v_t + L v + F = 0``, ``v(T) = g``, has

    v(0, x0) = E[g(X_T)] + int_0^T E[F(s, X_s)] ds = E[g(X_T)] + T E[F(S, X_S)],  S ~ U(0, T),

a plain Monte Carlo over the process's marginals (no paths, no time steps, no bias). If u~ is
the solution, v = u, so ``v(0, x0) - u~(0, x0)`` measures how far the model is from solving
the PDE where its process goes, at any d, with a standard error: Deep BSDE's own check (its
loss is this equation along paths), for problems such as Deep BSDE's benchmarks at d = 1000
where no published value exists.

F comes from the PDE's own residual at derivatives whose linear part is zero (``u_t``, the
Laplacian, the trace and the drift's column of ``along`` set to 0; u, grad u and the other
``along`` columns from the model), which is f whenever the residual has the form above: hjb's
``-mu |grad u|^2``, Allen-Cahn's ``u - u^3``, the default risk's and the two rates' drivers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from dstein.config import Config
from dstein.estimators.base import Derivatives
from dstein.evaluation import Transform, predict, start_errors
from dstein.noise import Streams, counter_seed
from dstein.pdes import PDE

#: Terminal draws of E[g(X_T)] (only g is evaluated there: cheap), in chunks of CHUNK: 64 per
#: state along the process (its se then stays below the driver's), at most TERMINAL_DRAWS and
#: about 2^28 numbers (26,624 draws at d = 10,000).
TERMINAL_DRAWS, CHUNK = 1 << 18, 4096
#: The evaluation noise of the states along the process is keyed from this block on.
CONSISTENCY_BLOCKS = 1 << 29

Solution = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def supported(pde: PDE) -> bool:
    """Whether the PDE has what the check needs: a forward process with its terminal points,
    a terminal condition and a start state."""
    return (
        {"domain", "terminal"} <= set(pde.process_kinds) and "terminal" in pde.conditions and (pde.start() is not None)
    )


def frozen_driver(pde: PDE, X: torch.Tensor, u: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """f(t, x, u, grad u) at points X: the PDE's residual with its linear part (u_t, L u) zero."""
    zero = torch.zeros_like(u)
    D = Derivatives(u=u, grad=grad, grad_sq=(grad * grad).sum(1), u_t=zero, lap=zero, trace=zero)
    directions, _ = pde.coefficients(X)
    if directions is not None:
        along = torch.einsum("bmd,bd->bm", directions.to(grad.dtype), grad)
        if pde.has_drift:  # the drift's column is L's
            along = torch.cat([torch.zeros_like(along[:, :1]), along[:, 1:]], 1)
        D.along = along
    return pde.residual(X, D)


def consistency(
    pde: PDE, solution: Solution, points: int, seed: int = 0, model_start: float | None = None
) -> dict[str, Any]:
    """v(0, x0) of the module docstring from ``points`` states along the process (the model's u
    and grad u there from ``solution``, a function of points X giving (u, grad u)) and
    up to TERMINAL_DRAWS terminal states, with its standard error, beside the model's own u(0, x0)."""
    if not supported(pde):
        raise ValueError(f"pde {pde.name} has no forward process with terminal points and a start state")
    gen = torch.Generator().manual_seed(counter_seed(seed, Streams.CONSISTENCY))
    X = pde.sample_process("domain", points, gen)
    u, grad = solution(X)
    F = frozen_driver(pde, X, u.double(), grad.double()).detach().double()
    sums = torch.zeros(2, dtype=torch.float64)
    T = None
    chunks = max(1, min(TERMINAL_DRAWS, (1 << 28) // pde.dim, 64 * points) // CHUNK)
    draws = chunks * CHUNK
    for c in range(chunks):
        chunk_gen = torch.Generator().manual_seed(counter_seed(seed, Streams.CONSISTENCY, c + 1))
        XT = pde.sample_process("terminal", CHUNK, chunk_gen)
        T = float(XT[0, -1])
        g = pde.condition_target("terminal", XT).double()
        sums += torch.stack([g.sum(), (g * g).sum()])
    assert T is not None
    g_mean = float(sums[0]) / draws
    g_var = max(float(sums[1]) / draws - g_mean**2, 0.0) * draws / (draws - 1)
    value = g_mean + T * float(F.mean())
    se = math.sqrt(g_var / draws + T * T * float(F.var()) / points)
    _, X0, reference, _ = pde.start()  # type: ignore[misc]
    model = float(solution(X0)[0][0]) if model_start is None else model_start
    out: dict[str, Any] = {
        "points": points, "terminal_draws": draws, "value": value, "se": se, "model": model,
        "gap": model - value, "rel_gap": abs(model - value) / abs(value), "terminal_mean": g_mean,
        "driver_integral": T * float(F.mean()),
    }  # fmt: skip
    if reference is not None:
        out["reference"] = reference
    return out


def model_consistency(
    model: torch.nn.Module, pde: PDE, config: Config, device: torch.device, dtype: torch.dtype,
    transform: Transform | None = None, points: int | None = None,
) -> dict[str, Any] | None:  # fmt: skip
    """``consistency`` of a trained model (its evaluated u and grad u: the smoothed model for
    Stein methods, the hard constraint applied) with ``points`` (default eval.consistency_points);
    None where the PDE does not support it or no points are asked."""
    points = points or config.eval.consistency_points
    if not points or not supported(pde):
        return None

    def solution(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, grad = predict(model, X.to(device=device, dtype=dtype), config, first_block=CONSISTENCY_BLOCKS,
                          transform=transform)  # fmt: skip
        assert grad is not None
        return u.detach().double().cpu(), grad.detach().double().cpu()

    began = time.perf_counter()
    start = start_errors(model, pde, config, device, dtype, transform)  # what the evaluations report
    out = consistency(pde, solution, points, config.eval.seed, start.get("start_value"))
    out["seconds"] = time.perf_counter() - began
    return out


def describe(result: dict[str, Any]) -> str:
    """One line: the consistency value beside the model's u(0, x0)."""
    line = (
        f"consistency along the process ({result['points']} points): E[g(X_T) + int f] = {result['value']:.6g} "
        f"+- {result['se']:.1e} against the model's u(0,x0) {result['model']:.6g} (gap {result['gap']:+.3g}, "
        f"{100 * result['rel_gap']:.3f}%)"
    )
    if "reference" in result:
        line += f"; reference {result['reference']:.6g}"
    return line
