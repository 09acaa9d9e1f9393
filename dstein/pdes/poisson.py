"""Poisson on [0,1]^d: lap u + sin(sum x) = 0, u = sin(sum x)/d on the boundary (exact everywhere)."""

from __future__ import annotations

import torch

from dstein.estimators.base import Derivatives
from dstein.pdes.base import ExactPDE


class Poisson(ExactPDE):
    name = "poisson"
    needs = frozenset({"lap"})
    time_dependent = False
    conditions = ("boundary",)

    def residual(self, X: torch.Tensor, D: Derivatives) -> torch.Tensor:
        return D.require("lap") + torch.sin(X.sum(1))

    def sample_domain(self, n: int, gen: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.rand(n, self.dim, generator=gen, dtype=dtype)

    def sample_condition(
        self, kind: str, n: int, gen: torch.Generator, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        # A uniform point of the cube with one uniformly chosen coordinate pinned to 0 or 1.
        X = torch.rand(n, self.dim, generator=gen, dtype=dtype)
        face = torch.randint(self.dim, (n,), generator=gen)
        side = torch.randint(2, (n,), generator=gen).to(dtype)
        X[torch.arange(n), face] = side
        return X

    def condition_target(self, kind: str, X: torch.Tensor) -> torch.Tensor:
        return self.exact(X)

    def project(self, X: torch.Tensor) -> torch.Tensor:
        return X.clamp(0.0, 1.0)

    def project_condition(self, kind: str, X: torch.Tensor) -> torch.Tensor:
        # Stay on the boundary: the coordinate nearest a face is pinned back onto it.
        X = X.clamp(0.0, 1.0)
        dist = torch.minimum(X, 1.0 - X)
        face = dist.argmin(dim=1)
        rows = torch.arange(X.shape[0])
        X = X.clone()
        X[rows, face] = torch.round(X[rows, face])
        return X

    def slice(self, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        coord = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
        return coord.unsqueeze(1).repeat(1, self.dim), coord, "s, along the diagonal x = (s, ..., s)"

    def exact(self, X: torch.Tensor) -> torch.Tensor:
        return torch.sin(X.sum(1)) / self.dim

    def exact_grad(self, X: torch.Tensor) -> torch.Tensor:
        return (torch.cos(X.sum(1)) / self.dim).unsqueeze(1).expand(-1, self.dim).clone()
