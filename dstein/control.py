"""The learned control's cost: the closed loop that a trained solution's feedback drives.

Where a PDE's solution is the value function of a stochastic control problem
(``PDE.control_problem``; HJB u_t + lap u - mu |grad u|^2 = 0, u(T) = g:

    u(0, x0) = min over m of E[ int_0^T |m_t|^2 / mu dt + g(X_T) ],  dX = 2 m dt + sqrt(2) dW,  X_0 = x0,

with the optimal feedback m = -mu grad u), a trained solution can be judged without any ground
truth: drive the process with its feedback and measure the cost J it achieves. Every control
costs at least u(0, x0), the optimal one exactly that, so the gap J - u(0, x0) (u the model's
own value) says how good the learned control is, at any d. The uncontrolled cost
E[g(x0 + noise W_T)] is the baseline a useful control stays below.

The simulation (``closed_loop``): Euler-Maruyama with ``steps`` time steps on ``paths`` paths,
the control at each step from the gradient of the network itself (``predict(smooth=False)``: the
smoothed model differs by about sigma^2 grad lap g / 2, and smoothing every one of the
paths x steps gradients would cost eval.samples forward passes each).

- Variance: Ito's formula for u along a path gives cost = u(0, x0) + int noise grad u . dW
  + int |m + mu grad u|^2 / mu dt for the exact u. The stochastic integral has mean zero for any
  adapted integrand, in discrete time too (grad u at X_k times the increment after it), so it is
  subtracted from each path's cost as a control variate with the model's gradient: unbiased,
  and its variance shrinks to what the model's error leaves (``cost_se``; ``cost_plain`` and
  ``cost_se_plain`` without it).
- Bias: the same Brownian paths at half the steps (increments summed in pairs) give a second
  cost; Euler's weak error is first order, so J(steps/2) - J(steps) estimates the time-step
  error of J(steps) (``time_step_bias``, with its standard error from the coupled paths).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from dstein.config import Config
from dstein.distributed import sum_values
from dstein.evaluation import Transform, predict, start_errors
from dstein.noise import Streams, counter_seed, split_evenly
from dstein.pdes import PDE, ControlProblem

#: grad u at states (B, d) and a time, float64 in and out.
Gradient = Callable[[torch.Tensor, float], torch.Tensor]


def with_time(x: torch.Tensor, t: float) -> torch.Tensor:
    """The points (x, t) of states x (B, d) at one time t, as the model and the PDE take them."""
    return torch.cat([x, torch.full((x.shape[0], 1), t, dtype=x.dtype, device=x.device)], 1)


def simulate(
    problem: ControlProblem, gradient: Gradient, feedback: Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor],
    paths: int, steps: int, gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Each path's cost minus its control variate, at ``steps`` and at ``steps / 2`` time steps
    on the same Brownian paths: two tensors of shape (paths, 2) holding (cost, variate)."""
    d, dt = problem.x0.numel(), problem.T / steps
    fine = problem.x0.double().expand(paths, d).clone()
    coarse = fine.clone()
    out = {name: torch.zeros(paths, 2, dtype=torch.float64) for name in ("fine", "coarse")}
    coarse_m = coarse_g = coarse_dw = None
    for k in range(steps):
        t = k * dt
        dw = math.sqrt(dt) * torch.randn(paths, d, generator=gen, dtype=torch.float64)
        g = gradient(fine, t)
        m = feedback(fine, t, g)
        out["fine"][:, 0] += problem.running(m) * dt
        out["fine"][:, 1] += problem.noise * (g * dw).sum(1)
        fine += problem.drift * dt * m + problem.noise * dw
        if k % 2 == 0:  # the coarse path's step starts here: its control now, its increment the pair's sum
            coarse_g = gradient(coarse, t)
            coarse_m, coarse_dw = feedback(coarse, t, coarse_g), dw
            continue
        assert coarse_m is not None and coarse_g is not None and coarse_dw is not None
        coarse_dw = coarse_dw + dw
        out["coarse"][:, 0] += problem.running(coarse_m) * 2 * dt
        out["coarse"][:, 1] += problem.noise * (coarse_g * coarse_dw).sum(1)
        coarse += problem.drift * 2 * dt * coarse_m + problem.noise * coarse_dw
    out["fine"][:, 0] += problem.terminal(fine)
    out["coarse"][:, 0] += problem.terminal(coarse)
    return out["fine"], out["coarse"]


#: Paths are simulated in chunks of this many, chunk c from a generator keyed by (seed, c):
#: the chunks are dealt to the ranks, so the result does not depend on their number, and the
#: memory on the chunk (its states are CONTROL_CHUNK x d numbers, a few of them at a time).
CONTROL_CHUNK = 256
#: Per path: cost less variate at the steps asked for, plain cost, at half the steps, their
#: difference (the time-step bias), uncontrolled cost; sums of each and of its square.
_QUANTITIES = ("cost", "cost_plain", "cost_half_steps", "time_step_bias", "uncontrolled")


def closed_loop_costs(
    problem: ControlProblem, gradient: Gradient, feedback: Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor],
    paths: int, steps: int, seed: int, rank: int = 0, world_size: int = 1,
) -> dict[str, float]:  # fmt: skip
    """The cost of the feedback's closed loop with its standard error and time-step bias, and
    the uncontrolled cost (no model: exact, x0 + noise sqrt(T) Z). With ``world_size`` ranks
    (each calls this) the chunks of paths are dealt to them and the sums added."""
    if steps % 2 or steps < 2 or paths < 2:
        raise ValueError(f"closed loop: steps={steps} must be even and >= 2, paths={paths} >= 2")
    sums = torch.zeros(2, len(_QUANTITIES), dtype=torch.float64)
    chunks = -(-paths // CONTROL_CHUNK)
    for c in range(*split_evenly(chunks, rank, world_size)):
        n = min(CONTROL_CHUNK, paths - c * CONTROL_CHUNK)
        fine, coarse = simulate(problem, gradient, feedback, n, steps,
                                torch.Generator().manual_seed(counter_seed(seed, Streams.CONTROL, c)))  # fmt: skip
        gen = torch.Generator().manual_seed(counter_seed(seed, Streams.CONTROL, c, 1))
        z = torch.randn(n, problem.x0.numel(), generator=gen, dtype=torch.float64)
        free = problem.terminal(problem.x0.double() + problem.noise * math.sqrt(problem.T) * z)
        cost, half = fine[:, 0] - fine[:, 1], coarse[:, 0] - coarse[:, 1]
        values = torch.stack([cost, fine[:, 0], half, half - cost, free])  # in _QUANTITIES' order
        sums += torch.stack([values.sum(1), (values * values).sum(1)])
    sums = sum_values(sums)
    mean = sums[0] / paths
    se = ((sums[1] / paths - mean * mean).clamp_min(0) * paths / (paths - 1) / paths).sqrt()
    out: dict[str, float] = {"paths": paths, "steps": steps}
    for name, m, e in zip(_QUANTITIES, mean.tolist(), se.tolist(), strict=True):
        out[name] = m
        if name != "cost_half_steps":
            out[{"cost": "cost_se", "cost_plain": "cost_se_plain"}.get(name, name + "_se")] = e
    return out


def model_gradient(
    model: torch.nn.Module, config: Config, device: torch.device, dtype: torch.dtype, transform: Transform | None
) -> Gradient:
    """grad u of the trained network (hard constraint applied) at states x and a time t."""

    def gradient(x: torch.Tensor, t: float) -> torch.Tensor:
        _, grad = predict(model, with_time(x, t).to(device=device, dtype=dtype), config, transform=transform,
                          smooth=False)  # fmt: skip
        assert grad is not None
        return grad.double().cpu()

    return gradient


def closed_loop(
    model: torch.nn.Module, pde: PDE, config: Config, device: torch.device, dtype: torch.dtype,
    transform: Transform | None = None, paths: int | None = None, steps: int | None = None,
    rank: int = 0, world_size: int = 1,
) -> dict[str, Any] | None:  # fmt: skip
    """The learned feedback's closed-loop cost J beside the model's u(0, x0) (the gap J - u,
    >= 0 up to the standard error and the time-step bias), the reference value where the PDE
    has one, and the uncontrolled cost; None where the PDE is no control problem. ``paths``
    and ``steps`` default to eval.control_paths and eval.control_steps. With ``world_size``
    ranks every rank calls this and simulates its chunks of the paths; all get the result."""
    problem = pde.control_problem()
    if problem is None:
        return None
    began = time.perf_counter()
    paths = paths or config.eval.control_paths
    steps = steps or config.eval.control_steps

    def feedback(x: torch.Tensor, t: float, grad: torch.Tensor) -> torch.Tensor:
        control = pde.control(with_time(x, t), grad)
        assert control is not None
        return control

    with torch.random.fork_rng(devices=[]):
        out: dict[str, Any] = closed_loop_costs(
            problem,
            model_gradient(model, config, device, dtype, transform),
            feedback,
            paths,
            steps,
            config.eval.seed,
            rank,
            world_size,
        )
    value = start_errors(model, pde, config, device, dtype, transform)
    start = pde.start()
    if value and start is not None:
        out["start_name"], out["value"] = start[0], value["start_value"]
        out["gap"] = out["cost"] - value["start_value"]
        out["gap_rel"] = out["gap"] / abs(value["start_value"])
        if "start_reference" in value:
            out["reference"] = value["start_reference"]
            out["gap_to_reference_rel"] = (out["cost"] - value["start_reference"]) / abs(value["start_reference"])
    out["seconds"] = time.perf_counter() - began  # the only figure that differs between identical runs
    return out


def describe(result: dict[str, Any]) -> str:
    """One line of the closed loop's figures (the run's end, launch/evaluate.py --control)."""
    line = (f"closed loop ({result['paths']} paths, {result['steps']} steps): cost J {result['cost']:.5f} "
            f"+- {result['cost_se']:.1e} (time-step bias {result['time_step_bias']:+.1e})")  # fmt: skip
    if "gap" in result:
        line += (f", gap J - {result['start_name']} {result['gap']:+.5f} ({result['gap_rel']:+.3%} of the model's "
                 f"{result['value']:.5f}")  # fmt: skip
        if "reference" in result:
            line += f"; {result['gap_to_reference_rel']:+.3%} of the reference {result['reference']:.5f}"
        line += ")"
    return line + f"; uncontrolled {result['uncontrolled']:.5f} +- {result['uncontrolled_se']:.1e}"
