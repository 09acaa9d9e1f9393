"""The closed-loop cost of a feedback control (dstein/control.py) against closed forms.

The linear-quadratic problem u_t + lap u - mu |grad u|^2 = 0, u(T) = a |x|^2 (HJB's equation
with a quadratic terminal cost) has u = p(t) |x|^2 + q(t), p = a / (1 + 4 mu a (T - t)),
q = (d / (2 mu)) ln(1 + 4 mu a (T - t)): the optimal cost from 0 is q(0), its control -2 mu p x.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dstein import control
from dstein.control import closed_loop_costs
from dstein.pdes import ControlProblem, build_pde
from dstein.pdes.hjb import cole_hopf_radial

D, A, MU, T = 10, 0.5, 1.0, 1.0


def quadratic() -> ControlProblem:
    return ControlProblem(
        x0=torch.zeros(D, dtype=torch.float64), T=T, drift=2.0, noise=math.sqrt(2.0),
        running=lambda m: (m * m).sum(1) / MU, terminal=lambda x: A * (x * x).sum(1),
    )  # fmt: skip


def exact_gradient(x: torch.Tensor, t: float) -> torch.Tensor:
    return 2 * A / (1 + 4 * MU * A * (T - t)) * x


OPTIMAL = D / (2 * MU) * math.log(1 + 4 * MU * A * T)


def feedback(scale: float):
    return lambda x, t, grad: -MU * scale * grad


def extrapolated(r: dict) -> tuple[float, float]:
    """The cost less its estimated time-step bias, with the standard error of both together."""
    return r["cost"] - r["time_step_bias"], math.hypot(r["cost_se"], r["time_step_bias_se"])


def test_the_optimal_feedback_costs_the_value_and_its_bias_is_estimated():
    """With the exact gradient the cost less its estimated time-step bias is u(0, 0) within its
    standard error; the stated bias is the cost's actual distance from u(0, 0) at two step
    counts; the control variate leaves the mean alone and cuts the standard error."""
    for steps in (40, 100):
        r = closed_loop_costs(quadratic(), exact_gradient, feedback(1.0), 2000, steps, seed=0)
        value, se = extrapolated(r)
        assert abs(value - OPTIMAL) < 4 * se, (steps, r)
        assert r["cost"] - OPTIMAL == pytest.approx(r["time_step_bias"], abs=4 * se + 0.2 * r["time_step_bias"])
        assert r["cost_se"] < r["cost_se_plain"] / 3
    assert r["uncontrolled"] == pytest.approx(2 * A * T * D, abs=4 * r["uncontrolled_se"])  # E a |sqrt(2T) Z|^2


def test_a_worse_control_costs_more_and_no_control_costs_the_uncontrolled_value():
    """Twice the optimal feedback: a gap far beyond the errors; no feedback: the uncontrolled
    cost E[g(x0 + sqrt(2 T) Z)] = 2 a T d (Euler is exact there); the control variate of a
    suboptimal control is still unbiased (plain and variate-corrected means agree)."""
    worse = closed_loop_costs(quadratic(), exact_gradient, feedback(2.0), 2000, 40, seed=0)
    value, se = extrapolated(worse)
    assert value - OPTIMAL > 30 * se and value < worse["uncontrolled"]
    none = closed_loop_costs(quadratic(), exact_gradient, feedback(0.0), 2000, 40, seed=0)
    assert none["cost"] == pytest.approx(2 * A * T * D, abs=4 * none["cost_se"])
    assert abs(none["time_step_bias"]) < 4 * none["time_step_bias_se"]
    assert none["cost_se"] < none["cost_se_plain"]  # the variate of the exact gradient helps here too
    assert worse["cost"] == pytest.approx(worse["cost_plain"], abs=4 * worse["cost_se_plain"])
    assert worse["cost_se"] < worse["cost_se_plain"]


def test_hjb_declares_the_control_problem_its_solution_is_the_value_of():
    """HJB's dynamics and costs (dX = 2 m dt + sqrt(2) dW, |m|^2 / mu, g) with its feedback
    -mu grad u from the Cole-Hopf gradient: the cost is the start value's reference."""
    hjb = build_pde("hjb", 4)
    problem = hjb.control_problem()
    assert problem.drift == 2.0 and problem.noise == math.sqrt(2.0) and torch.equal(problem.x0, torch.zeros(4))

    def gradient(x: torch.Tensor, t: float) -> torch.Tensor:
        return torch.from_numpy(cole_hopf_radial(x.numpy(), np.full(len(x), t), 1.0, 1.0, 4000, 1)[1])

    r = closed_loop_costs(problem, gradient, lambda x, t, grad: hjb.control(x, grad), 400, 20, seed=0)
    value, se = extrapolated(r)
    assert abs(value - hjb.start()[2]) < 4 * se + 0.002, r
    assert r["uncontrolled"] - hjb.start()[2] > 5 * r["uncontrolled_se"]
    assert build_pde("poisson", 2).control_problem() is None


def test_closed_loop_refuses_odd_steps():
    with pytest.raises(ValueError, match="steps=3 must be even"):
        closed_loop_costs(quadratic(), exact_gradient, feedback(1.0), 10, 3, seed=0)


def test_the_chunks_of_paths_dealt_to_ranks_add_up_to_the_one_rank_result(monkeypatch):
    """Three ranks each simulate their chunks (keyed by chunk, not by rank) and their sums add
    up to the one-rank figures; a chunk is CONTROL_CHUNK paths, the last one shorter."""
    one = closed_loop_costs(quadratic(), exact_gradient, feedback(1.0), 600, 4, seed=0)
    shares: list[torch.Tensor] = []
    monkeypatch.setattr(control, "sum_values", lambda sums: shares.append(sums.clone()) or sums)
    for rank in range(3):
        closed_loop_costs(quadratic(), exact_gradient, feedback(1.0), 600, 4, seed=0, rank=rank, world_size=3)
    assert len(shares) == 3 and control.CONTROL_CHUNK == 256  # chunks of 256, 256, 88: one per rank
    total = sum(shares)
    monkeypatch.setattr(control, "sum_values", lambda sums: total)
    dealt = closed_loop_costs(quadratic(), exact_gradient, feedback(1.0), 600, 4, seed=0, rank=0, world_size=3)
    assert dealt.keys() == one.keys()
    for key, value in one.items():
        assert dealt[key] == pytest.approx(value, rel=1e-12), key
