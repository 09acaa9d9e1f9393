"""Heat on the unit ball, t in [0, T]: u_t = lap u, exact u = |x|^2/(2d) + t.

The solution is dominated by ``t`` (MATH.md section 5, REFERENCE.md): judge models by the
gradient error too.
"""

from __future__ import annotations

import torch

from dstein.estimators.base import Derivatives
from dstein.estimators.constraint import OutputTransform
from dstein.pdes.base import ExactPDE, uniform_ball, uniform_sphere


class Heat(ExactPDE):
    name = "heat"
    needs = frozenset({"u_t", "lap"})
    time_dependent = True
    conditions = ("initial", "boundary")
    constrained = ("initial",)

    def __init__(self, dim: int, T: float = 1.0):
        super().__init__(dim)
        if not T > 0:
            raise ValueError(f"pde.params.T={T!r} must be > 0")
        self.T = float(T)

    def describe(self) -> dict:
        return {**super().describe(), "T": self.T}

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
        """u = |x|^2 / (2d) + t f: the initial condition holds exactly (the boundary's stays a loss)."""
        x, t = X[:, :-1], X[:, -1]
        return OutputTransform(
            A=(x * x).sum(1) / (2 * self.dim), B=t, A_grad=x / self.dim, A_lap=torch.ones_like(t),
            B_t=torch.ones_like(t),
        )  # fmt: skip

    def condition_predictor(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The initial value |x|^2 / (2d) everywhere."""
        x = X[:, :-1]
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
        x = X[:, :-1]
        return (x * x).sum(1) / (2 * self.dim) + X[:, -1]

    def exact_grad(self, X: torch.Tensor) -> torch.Tensor:
        return X[:, :-1] / self.dim
