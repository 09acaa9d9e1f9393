"""Deep BSDE's semilinear benchmarks (Han, Jentzen, E, PNAS 2018; E, Han, Jentzen, Comm. Math.
Stat. 2017): terminal-value problems

    u_t + L u + f(t, x, u, grad u) = 0 on [0, T) x R^d,   u(T, x) = g(x),
    L u = (1/2) sum_i sigma_i(x)^2 d^2u/dx_i^2 + b(x) . grad u,

whose published values are u(0, x0) at one start state; no solution is known anywhere else
(``truth_known`` is False: a run reports u(0, x0) against the reference at every evaluation
and draws no test set). Each declares its forward process dX = b(X) dt + sigma(X) dW from x0
(``sample_process``), along which Deep BSDE trains and along which dstein's training points
are drawn, widened by ``spread``: the noise of a point at time t is scaled by
sqrt(1 + spread v), v ~ U(0, 1), so that training also covers paths a little beyond the
process's own spread (the PDE is posed on all of R^d; points only where the process goes
would leave u undetermined at its edges).

- ``bsde_allen_cahn``: u_t + lap u + u - u^3 = 0 (sigma = sqrt 2, no drift), T = 0.3,
  g(x) = 1 / (2 + 0.4 |x|^2), x0 = 0; u(0, 0) = 0.052802 at d = 100.
- ``bsde_default_risk``: geometric Brownian motion (sigma_i = sigma x_i, b = mu_bar x),
  f = -(1 - delta) Q(u) u - R u, Q piecewise linear between (v_h, gamma_h) and (v_l, gamma_l),
  g(x) = min_i x_i, T = 1, x0 = 100; u(0, x0) = 57.300 at d = 100.
- ``bsde_diff_rate``: geometric Brownian motion, f = -R_l u - (mu_bar - R_l) s + (R_b - R_l)
  max(0, s - u), s = x . grad u; g(x) = max(max_i x_i - 120, 0) - 2 max(max_i x_i - 150, 0),
  T = 0.5, x0 = 100; u(0, x0) = 21.299 at d = 100.

docs/MATH.md section 15 (the operators), docs/benchmarks.md (the table beside Deep BSDE's).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

import torch

from dstein.estimators.base import Derivatives
from dstein.estimators.constraint import OutputTransform
from dstein.noise import Streams, counter_seed
from dstein.pdes.base import PDE, TestSet, process_times

#: Monte Carlo draws of X_T for the start state's baselines (``start_baselines``), in blocks.
BASELINE_SAMPLES, BASELINE_BLOCK = 1 << 18, 1 << 14
#: Deep BSDE's sources, for summary.json.
PNAS = "Han, Jentzen, E, PNAS 2018 (Deep BSDE), its d = 100 benchmark"
CMS = "E, Han, Jentzen, Comm. Math. Stat. 2017 (Deep BSDE), its d = 100 benchmark"


class DeepBSDEProblem(PDE):
    """The shared part: terminal condition, start state, forward process, training points."""

    time_dependent = True
    conditions = ("terminal",)
    process_kinds = ("domain", "terminal")
    truth_known = False
    #: (dim, T, x0) -> (u(0, x0), its source, Deep BSDE's relative error there or None)
    published: ClassVar[Mapping[tuple[int, float, float], tuple[float, str, float | None]]] = MappingProxyType({})

    def __init__(self, dim: int, T: float, x0: float, spread: float = 0.0):
        super().__init__(dim)
        for name, value in (("T", T), ("x0", x0), ("spread", spread)):
            if not math.isfinite(value):
                raise ValueError(f"pde.params.{name}={value!r} must be a finite number")
        if T <= 0:
            raise ValueError(f"pde.params.T={T!r} must be > 0")
        if spread < 0:
            raise ValueError(f"pde.params.spread={spread!r} must be >= 0")
        self.T, self.x0, self.spread = float(T), float(x0), float(spread)

    @property
    def origin(self) -> float:
        """Every coordinate of the start state in the PDE's own coordinates (x0 itself, or 0
        for prices in log coordinates)."""
        return self.x0

    def prices(self, x: torch.Tensor) -> torch.Tensor:
        """The states in the problem's own terms from the PDE's coordinates (the same here)."""
        return x

    def describe(self) -> dict:
        return {**super().describe(), "T": self.T, "x0": self.x0, "spread": self.spread}

    # -- the forward process ----------------------------------------------------------------
    def _states(self, t: torch.Tensor, z: torch.Tensor, drift: float | None = None) -> torch.Tensor:
        """X_t of the forward process from x0 for standard normal z (B, d), times t (B, 1)
        (``drift``: a geometric Brownian motion's, in place of mu_bar)."""
        raise NotImplementedError

    def sample_process(
        self, kind: str, n: int, gen: torch.Generator, dtype: torch.dtype = torch.float64, power: float = 1.0
    ) -> torch.Tensor:
        """X_t from x0: t = T v^power (``domain``; power 1: t ~ U(0, T)) or t = T (``terminal``),
        drawn exactly."""
        return self._points(kind, n, gen, dtype, widen=False, power=power)

    def _points(
        self, kind: str, n: int, gen: torch.Generator, dtype: torch.dtype, widen: bool, power: float = 1.0
    ) -> torch.Tensor:
        X = torch.empty(n, self.in_dim, dtype=dtype)
        X[:, -1] = process_times(kind, n, self.T, gen, dtype, power)
        z = torch.randn(n, self.dim, generator=gen, dtype=dtype)
        if widen and self.spread:
            z = z * torch.sqrt(1 + self.spread * torch.rand(n, 1, generator=gen, dtype=dtype))
        X[:, :-1] = self._states(X[:, -1:], z)
        return X

    def sample_domain(self, n: int, gen: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The forward process's law at t ~ U(0, T), its noise widened by ``spread``."""
        return self._points("domain", n, gen, dtype, widen=True)

    def sample_condition(
        self, kind: str, n: int, gen: torch.Generator, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        return self._points(kind, n, gen, dtype, widen=True)

    def sample_test(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return self.sample_process("domain", n, gen)

    # -- conditions, references -------------------------------------------------------------
    def terminal(self, x: torch.Tensor) -> torch.Tensor:
        """g(x), (B,)."""
        raise NotImplementedError

    def condition_target(self, kind: str, X: torch.Tensor) -> torch.Tensor:
        return self.terminal(self.prices(X[:, :-1]))

    def start(self) -> tuple[str, torch.Tensor, float | None, str]:
        X = torch.zeros(1, self.in_dim, dtype=torch.float64)
        X[:, :-1] = self.origin
        name = f"u(0,x0={self.x0:g})"
        known = self.published.get((self.dim, self.T, self.x0))
        if known is None:
            return name, X, None, "no published value for these parameters"
        value, source, theirs = known
        return name, X, value, source if theirs is None else f"{source}; Deep BSDE's own relative error {theirs:.2%}"

    def reference_values(self) -> dict[str, tuple[torch.Tensor, float, str]]:
        name, X, value, source = self.start()
        return {} if value is None else {name: (X, value, source)}

    def terminal_mean(self, drift: float | None = None, *others: float | None) -> tuple[float, float]:
        """E[g(X_T)] from x0 and its standard error: BASELINE_SAMPLES exact draws of X_T (for a
        geometric Brownian motion, with ``drift`` in place of mu_bar if given), in blocks keyed
        by their index; computed once per drift. ``others``: drifts computed in the same pass,
        from the same draws (each block's normals drawn once for all of them), kept for later
        calls."""
        cache = self.__dict__.setdefault("_terminal_means", {})
        todo = [d for d in dict.fromkeys((drift, *others)) if d not in cache]
        if todo:
            sums = {d: [0.0, 0.0] for d in todo}
            t = torch.full((BASELINE_BLOCK, 1), self.T, dtype=torch.float64)
            for k in range(BASELINE_SAMPLES // BASELINE_BLOCK):
                gen = torch.Generator().manual_seed(counter_seed(0, k, Streams.START_BASELINES))
                z = torch.randn(BASELINE_BLOCK, self.dim, generator=gen, dtype=torch.float64)
                for d in todo:
                    g = self.terminal(self.prices(self._states(t, z, d)))
                    sums[d][0] += float(g.sum())
                    sums[d][1] += float((g * g).sum())
            for d, (total, square) in sums.items():
                mean = total / BASELINE_SAMPLES
                cache[d] = (mean, math.sqrt(max(square / BASELINE_SAMPLES - mean * mean, 0.0) / BASELINE_SAMPLES))
        return cache[drift]

    def project(self, X: torch.Tensor) -> torch.Tensor:
        return torch.cat([X[:, :-1], X[:, -1:].clamp(0.0, self.T)], 1)

    def project_condition(self, kind: str, X: torch.Tensor) -> torch.Tensor:
        return torch.cat([X[:, :-1], torch.full_like(X[:, -1:], self.T)], 1)

    def slice(self, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        """x_1 through the start state at t = 0 (other coordinates x0), over x0 +- 3 standard
        deviations of X_T's first coordinate."""
        X_T = self.sample_process("terminal", 256, torch.Generator().manual_seed(0))
        half = 3 * float(X_T[:, 0].std())
        coord = torch.linspace(self.origin - half, self.origin + half, n, dtype=torch.float64)
        X = torch.zeros(n, self.in_dim, dtype=torch.float64)
        X[:, :-1] = self.origin
        X[:, 0] = coord
        return X, coord, f"x_1 (other x_i = {self.origin:g}, t = 0)"

    def truth(self, X: torch.Tensor, samples: int, seed: int) -> TestSet:
        raise NotImplementedError(
            f"pde {self.name}: no solution is known away from u(0, x0) (truth_known is False); data.test_file "
            "cannot be checked against one either"
        )


class BSDEAllenCahn(DeepBSDEProblem):
    """u_t + lap u + u - u^3 = 0, u(T, x) = 1 / (2 + 0.4 |x|^2) (PNAS 2018's Allen-Cahn)."""

    name = "bsde_allen_cahn"
    needs = frozenset({"u", "u_t", "lap"})
    constrained = ("terminal",)
    published = MappingProxyType({(100, 0.3, 0.0): (0.052802, PNAS, 0.0030)})

    def __init__(self, dim: int, T: float = 0.3, x0: float = 0.0, spread: float = 0.0):
        super().__init__(dim, T, x0, spread)

    def _states(self, t: torch.Tensor, z: torch.Tensor, drift: float | None = None) -> torch.Tensor:
        return self.x0 + torch.sqrt(2 * t) * z  # dX = sqrt(2) dW: the generator is the Laplacian

    def start_baselines(self) -> dict[str, tuple[float, float, str]]:
        """Without u^3 the equation is linear: u(0, x0) = e^T E[g(X_T)] (Feynman-Kac); without
        the reaction at all, E[g(X_T)]. u is about 0.05 along the process, so u^3 moves u(0, x0)
        by about T u^3 / u: the linear value is the one to beat."""
        mean, se = self.terminal_mean()
        grow = math.exp(self.T)
        return {"linear": (grow * mean, grow * se, "e^T E[g(X_T)]: the equation without -u^3 (Monte Carlo)"),
                "heat": (mean, se, "E[g(X_T)]: the equation without u - u^3 (Monte Carlo)")}  # fmt: skip

    def residual(self, X: torch.Tensor, D: Derivatives) -> torch.Tensor:
        u = D.require("u")
        return D.require("u_t") + D.require("lap") + u - u**3

    def terminal(self, x: torch.Tensor) -> torch.Tensor:
        return 1 / (2 + 0.4 * (x * x).sum(-1))

    def output_transform(self, X: torch.Tensor) -> OutputTransform:
        """u = g(x) + (T - t) f: the terminal condition exact. With s = 2 + 0.4 |x|^2, grad g =
        -0.8 x / s^2 and lap g = -0.8 d / s^2 + 1.28 |x|^2 / s^3."""
        x, t = X[:, :-1], X[:, -1]
        r2 = (x * x).sum(1)
        s = 2 + 0.4 * r2
        return OutputTransform(
            A=1 / s, B=self.T - t, A_grad=-0.8 * x / (s * s).unsqueeze(1),
            A_lap=-0.8 * self.dim / (s * s) + 1.28 * r2 / s**3, B_t=torch.full_like(t, -1.0),
        )  # fmt: skip


#: The coordinates a GBM problem is posed in (``pde.params.coordinates``).
COORDINATES = ("price", "log")


class GBMProblem(DeepBSDEProblem):
    """Geometric Brownian motion: dX_i = mu_bar X_i dt + sigma X_i dW_i, X_0 = x0 in every
    coordinate; L u = (sigma^2 / 2) sum_i x_i^2 d^2u/dx_i^2 + mu_bar x . grad u.

    ``coordinates``: ``price`` poses the PDE in x itself, the diffusion sigma x_i and drift
    mu_bar x of x (the estimators' weighted trace, whose Stein weight on the deviations of
    sigma^2 x_i^2 from their mean has a variance of order d times their spread); ``log`` in
    y_i = log(x_i / x0), where the same operator is (sigma^2 / 2) lap_y u + (mu_bar - sigma^2 / 2)
    sum_i du/dy_i: one diffusion sigma for every coordinate (the Laplacian's low-variance second
    differences), a constant drift, and Y_t = (mu_bar - sigma^2 / 2) t + sigma W_t Gaussian; the
    start state is y = 0 and x . grad_x u = sum_i du/dy_i. The solution is the same function."""

    needs = frozenset({"u", "u_t", "trace", "along"})

    def __init__(
        self, dim: int, T: float, x0: float, sigma: float, mu_bar: float, spread: float = 0.0,
        coordinates: str = "price",
    ):  # fmt: skip
        super().__init__(dim, T, x0, spread)
        if coordinates not in COORDINATES:
            raise ValueError(f"pde.params.coordinates={coordinates!r} must be one of {COORDINATES}")
        self.log = coordinates == "log"
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"pde.params.sigma={sigma!r} must be > 0")
        if not math.isfinite(mu_bar):
            raise ValueError(f"pde.params.mu_bar={mu_bar!r} must be a finite number")
        if x0 <= 0:
            raise ValueError(f"pde.params.x0={x0!r} must be > 0 (prices)")
        self.sigma, self.mu_bar = float(sigma), float(mu_bar)

    def describe(self) -> dict:
        log = {"coordinates": "log"} if self.log else {}
        return {**super().describe(), "sigma": self.sigma, "mu_bar": self.mu_bar, **log}

    @property
    def origin(self) -> float:
        return 0.0 if self.log else self.x0

    def prices(self, x: torch.Tensor) -> torch.Tensor:
        return self.x0 * torch.exp(x) if self.log else x

    def _states(self, t: torch.Tensor, z: torch.Tensor, drift: float | None = None) -> torch.Tensor:
        mu = self.mu_bar if drift is None else drift
        y = (mu - self.sigma**2 / 2) * t + self.sigma * torch.sqrt(t) * z
        return y if self.log else self.x0 * torch.exp(y)

    def diffusion(self, X: torch.Tensor) -> torch.Tensor:
        return X.new_full((X.shape[0], 1), self.sigma) if self.log else self.sigma * X[:, :-1]

    def drift(self, X: torch.Tensor) -> torch.Tensor:
        if self.log:
            return X.new_full((X.shape[0], self.dim), self.mu_bar - self.sigma**2 / 2)
        return self.mu_bar * X[:, :-1]

    def spot_gradient(self, X: torch.Tensor) -> torch.Tensor:
        """The direction w with w . grad u = x . grad_x u (B, 1, d): x, or ones in log coordinates."""
        return (torch.ones_like(X[:, :-1]) if self.log else X[:, :-1]).unsqueeze(1)

    def project(self, X: torch.Tensor) -> torch.Tensor:
        x = X[:, :-1] if self.log else X[:, :-1].clamp_min(1e-6 * self.x0)
        return torch.cat([x, X[:, -1:].clamp(0.0, self.T)], 1)

    def project_condition(self, kind: str, X: torch.Tensor) -> torch.Tensor:
        x = X[:, :-1] if self.log else X[:, :-1].clamp_min(1e-6 * self.x0)
        return torch.cat([x, torch.full_like(X[:, -1:], self.T)], 1)


class BSDEDefaultRisk(GBMProblem):
    """Black-Scholes with default risk (PNAS 2018): f = -(1 - delta) Q(u) u - R u, Q(y) = gamma_h
    for y < v_h, gamma_l for y > v_l, linear in between; g(x) = min_i x_i."""

    name = "bsde_default_risk"
    published = MappingProxyType({(100, 1.0, 100.0): (57.300, PNAS, 0.0046)})

    def __init__(
        self, dim: int, T: float = 1.0, x0: float = 100.0, sigma: float = 0.2, mu_bar: float = 0.02,
        delta: float = 2.0 / 3.0, R: float = 0.02, gamma_h: float = 0.2, gamma_l: float = 0.02, v_h: float = 50.0,
        v_l: float = 70.0, spread: float = 0.0, coordinates: str = "price",
    ):  # fmt: skip
        super().__init__(dim, T, x0, sigma, mu_bar, spread, coordinates)
        if not v_h < v_l:
            raise ValueError(f"pde.params.v_h={v_h!r} must be below pde.params.v_l={v_l!r}")
        self.delta, self.R = float(delta), float(R)
        self.gamma_h, self.gamma_l, self.v_h, self.v_l = float(gamma_h), float(gamma_l), float(v_h), float(v_l)

    def describe(self) -> dict:
        own = {"delta": self.delta, "R": self.R, "gamma_h": self.gamma_h, "gamma_l": self.gamma_l, "v_h": self.v_h,
               "v_l": self.v_l}  # fmt: skip
        return {**super().describe(), **own}

    def Q(self, u: torch.Tensor) -> torch.Tensor:
        slope = (self.gamma_h - self.gamma_l) / (self.v_h - self.v_l)
        return (self.gamma_h + slope * (u - self.v_h)).clamp(min(self.gamma_h, self.gamma_l),
                                                             max(self.gamma_h, self.gamma_l))  # fmt: skip

    def residual(self, X: torch.Tensor, D: Derivatives) -> torch.Tensor:
        u = D.require("u")
        return D.require("u_t") + self.generator(D) - (1 - self.delta) * self.Q(u) * u - self.R * u

    def start_baselines(self) -> dict[str, tuple[float, float, str]]:
        """With a constant default intensity Q the equation is linear: u(0, x0) =
        exp(-(R + (1 - delta) Q) T) E[g(X_T)]; Q = gamma_h and gamma_l bound the true value."""
        mean, se = self.terminal_mean()
        out = {}
        for name, q in (("gamma_h", self.gamma_h), ("gamma_l", self.gamma_l)):
            discount = math.exp(-(self.R + (1 - self.delta) * q) * self.T)
            out[f"constant_{name}"] = (discount * mean, discount * se,
                                       f"Q = {name} = {q:g} everywhere: a linear equation (Monte Carlo)")  # fmt: skip
        return out

    def terminal(self, x: torch.Tensor) -> torch.Tensor:
        return x.min(-1).values


class BSDEDiffRate(GBMProblem):
    """Different interest rates for borrowing and lending (CMS 2017): f = -R_l u - (mu_bar - R_l) s
    + (R_b - R_l) max(0, s - u), s = x . grad u; g(x) = max(max_i x_i - 120, 0) - 2 max(max_i x_i - 150, 0)."""

    name = "bsde_diff_rate"
    published = MappingProxyType({(100, 0.5, 100.0): (21.299, CMS, None)})

    def __init__(
        self, dim: int, T: float = 0.5, x0: float = 100.0, sigma: float = 0.2, mu_bar: float = 0.06,
        R_l: float = 0.04, R_b: float = 0.06, spread: float = 0.0, coordinates: str = "price",
    ):  # fmt: skip
        super().__init__(dim, T, x0, sigma, mu_bar, spread, coordinates)
        self.R_l, self.R_b = float(R_l), float(R_b)

    def describe(self) -> dict:
        return {**super().describe(), "R_l": self.R_l, "R_b": self.R_b}

    def extra_directions(self, X: torch.Tensor) -> torch.Tensor:
        return self.spot_gradient(X)  # s = x . grad_x u: D.along[:, 1]

    def residual(self, X: torch.Tensor, D: Derivatives) -> torch.Tensor:
        u, s = D.require("u"), D.require("along")[:, 1]
        f = -self.R_l * u - (self.mu_bar - self.R_l) * s + (self.R_b - self.R_l) * torch.relu(s - u)
        return D.require("u_t") + self.generator(D) + f

    def terminal(self, x: torch.Tensor) -> torch.Tensor:
        top = x.max(-1).values
        return torch.relu(top - 120) - 2 * torch.relu(top - 150)

    def start_baselines(self) -> dict[str, tuple[float, float, str]]:
        """With one rate r (R_b = R_l = r) the equation is Black-Scholes': u(0, x0) = e^{-r T}
        E[g(X_T)] with X's drift r in place of mu_bar. The two rates give a lending and a
        borrowing price."""
        out = {}
        self.terminal_mean(self.R_l, self.R_b)  # both rates from the same draws, in one pass
        for name, r in (("R_l", self.R_l), ("R_b", self.R_b)):
            mean, se = self.terminal_mean(drift=r)
            discount = math.exp(-r * self.T)
            out[f"one_rate_{name}"] = (discount * mean, discount * se,
                                       f"one rate {name} = {r:g} (Black-Scholes, Monte Carlo)")  # fmt: skip
        return out
