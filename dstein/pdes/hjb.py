"""HJB of linear-quadratic-Gaussian control: u_t + lap u - mu |grad u|^2 = 0, t in [0, T],
terminal u(x, T) = ln((1 + |x|^2) / 2).

Ground truth by the Cole-Hopf transform (MATH.md section 5):

    u(x, t) = -(1/mu) ln E[exp(-mu h(x + sqrt(2 (T - t)) Z))],   Z ~ N(0, I_d),
    grad u  = E[exp(-mu h(Y)) grad h(Y)] / E[exp(-mu h(Y))],

with h the terminal function. Because h depends on |y| only, |x + s Z|^2 has the law of
(|x| + s Z1)^2 + s^2 C with Z1 ~ N(0, 1) and C ~ chi^2(d - 1) independent, and the part of
grad h orthogonal to x averages to zero. The Monte Carlo therefore draws two numbers per
sample whatever d is; ``cole_hopf`` is the plain d-dimensional formula (any nodes and
weights: random samples or a quadrature rule), differentiable, used to cross-check it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dstein.estimators.base import Derivatives
from dstein.estimators.constraint import OutputTransform
from dstein.noise import Streams
from dstein.pdes.base import PDE, ControlProblem, TestSet, process_times


def terminal(x: torch.Tensor) -> torch.Tensor:
    return torch.log((1 + (x * x).sum(-1)) / 2)


def terminal_grad(x: torch.Tensor) -> torch.Tensor:
    return 2 * x / (1 + (x * x).sum(-1, keepdim=True))


def cole_hopf(X: torch.Tensor, nodes: torch.Tensor, weights: torch.Tensor, mu: float, T: float) -> torch.Tensor:
    """-(1/mu) ln sum_k w_k exp(-mu h(x + sqrt(2(T-t)) z_k)) at X = (x, t); differentiable.

    With Gauss-Hermite nodes this is the exact solution up to quadrature error; with
    standard normal samples and equal weights it is the plain Monte Carlo estimate.
    """
    x, t = X[:, :-1], X[:, -1:]
    s = torch.sqrt(2 * (T - t)).unsqueeze(1)  # (B, 1, 1)
    Y = x.unsqueeze(1) + s * nodes.unsqueeze(0)  # (B, K, d)
    logw = torch.log(weights).unsqueeze(0) - mu * terminal(Y)
    return -torch.logsumexp(logw, dim=1) / mu


def cole_hopf_radial(
    x: np.ndarray, t: np.ndarray, mu: float, T: float, samples: int, seed: int, block: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Monte Carlo Cole-Hopf value, spatial gradient and the value's standard error (float64).

    All points share the same random numbers (common random numbers: the gradient is then
    exactly the derivative of the estimated value, and differences between nearby points
    are estimated far better than each value).
    """
    n, d = x.shape
    rng = np.random.default_rng([seed, Streams.COLE_HOPF])
    z1 = rng.standard_normal(samples)
    chi = rng.chisquare(d - 1, samples) if d > 1 else np.zeros(samples)
    u = np.empty(n)
    dudr = np.empty(n)
    se = np.empty(n)
    r_all = np.linalg.norm(x, axis=1)
    for lo in range(0, n, block):
        r = r_all[lo : lo + block, None]
        s = np.sqrt(2 * (T - t[lo : lo + block, None]))
        radial = r + s * z1[None, :]
        y2 = radial**2 + s**2 * chi[None, :]
        logw = -mu * np.log((1 + y2) / 2)
        top = logw.max(axis=1, keepdims=True)
        w = np.exp(logw - top)  # in (0, 1]: scaled weights
        mean_w = w.mean(axis=1)
        u[lo : lo + block] = -(np.log(mean_w) + top[:, 0]) / mu
        dudr[lo : lo + block] = (w * 2 * radial / (1 + y2)).mean(axis=1) / mean_w
        se[lo : lo + block] = w.std(axis=1, ddof=1) / (math.sqrt(samples) * mean_w * mu)
    direction = np.divide(x, r_all[:, None], out=np.zeros_like(x), where=r_all[:, None] > 0)
    return u, dudr[:, None] * direction, se


def log_transform(
    s: torch.Tensor, ax: torch.Tensor, trace: float, ax_sq: torch.Tensor, B: torch.Tensor
) -> OutputTransform:
    """u = A + B f with A = ln(s / 2), s = 1 + x' diag(a) x (+ a smoothing shift), B = T - t:
    ``ax`` = diag(a) x (B, d), ``trace`` = sum a_i, ``ax_sq`` = |diag(a) x|^2. Then grad A =
    2 ax / s and lap A = 2 trace / s - 4 ax_sq / s^2 (hjb: a = 1; hjb_aniso)."""
    lap = 2 * trace / s - 4 * ax_sq / (s * s)
    return OutputTransform(
        A=torch.log(s / 2), B=B, A_grad=2 * ax / s.unsqueeze(1), A_lap=lap, B_t=torch.full_like(B, -1.0)
    )


class HJB(PDE):
    name = "hjb"
    needs = frozenset({"u_t", "lap", "grad_sq"})
    time_dependent = True
    conditions = ("terminal",)
    constrained = ("terminal",)
    process_kinds = ("domain", "terminal")
    smooths_constraint = True

    def __init__(
        self, dim: int, mu: float = 1.0, T: float = 1.0, spread: float = 0.0, origin: float = 0.0, x0: float = 0.0
    ):
        """``spread``: how much of the test points' domain of dependence the training points
        cover. The test points are x ~ N(0, I), t ~ U(0, T); the solution there is set by the
        PDE along x + sqrt(2 (s - t)) Z up to s = T, where |x|^2 grows to d (1 + 2 (T - t)).
        Training points at time s are drawn from N(0, (1 + 2 spread v s) I), v ~ U(0, 1) (the
        terminal points at s = T): 0 draws them like the test points, 1 covers the whole
        domain of dependence, which at d = 100 the test distribution alone misses
        (docs/benchmarks.md). ``origin``: the share of training points drawn instead along the
        diffusion from x = 0 (the domain of dependence of the published reference u(0, 0)),
        x ~ N(0, 2 s I): at high d, x ~ N(0, I) never comes near the origin (``pde.process_share``,
        which every PDE with a process has, draws the same law for a fixed share of the rows
        instead of a random one). ``x0``: the start state (every coordinate x0, t = 0) whose
        value u(0, x0) every evaluation reports beside its reference; ``origin`` and the
        process (``sample_process``) start there."""
        super().__init__(dim)
        if not (math.isfinite(mu) and mu > 0):
            raise ValueError(f"pde.params.mu={mu!r} must be > 0")
        if not (math.isfinite(T) and T > 0):
            raise ValueError(f"pde.params.T={T!r} must be > 0")
        for name, value in (("spread", spread), ("origin", origin)):
            if not (math.isfinite(value) and 0 <= value <= 1):
                raise ValueError(f"pde.params.{name}={value!r} must be in [0, 1]")
        if not math.isfinite(x0):
            raise ValueError(f"pde.params.x0={x0!r} must be a finite number (every coordinate of the start state)")
        self.mu, self.T, self.spread, self.origin = float(mu), float(T), float(spread), float(origin)
        self.x0 = float(x0)
        self._start: tuple[str, torch.Tensor, float, str] | None = None

    def describe(self) -> dict:
        # files written before these existed stay valid
        extra = {name: v for name, v in (("spread", self.spread), ("origin", self.origin), ("x0", self.x0)) if v}
        return {**super().describe(), "mu": self.mu, "T": self.T, **extra}

    def _spread(self, X: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Widen the spatial part of points X (time last) over the domain of dependence."""
        if self.spread or self.origin:
            v = torch.rand(X.shape[0], generator=gen, dtype=X.dtype)
            variance = 1 + 2 * self.spread * v * X[:, -1]
            near = None
            if self.origin:
                near = torch.rand(X.shape[0], generator=gen, dtype=X.dtype) < self.origin
                variance = torch.where(near, 2 * X[:, -1], variance)
            X[:, :-1] *= torch.sqrt(variance).unsqueeze(1)
            if near is not None and self.x0:  # the diffusion from the start state x0
                X[:, :-1] += self.x0 * near.to(X.dtype).unsqueeze(1)
        return X

    def sample_process(
        self, kind: str, n: int, gen: torch.Generator, dtype: torch.dtype = torch.float64, power: float = 1.0
    ) -> torch.Tensor:
        """Points along the uncontrolled diffusion from the start state, X_t = x0 + sqrt(2 t) Z:
        t = T v^power (``domain``; power 1: t ~ U(0, T)) or t = T (``terminal``). The controlled
        process of the optimal control (dX = -2 mu grad u dt + sqrt(2) dW) stays closer to x0;
        this one covers it."""
        X = torch.empty(n, self.in_dim, dtype=dtype)
        X[:, -1] = process_times(kind, n, self.T, gen, dtype, power)
        z = torch.randn(n, self.dim, generator=gen, dtype=dtype)
        X[:, :-1] = self.x0 + torch.sqrt(2 * X[:, -1:]) * z
        return X

    def residual(self, X: torch.Tensor, D: Derivatives) -> torch.Tensor:
        return D.require("u_t") + D.require("lap") - self.mu * D.require("grad_sq")

    def sample_test(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """x ~ N(0, I), t ~ U(0, T) (whatever the training points' spread)."""
        X = torch.empty(n, self.in_dim, dtype=torch.float64)
        X[:, :-1] = torch.randn(n, self.dim, generator=gen, dtype=torch.float64)
        X[:, -1] = self.T * torch.rand(n, generator=gen, dtype=torch.float64)
        return X

    def sample_domain(self, n: int, gen: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        X = torch.empty(n, self.in_dim, dtype=dtype)
        X[:, :-1] = torch.randn(n, self.dim, generator=gen, dtype=dtype)
        X[:, -1] = self.T * torch.rand(n, generator=gen, dtype=dtype)
        return self._spread(X, gen)

    def sample_condition(
        self, kind: str, n: int, gen: torch.Generator, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        X = torch.empty(n, self.in_dim, dtype=dtype)
        X[:, :-1] = torch.randn(n, self.dim, generator=gen, dtype=dtype)
        X[:, -1] = self.T
        return self._spread(X, gen)

    def terminal(self, x: torch.Tensor) -> torch.Tensor:
        """The terminal cost g(x) = ln((1 + |x|^2) / 2)."""
        return terminal(x)

    def terminal_grad(self, x: torch.Tensor) -> torch.Tensor:
        return terminal_grad(x)

    def condition_target(self, kind: str, X: torch.Tensor) -> torch.Tensor:
        return self.terminal(X[:, :-1])

    def output_transform(self, X: torch.Tensor) -> OutputTransform:
        """u = A + (T - t) f with A = g(x): the terminal condition holds exactly. With
        ``smoothing`` sigma (model.smooth_constraint), A = ln((1 + |x|^2 + sigma^2 d) / 2), g at
        E|x + sigma eps|^2: the smoothed g up to the curvature of the logarithm, a term below
        (4 sigma^2 |x|^2 + 2 sigma^4 d) / (2 (1 + |x|^2)^2) (docs/MATH.md section 6)."""
        x, t = X[:, :-1], X[:, -1]
        shift = self.smoothing**2 * self.dim  # E|sigma eps|^2
        s = 1 + (x * x).sum(1) + shift
        return log_transform(s, x, self.dim, s - 1 - shift, self.T - t)

    def start(self) -> tuple[str, torch.Tensor, float, str]:
        """u(0, x0) and its reference (``_start_reference``, computed once)."""
        if self._start is None:
            X = torch.zeros(1, self.in_dim, dtype=torch.float64)
            X[:, :-1] = self.x0
            name = "u(0,0)" if not self.x0 else f"u(0,x0={self.x0:g})"
            self._start = (name, X, *self._start_reference(X))
        return self._start

    def _start_reference(self, X: torch.Tensor) -> tuple[float, str]:
        """The reference value at the start state X and its source: Deep BSDE's quadrature value
        at x0 = 0, d = 100, mu = T = 1 (Han, Jentzen, E 2018); otherwise the Cole-Hopf Monte Carlo
        with 10^6 samples and its standard error."""
        if (self.dim, self.mu, self.T, self.x0) == (100, 1.0, 1.0, 0.0):
            return 4.5901617, "Deep BSDE (Han, Jentzen, E 2018), quadrature"
        u, _, se = cole_hopf_radial(X[:, :-1].numpy(), np.zeros(1), self.mu, self.T, 10**6, 0)
        return float(u[0]), f"Cole-Hopf Monte Carlo, 10^6 samples (standard error {se[0]:.1e})"

    def reference_values(self) -> dict[str, tuple[torch.Tensor, float, str]]:
        name, X, value, source = self.start()
        return {name: (X, value, source)}

    def control(self, X: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """m = -mu grad u: the minimiser of E[int |m|^2 / mu dt + g(X_T)], dX = 2 m dt + sqrt(2) dW."""
        return -self.mu * grad

    def control_problem(self) -> ControlProblem:
        """u(0, x0) = min E[int_0^T |m|^2 / mu dt + g(X_T)], dX = 2 m dt + sqrt(2) dW, X_0 = x0
        (Ito on u(X_t, t) with the PDE: the cost of any m is u(0, x0) + E int |m + mu grad u|^2 / mu)."""
        mu = self.mu
        return ControlProblem(
            x0=torch.full((self.dim,), self.x0, dtype=torch.float64), T=self.T, drift=2.0, noise=math.sqrt(2.0),
            running=lambda m: (m * m).sum(1) / mu, terminal=self.terminal,
        )  # fmt: skip

    def condition_predictor(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = X[:, :-1]
        return self.terminal(x), self.terminal_grad(x)

    def project(self, X: torch.Tensor) -> torch.Tensor:
        return torch.cat([X[:, :-1], X[:, -1:].clamp(0.0, self.T)], 1)

    def project_condition(self, kind: str, X: torch.Tensor) -> torch.Tensor:
        return torch.cat([X[:, :-1], torch.full_like(X[:, -1:], self.T)], 1)

    def slice(self, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        """x_1 over x0 +- 3 through the start state (other coordinates x0, t = 0)."""
        coord = self.x0 + torch.linspace(-3.0, 3.0, n, dtype=torch.float64)
        X = torch.zeros(n, self.in_dim, dtype=torch.float64)
        X[:, :-1] = self.x0
        X[:, 0] = coord
        return X, coord, f"x_1 (other x_i = {self.x0:g}, t = 0)"

    def truth(self, X: torch.Tensor, samples: int, seed: int) -> TestSet:
        x = X[:, :-1].double().cpu().numpy()
        t = X[:, -1].double().cpu().numpy()
        u, grad, se = cole_hopf_radial(x, t, self.mu, self.T, samples, seed)
        return TestSet(X=X, u=torch.from_numpy(u), grad=torch.from_numpy(grad), u_se=torch.from_numpy(se))
