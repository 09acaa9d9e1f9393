"""A user's own PDE, plugged in from config as ``pde.target: user_pde:Reaction``."""

from __future__ import annotations

import torch

from dstein.estimators import Derivatives
from dstein.estimators.constraint import OutputTransform
from dstein.pdes import ExactPDE


class Reaction(ExactPDE):
    """lap u = u on [0, 1]^d with u = exp(sum x / sqrt(d)) (exact)."""

    name = "reaction"
    needs = frozenset({"u", "lap"})
    time_dependent = False
    conditions = ("boundary",)

    def residual(self, X: torch.Tensor, D: Derivatives) -> torch.Tensor:
        return D.require("lap") - D.require("u")

    def sample_domain(self, n, gen, dtype=torch.float64):
        return torch.rand(n, self.dim, generator=gen, dtype=dtype)

    def sample_condition(self, kind, n, gen, dtype=torch.float64):
        X = torch.rand(n, self.dim, generator=gen, dtype=dtype)
        X[:, 0] = torch.randint(2, (n,), generator=gen).to(dtype)
        return X

    def condition_target(self, kind, X):
        return self.exact(X)

    def project(self, X):
        return X.clamp(0, 1)

    def exact(self, X):
        return torch.exp(X.sum(1) / self.dim**0.5)

    def exact_grad(self, X):
        return (self.exact(X) / self.dim**0.5).unsqueeze(1).expand(-1, self.dim).clone()


class NeedsHessian(Reaction):
    """Declares a derivative no estimator gives (for the bad-input tests)."""

    name = "needs-hessian"
    needs = frozenset({"u", "hess"})


class Advection(Reaction):
    """lap u + b . grad u = ... : a gradient along a fixed direction (the subspace estimator
    cannot give it a correct parameter gradient, so it is refused there)."""

    name = "advection"
    needs = frozenset({"u", "grad", "lap"})

    def residual(self, X: torch.Tensor, D: Derivatives) -> torch.Tensor:
        return D.require("lap") + D.require("grad").sum(1) / self.dim**0.5 - 2 * D.require("u")


class RaisingResidual(Reaction):
    """A residual with a bug (for the user-code tests)."""

    name = "raising"

    def residual(self, X: torch.Tensor, D: Derivatives) -> torch.Tensor:
        raise ZeroDivisionError("the user's bug")


class WrongShape(Reaction):
    """A residual of shape (B, 1): would broadcast in the loss and train silently."""

    name = "wrong-shape"

    def residual(self, X: torch.Tensor, D: Derivatives) -> torch.Tensor:
        return (D.require("lap") - D.require("u")).unsqueeze(1)


class NonRadialTransform(Reaction):
    """A hard constraint u = A + f whose grad A does not point along x (the radial family's
    subspace estimator refuses it)."""

    name = "non-radial-transform"

    def output_transform(self, X: torch.Tensor) -> OutputTransform:
        return OutputTransform(A=self.exact(X), B=torch.ones_like(X[:, 0]), A_grad=self.exact_grad(X),
                               A_lap=self.exact(X))  # fmt: skip


class RaisingInit(Reaction):
    """A constructor with a bug."""

    name = "raising-init"

    def __init__(self, dim: int, **params) -> None:
        super().__init__(dim, **params)
        raise KeyError("scale")


class Unconnected(Reaction):
    """A residual that does not use the derivatives it is given: its loss term trains nothing."""

    name = "unconnected"

    def residual(self, X: torch.Tensor, D: Derivatives) -> torch.Tensor:
        return torch.zeros(X.shape[0], dtype=X.dtype)


class IntegerResidual(Reaction):
    """A residual of integers (rounded): no gradient flows through it."""

    name = "integer"

    def residual(self, X: torch.Tensor, D: Derivatives) -> torch.Tensor:
        return (D.require("lap") - D.require("u")).round().to(torch.int32)


class RaisingTruth(Reaction):
    """A truth with a bug: found when the test set is made, before training."""

    name = "raising-truth"

    def truth(self, X: torch.Tensor, samples: int, seed: int):
        raise FloatingPointError("overflow in the user's closed form")


class RaisingTransform(Reaction):
    """An output transform with a bug."""

    name = "raising-transform"

    def output_transform(self, X: torch.Tensor) -> OutputTransform | None:
        raise IndexError("column 7")
