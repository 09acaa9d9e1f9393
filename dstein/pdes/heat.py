"""Heat on the unit ball, t in [0, T]: u_t = lap u, with one of two exact solutions
(``pde.params.solution``):

- ``paper``: u = |x|^2/(2d) + t, the paper's (REFERENCE.md). It is dominated by ``t`` (judge
  models by the gradient error too), radial, and its hard constraint u = |x|^2/(2d) + t f holds
  it at f = 1: a config of it measures nothing of x.
- ``modes``: u = sum_k c_k exp(-|w_k|^2 t) sin(w_k . x + b_k), ``modes`` plane waves with
  directions uniform on the sphere, |w_k| uniform in [frequency / 2, 3 frequency / 2], phases
  b_k uniform in [0, 2 pi) and c_k = 1 / sqrt(modes), drawn once from ``mode_seed``: neither
  radial nor reachable by the constraint u = u(x, 0) + t f with a constant f (docs/MATH.md
  section 18).
"""

from __future__ import annotations

import math

import torch

from dstein.estimators.base import Derivatives
from dstein.estimators.constraint import OutputTransform
from dstein.pdes.base import ExactPDE, uniform_ball, uniform_sphere

#: Heat's exact solutions (``pde.params.solution``).
SOLUTIONS = ("paper", "modes")


def _at_time_zero(X: torch.Tensor) -> torch.Tensor:
    """The points X with their time column set to 0."""
    return torch.cat([X[:, :-1], torch.zeros_like(X[:, -1:])], 1)


class Heat(ExactPDE):
    name = "heat"
    needs = frozenset({"u_t", "lap"})
    time_dependent = True
    conditions = ("initial", "boundary")
    constrained = ("initial",)

    def __init__(
        self, dim: int, T: float = 1.0, solution: str = "paper", modes: int = 4, frequency: float = 2.0,
        mode_seed: int = 0,
    ):  # fmt: skip
        super().__init__(dim)
        if not T > 0:
            raise ValueError(f"pde.params.T={T!r} must be > 0")
        if solution not in SOLUTIONS:
            raise ValueError(f"pde.params.solution={solution!r} must be one of {SOLUTIONS}")
        self.T, self.solution = float(T), solution
        self.W = self.b = self.c = None
        if solution == "modes":
            if not (isinstance(modes, int) and 1 <= modes <= 4096):
                raise ValueError(f"pde.params.modes={modes!r} must be an integer from 1 to 4096")
            if not (math.isfinite(frequency) and 0 < frequency <= 1e3):
                raise ValueError(f"pde.params.frequency={frequency!r} must be a finite number > 0 and <= 1000")
            if not (isinstance(mode_seed, int) and mode_seed >= 0):
                raise ValueError(f"pde.params.mode_seed={mode_seed!r} must be an integer >= 0")
            gen = torch.Generator().manual_seed(mode_seed)
            v = torch.randn(modes, dim, generator=gen, dtype=torch.float64)
            size = frequency * (0.5 + torch.rand(modes, 1, generator=gen, dtype=torch.float64))
            self.W = size * v / v.norm(dim=1, keepdim=True)  # (K, d): the wave vectors
            self.b = 2 * math.pi * torch.rand(modes, generator=gen, dtype=torch.float64)
            self.c = torch.full((modes,), 1 / math.sqrt(modes), dtype=torch.float64)
            self.modes, self.frequency, self.mode_seed = modes, float(frequency), mode_seed

    def describe(self) -> dict:
        out = {**super().describe(), "T": self.T}
        if self.solution == "modes":  # files written before the modes existed stay valid
            out.update(solution="modes", modes=self.modes, frequency=self.frequency, mode_seed=self.mode_seed)
        return out

    def _waves(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The phases w_k . x + b_k (B, K), the amplitudes c_k exp(-|w_k|^2 t) (B, K) and W (K, d)."""
        W, b, c = (v.to(dtype=X.dtype, device=X.device) for v in (self.W, self.b, self.c))  # type: ignore[union-attr]
        phase = X[:, :-1] @ W.T + b
        return phase, c * torch.exp(-X[:, -1:] * (W * W).sum(1)), W

    def residual(self, X: torch.Tensor, D: Derivatives) -> torch.Tensor:
        return D.require("u_t") - D.require("lap")

    def _times(self, n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        return self.T * torch.rand(n, 1, generator=gen, dtype=dtype)

    def sample_domain(self, n: int, gen: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.cat([uniform_ball(n, self.dim, gen, dtype=dtype), self._times(n, gen, dtype)], 1)

    def sample_condition(
        self, kind: str, n: int, gen: torch.Generator, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        if kind == "initial":
            return torch.cat([uniform_ball(n, self.dim, gen, dtype=dtype), torch.zeros(n, 1, dtype=dtype)], 1)
        return torch.cat([uniform_sphere(n, self.dim, gen, dtype=dtype), self._times(n, gen, dtype)], 1)

    def condition_target(self, kind: str, X: torch.Tensor) -> torch.Tensor:
        return self.exact(X)

    def output_transform(self, X: torch.Tensor) -> OutputTransform:
        """u = u(x, 0) + t f: the initial condition holds exactly (the boundary's stays a loss)."""
        x, t = X[:, :-1], X[:, -1]
        if self.solution == "modes":
            phase, amp, W = self._waves(_at_time_zero(X))
            waves = amp * torch.sin(phase)
            return OutputTransform(
                A=waves.sum(1), B=t, A_grad=(amp * torch.cos(phase)) @ W, A_lap=-waves @ (W * W).sum(1),
                B_t=torch.ones_like(t),
            )  # fmt: skip
        return OutputTransform(
            A=(x * x).sum(1) / (2 * self.dim), B=t, A_grad=x / self.dim, A_lap=torch.ones_like(t),
            B_t=torch.ones_like(t),
        )  # fmt: skip

    def condition_predictor(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The initial value everywhere."""
        x = X[:, :-1]
        if self.solution == "modes":
            return self.exact(_at_time_zero(X)), self.exact_grad(_at_time_zero(X))
        return (x * x).sum(1) / (2 * self.dim), x / self.dim

    def project(self, X: torch.Tensor) -> torch.Tensor:
        x, t = X[:, :-1], X[:, -1:]
        norm = x.norm(dim=1, keepdim=True).clamp_min(1.0)
        return torch.cat([x / norm, t.clamp(0.0, self.T)], 1)

    def project_condition(self, kind: str, X: torch.Tensor) -> torch.Tensor:
        x, t = X[:, :-1], X[:, -1:]
        if kind == "initial":
            return torch.cat([self.project(X)[:, :-1], torch.zeros_like(t)], 1)
        return torch.cat([x / x.norm(dim=1, keepdim=True), t.clamp(0.0, self.T)], 1)

    def slice(self, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        coord = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
        X = torch.zeros(n, self.in_dim, dtype=torch.float64)
        X[:, 0], X[:, -1] = coord, 0.5 * self.T
        return X, coord, "x_1 (other x_i = 0, t = T/2)"

    def exact(self, X: torch.Tensor) -> torch.Tensor:
        if self.solution == "modes":
            phase, amp, _ = self._waves(X)
            return (amp * torch.sin(phase)).sum(1)
        x = X[:, :-1]
        return (x * x).sum(1) / (2 * self.dim) + X[:, -1]

    def exact_grad(self, X: torch.Tensor) -> torch.Tensor:
        if self.solution == "modes":
            phase, amp, W = self._waves(X)
            return (amp * torch.cos(phase)) @ W
        return X[:, :-1] / self.dim
