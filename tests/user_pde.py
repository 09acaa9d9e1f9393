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


class BasketGBM(ExactPDE):
    """A diffusion that depends on x, with a drift (the README's user-PDE example): the
    Black-Scholes equation of d assets under geometric Brownian motion,

        u_t + (sigma^2 / 2) sum_i x_i^2 d^2u/dx_i^2 + mu sum_i x_i du/dx_i - r u = 0,
        u(T, x) = |x|^2 / d,

    solved by u = exp(k (T - t)) |x|^2 / d, k = sigma^2 + 2 mu - r."""

    name = "basket-gbm"
    needs = frozenset({"u", "u_t", "trace", "along"})
    time_dependent = True
    conditions = ("terminal",)
    constrained = ("terminal",)

    def __init__(self, dim: int, sigma: float = 0.4, mu: float = 0.05, r: float = 0.03, T: float = 1.0):
        super().__init__(dim)
        self.sigma, self.mu, self.r, self.T = sigma, mu, r, T
        self.k = sigma**2 + 2 * mu - r

    def diffusion(self, X):
        return self.sigma * X[:, :-1]  # sigma_i(x) = sigma x_i

    def drift(self, X):
        return self.mu * X[:, :-1]  # b(x) = mu x

    def residual(self, X, D):
        return D.require("u_t") + self.generator(D) - self.r * D.require("u")

    def sample_domain(self, n, gen, dtype=torch.float64, spread=0.6):
        """Prices x_i = exp(spread Z_i), t ~ U(0, T): lognormal over the positive orthant, wider
        than the test points (``spread`` 0.25) so that training covers their domain of
        dependence (log x_i spreads by sigma sqrt(T - t)); a box without boundary conditions,
        or no wider than the test points, leaves the solution there undetermined."""
        X = torch.empty(n, self.dim + 1, dtype=dtype)
        X[:, :-1] = torch.exp(spread * torch.randn(n, self.dim, generator=gen, dtype=dtype))
        X[:, -1] = self.T * torch.rand(n, generator=gen, dtype=dtype)
        return X

    def sample_test(self, n, gen):
        return self.sample_domain(n, gen, spread=0.25)

    def sample_condition(self, kind, n, gen, dtype=torch.float64):
        X = self.sample_domain(n, gen, dtype)
        X[:, -1] = self.T
        return X

    def condition_target(self, kind, X):
        return (X[:, :-1] ** 2).sum(1) / self.dim

    def project(self, X):
        return torch.cat([X[:, :-1].clamp_min(1e-3), X[:, -1:].clamp(0, self.T)], 1)

    def output_transform(self, X):
        x, t = X[:, :-1], X[:, -1]
        return OutputTransform(
            A=(x * x).sum(1) / self.dim, B=self.T - t, A_grad=2 * x / self.dim, A_lap=torch.full_like(t, 2.0),
            A_hess_diag=torch.full_like(x, 2.0 / self.dim), B_t=torch.full_like(t, -1.0),
        )  # fmt: skip

    def exact(self, X):
        return torch.exp(self.k * (self.T - X[:, -1])) * (X[:, :-1] ** 2).sum(1) / self.dim

    def exact_grad(self, X):
        return torch.exp(self.k * (self.T - X[:, -1])).unsqueeze(1) * 2 * X[:, :-1] / self.dim


class NoHessianDiagonal(BasketGBM):
    """A hard constraint that gives A's Laplacian but not its Hessian's diagonal, which a
    diffusion's weighted trace needs (refused with a message)."""

    name = "no-hessian-diagonal"

    def output_transform(self, X):
        T = super().output_transform(X)
        T.A_hess_diag = None
        return T


class BadDiffusion(BasketGBM):
    """sigma_i(x) of the wrong shape (refused at build time)."""

    name = "bad-diffusion"

    def diffusion(self, X):
        return self.sigma * X
