"""HJB with an anisotropic terminal cost (``pde.name=hjb_aniso``): the same equation as hjb,
u_t + lap u - mu |grad u|^2 = 0, with

    g(x) = ln((1 + sum_i a_i x_i^2) / 2),   a_i ~ U[1 - anisotropy, 1 + anisotropy]

drawn once from ``a_seed``. Its solution depends on x through every a_i x_i^2, not |x| alone:
the radial family's |x|^2 does not reduce it to two variables, and the best function of
(|x|^2, t) keeps a gradient error of about std(a) / mean(a) (0.29 for anisotropy 0.5).

Ground truth by the Cole-Hopf transform, u = -(1/mu) ln E[exp(-mu g(x + s Z))], s^2 = 2 (T - t),
computed without sampling (docs/MATH.md section 17): with Y = sum_i a_i (x_i + s Z_i)^2,

    E[exp(-mu g)] = 2^mu E[(1 + Y)^-mu] = 2^mu / Gamma(mu) int_0^inf lam^(mu - 1) e^-lam E[e^(-lam Y)] dlam,
    E[e^(-lam Y)] = prod_i (1 + 2 lam a_i s^2)^(-1/2) exp(-lam a_i x_i^2 / (1 + 2 lam a_i s^2)),

one integral over lam = e^y whose integrand is analytic in a strip of half-width pi around the
real y axis and decays exponentially at both ends, so the trapezoid rule in y converges
geometrically: at the step used, 0.35, u and grad u agree with a step of 0.05 to 1e-13 (d = 1
to 3000, mu = 0.5 to 2; tests/test_pdes.py). About 130 nodes; O(d) per node and point, any d.
"""

from __future__ import annotations

import math

import torch

from dstein.estimators.constraint import OutputTransform
from dstein.pdes.base import TestSet
from dstein.pdes.hjb import HJB, log_transform

#: The trapezoid rule's step in y = ln(lam), and how far below the integrand's peak it starts
#: (in units of 1/mu: the integrand falls like e^(mu y) there; above the peak, past lam = 60 / m,
#: like e^(-lam m)).
STEP, BELOW = 0.35, 30.0


def cole_hopf_quadrature(
    x: torch.Tensor, t: torch.Tensor, a: torch.Tensor, mu: float, T: float, block_elements: int = 1 << 22
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Cole-Hopf value and spatial gradient of ``g = ln((1 + sum a_i x_i^2) / 2)`` at points
    (x (n, d), t (n,)) in float64, by the one-dimensional integral of the module docstring."""
    x, t, a = x.double(), t.double(), a.double().to(x.device)
    n, d = x.shape
    s2 = 2 * (T - t)  # (n,)
    m = 1 + (x * x) @ a + s2 * a.sum()  # E[1 + Y]: the integrand peaks near lam = mu / m
    top = math.log(60.0) + float(torch.log(m.detach()).max())  # e^-lam < 1e-26 past lam = 60, whatever d
    offsets = torch.arange(-BELOW / mu, top + STEP, STEP, dtype=torch.float64, device=x.device)  # y + ln m
    u, grad = torch.empty(n, dtype=torch.float64), torch.empty(n, d, dtype=torch.float64)
    block = max(1, block_elements // (len(offsets) * d))
    for lo in range(0, n, block):
        sl = slice(lo, lo + block)
        y = offsets.unsqueeze(0) - torch.log(m[sl]).unsqueeze(1)  # (b, K)
        lam = torch.exp(y).unsqueeze(2)
        q = (2 * s2[sl]).reshape(-1, 1, 1) * lam * a  # (b, K, d): 2 lam a_i s^2
        inv = torch.reciprocal(1 + q)
        log_mgf = -(0.5 * torch.log1p(q) + lam * inv * (a * x[sl] * x[sl]).unsqueeze(1)).sum(-1)
        log_f = mu * y - lam[..., 0] + log_mgf  # the integrand in y, logarithm
        log_total = torch.logsumexp(log_f, 1)
        u[sl] = -(mu * math.log(2) - math.lgamma(mu) + math.log(STEP) + log_total) / mu
        p = torch.exp(log_f - log_total.unsqueeze(1))  # (b, K): the nodes' weights in d/dx ln E
        grad[sl] = (2 / mu) * torch.einsum("bk,bkd->bd", p, lam * inv) * a * x[sl]
    return u, grad


class HJBAniso(HJB):
    """hjb with g(x) = ln((1 + sum a_i x_i^2) / 2) (module docstring); every other part as hjb
    (start state x0, the forward process, ``spread``, ``origin``, the closed-loop cost)."""

    name = "hjb_aniso"

    def __init__(
        self, dim: int, mu: float = 1.0, T: float = 1.0, spread: float = 0.0, origin: float = 0.0, x0: float = 0.0,
        anisotropy: float = 0.5, a_seed: int = 0,
    ):  # fmt: skip
        """``anisotropy``: the a_i are uniform in [1 - anisotropy, 1 + anisotropy] (0: hjb's g);
        ``a_seed``: the seed they are drawn from (the same a for every run of a config)."""
        super().__init__(dim, mu, T, spread, origin, x0)
        if not (math.isfinite(anisotropy) and 0 <= anisotropy < 1):
            raise ValueError(f"pde.params.anisotropy={anisotropy!r} must be >= 0 and < 1 (a_i > 0)")
        if not (isinstance(a_seed, int) and a_seed >= 0):
            raise ValueError(f"pde.params.a_seed={a_seed!r} must be an integer >= 0")
        self.anisotropy, self.a_seed = float(anisotropy), a_seed
        gen = torch.Generator().manual_seed(a_seed)
        self.a = 1 + self.anisotropy * (2 * torch.rand(dim, generator=gen, dtype=torch.float64) - 1)

    def describe(self) -> dict:
        return {**super().describe(), "anisotropy": self.anisotropy, "a_seed": self.a_seed}

    def _a(self, like: torch.Tensor) -> torch.Tensor:
        return self.a.to(dtype=like.dtype, device=like.device)

    def terminal(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log((1 + (x * x) @ self._a(x)) / 2)

    def terminal_grad(self, x: torch.Tensor) -> torch.Tensor:
        a = self._a(x)
        return 2 * a * x / (1 + (x * x) @ a).unsqueeze(-1)

    def output_transform(self, X: torch.Tensor) -> OutputTransform:
        """u = A + (T - t) f, A = g(x); with ``smoothing`` sigma, A = ln((1 + sum a_i x_i^2 +
        sigma^2 sum a_i) / 2), g at E[sum a_i (x_i + sigma eps_i)^2] (as hjb's)."""
        x, t = X[:, :-1], X[:, -1]
        a = self._a(x)
        s = 1 + (x * x) @ a + self.smoothing**2 * float(self.a.sum())
        ax = a * x
        return log_transform(s, ax, float(self.a.sum()), (ax * ax).sum(1), self.T - t)

    def solution(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u and grad u at points X (float64, by quadrature; differentiable in X)."""
        X = X.double().cpu()
        return cole_hopf_quadrature(X[:, :-1], X[:, -1], self.a, self.mu, self.T)

    def _start_reference(self, X: torch.Tensor) -> tuple[float, str]:
        """u(0, x0) by the quadrature (exact to float64's rounding)."""
        return float(self.solution(X)[0][0]), "Cole-Hopf, one-dimensional quadrature (docs/MATH.md section 17)"

    def truth(self, X: torch.Tensor, samples: int, seed: int) -> TestSet:
        """The quadrature's u and grad u (``samples`` and ``seed``, the Monte Carlo's, are unused:
        no standard error)."""
        u, grad = self.solution(X)
        return TestSet(X=X, u=u, grad=grad)
