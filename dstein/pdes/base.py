"""What a PDE is to dstein: a residual in terms of Derivatives, conditions, samplers, truth.

A PDE is defined once. Training asks it for collocation points (domain and one set per
condition), for the derivatives its residual needs, and for condition targets; evaluation
asks it for test points with the exact solution and its spatial gradient.
"""

from __future__ import annotations

import abc
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from dstein.estimators.base import Derivatives
from dstein.estimators.constraint import OutputTransform
from dstein.noise import Streams, counter_seed

#: Test points are drawn in blocks of this many (see PDE.test_points), fewer where a block
#: would hold more than TEST_BLOCK_ELEMENTS numbers (1 GiB in float64: from in_dim = 131,072
#: on; at d = 1,000,000 a block of 1024 rows was 8 GB, twice over while it was drawn).
TEST_BLOCK = 1024
TEST_BLOCK_ELEMENTS = 1 << 27
#: Rows of an exact solution evaluated at once hold at most this many numbers each (128 MB).
TRUTH_BLOCK_ELEMENTS = 1 << 24
#: The default slice's range comes from test points of at most this many numbers (``slice``).
SLICE_SAMPLE_ELEMENTS = 1 << 25


@dataclass
class TestSet:
    """Test points with the solution and its spatial gradient (float64).

    ``u_se`` holds the Monte Carlo standard error of ``u`` where the truth is estimated.
    """

    X: torch.Tensor
    u: torch.Tensor
    grad: torch.Tensor
    u_se: torch.Tensor | None = None


@dataclass(frozen=True)
class ControlProblem:
    """The stochastic control problem whose value function a PDE's solution is (``PDE.control_problem``):

        u(0, x0) = min over m of E[ int_0^T running(m_t) dt + terminal(X_T) ],
        dX = drift m dt + noise dW,  X_0 = x0,

    with the optimal feedback ``m = PDE.control(X, grad u)``. dstein/control.py simulates the
    closed loop of a trained solution's control."""

    x0: torch.Tensor  # (d,) float64
    T: float
    drift: float
    noise: float
    running: Callable[[torch.Tensor], torch.Tensor]  # control (B, d) -> cost rate (B,)
    terminal: Callable[[torch.Tensor], torch.Tensor]  # states (B, d) -> cost (B,)


@functools.cache
def _takes_dtype(sampler: Callable) -> bool:
    """Whether a PDE class's sampler method takes ``dtype`` (asked of its signature once per
    method: inspect.signature on every step cost 0.1 ms)."""
    return "dtype" in inspect.signature(sampler).parameters


def process_times(
    kind: str, n: int, T: float, gen: torch.Generator, dtype: torch.dtype, power: float = 1.0
) -> torch.Tensor:
    """Times of ``n`` process points of ``kind``: T for ``terminal``, else T v^power, v ~ U(0, 1)
    (``pde.process_time_power``; one uniform draw per point whatever the power)."""
    if kind == "terminal":
        return torch.full((n,), T, dtype=dtype)
    v = torch.rand(n, generator=gen, dtype=dtype)
    return T * (v if power == 1 else v**power)


class PDE(abc.ABC):
    """Base class; subclasses set the class attributes and implement the methods."""

    #: Registry name.
    name: ClassVar[str]
    #: Derivatives the residual uses (a subset of ``dstein.estimators.ALL_NEEDS``).
    needs: ClassVar[frozenset[str]]
    #: Whether inputs carry a time column (last).
    time_dependent: ClassVar[bool]
    #: Names of the condition point sets (boundary, initial, terminal ...).
    conditions: ClassVar[tuple[str, ...]]
    #: The conditions that ``output_transform`` makes hold exactly (no loss for them).
    constrained: ClassVar[tuple[str, ...]] = ()
    #: The point kinds ``sample_process`` draws (``domain`` and conditions at the process's
    #: end, such as hjb's ``terminal``); () : the PDE declares no forward process.
    process_kinds: ClassVar[tuple[str, ...]] = ()
    #: Share of the training points of each kind in ``process_kinds`` drawn along the process
    #: (``pde.process_share``; set by ``dstein.pdes.build_pde``).
    process_share: float = 0.0
    #: The process points' times t = T v^p (``pde.process_time_power``; set by ``build_pde``).
    process_time_power: float = 1.0
    #: Whether ``truth`` can give the solution at any point. False for PDEs known only by
    #: reference values at single points (Deep BSDE's semilinear benchmarks: ``start`` and
    #: ``reference_values``): runs then draw no test sets, and every evaluation reports the
    #: value at the start state against its reference.
    truth_known: ClassVar[bool] = True
    #: Whether ``output_transform`` smooths its A by ``smoothing`` (model.smooth_constraint).
    smooths_constraint: ClassVar[bool] = False
    #: sigma_x of the smoothing an ``output_transform`` applies to its A: A_sigma(x) =
    #: E[A(x + sigma eps)], eps ~ N(0, I_d) (0: A exact; set by ``dstein.build.build_pde``).
    smoothing: float = 0.0

    def __init__(self, dim: int):
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"pde.dim={dim!r} must be a positive integer")
        self.dim = dim

    @property
    def in_dim(self) -> int:
        return self.dim + (1 if self.time_dependent else 0)

    @abc.abstractmethod
    def residual(self, X: torch.Tensor, D: Derivatives) -> torch.Tensor:
        """PDE residual at domain points (zero for the exact solution), shape (B,)."""

    @abc.abstractmethod
    def sample_domain(self, n: int, gen: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Interior points, shape (n, in_dim), drawn in ``dtype`` (training asks for float32,
        test points are float64)."""

    @abc.abstractmethod
    def sample_condition(
        self, kind: str, n: int, gen: torch.Generator, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """Points of one condition set, drawn in ``dtype``."""

    def training_points(self, kind: str, n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        """``n`` points of ``kind`` (``domain`` or a condition) in ``dtype``.

        A sampler without a ``dtype`` parameter (written before it existed) draws in float64
        and the points are converted: the same training, with the slower draw.
        The last ``round(process_share n)`` rows of a kind in ``process_kinds`` are drawn along
        the forward process from the start state (``sample_process``), after the others.
        """
        along = round(self.process_share * n) if kind in self.process_kinds else 0
        sampler = self.sample_domain if kind == "domain" else functools.partial(self.sample_condition, kind)
        if _takes_dtype(type(self).sample_domain if kind == "domain" else type(self).sample_condition):
            X = sampler(n - along, gen, dtype=dtype)
        else:
            X = sampler(n - along, gen).to(dtype)
        if not along:
            return X
        # power only where set: a user's sample_process written without it serves p = 1
        power = {"power": self.process_time_power} if self.process_time_power != 1 else {}
        return torch.cat([X, self.sample_process(kind, along, gen, dtype, **power)])

    def sample_process(
        self, kind: str, n: int, gen: torch.Generator, dtype: torch.dtype = torch.float64, power: float = 1.0
    ) -> torch.Tensor:
        """``n`` points of ``kind`` (one of ``process_kinds``) along the PDE's forward process
        from its start state (``start``): ``domain`` at times t = T v^power, v ~ U(0, 1) (``power``
        1: t ~ U(0, T); ``process_times``), a condition at its own time, x drawn from the law of
        X_t (hjb: x0 + sqrt(2 t) Z). The along-the-process test set (``process_test_set``) and
        ``pde.process_share`` draw from it; PDEs that declare ``process_kinds`` implement it (a
        user's PDE without ``power`` serves ``pde.process_time_power=1`` only)."""
        raise NotImplementedError(f"pde {self.name} declares no forward process (process_kinds is empty)")

    @abc.abstractmethod
    def condition_target(self, kind: str, X: torch.Tensor) -> torch.Tensor:
        """Value the solution must take at condition points, shape (B,)."""

    @abc.abstractmethod
    def project(self, X: torch.Tensor) -> torch.Tensor:
        """Map points moved by adversarial steps back into the domain."""

    def project_condition(self, kind: str, X: torch.Tensor) -> torch.Tensor:
        """Map condition points moved by adversarial steps back onto their set."""
        return self.project(X)

    def output_transform(self, X: torch.Tensor) -> OutputTransform | None:
        """The hard constraint ``u = A + B f`` at points X (``model.hard_constraint``), with
        the derivatives of A and B in closed form, differentiable in X; None: this PDE has
        none. It must make the conditions in ``constrained`` hold exactly."""
        return None

    def control(self, X: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | None:
        """The feedback control that the solution's gradient gives at points X (a control
        problem's optimal action; ``dstein.load(...).control``); None: the PDE has none."""
        return None

    def control_problem(self) -> ControlProblem | None:
        """The control problem whose value function this PDE's solution is (its dynamics and
        costs; the feedback is ``control``), for the closed-loop cost of a trained solution
        (dstein/control.py); None: the PDE is not one."""
        return None

    def diffusion(self, X: torch.Tensor) -> torch.Tensor | None:
        """``sigma_i(x)`` of a diagonal diffusion at points X: (B, d), or (B, 1) for the same
        sigma in every coordinate. A PDE whose operator is ``L u = (1/2) sum_i sigma_i(x)^2
        d^2u/dx_i^2 + b(x) . grad u`` declares it (and ``drift``), needs ``trace`` (and ``along``)
        and writes ``self.generator(D)`` in its residual; every estimator delivers it
        (docs/MATH.md section 15). None: the PDE declares no diffusion."""
        return None

    def drift(self, X: torch.Tensor) -> torch.Tensor | None:
        """``b(x)`` of the operator's first-order part at points X, (B, d); None: no drift."""
        return None

    def extra_directions(self, X: torch.Tensor) -> torch.Tensor | None:
        """Directions (B, m, d) whose inner products with grad u the residual uses beyond the
        drift (``D.along[:, 1:]`` after a drift, else ``D.along``); None: none."""
        return None

    @property
    def has_drift(self) -> bool:
        return type(self).drift is not PDE.drift

    def coefficients(self, X: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What the estimators need of the operator at points X: the directions of ``along``
        (the drift first, then ``extra_directions``; (B, m, d)) and the weights of ``trace``
        (``sigma_i(x)^2``, (B, d) or (B, 1)); None where the PDE has none."""
        parts = [self.drift(X).unsqueeze(1)] if self.has_drift else []  # type: ignore[union-attr]
        extra = self.extra_directions(X)
        if extra is not None:
            parts.append(extra)
        sigma = self.diffusion(X)
        return (torch.cat(parts, 1) if parts else None), (None if sigma is None else sigma * sigma)

    def generator(self, D: Derivatives) -> torch.Tensor:
        """``L u = (1/2) sum_i sigma_i^2 d^2u/dx_i^2 + b . grad u`` from an estimate's ``trace``
        and (with a drift) the first column of ``along``."""
        out = 0.5 * D.require("trace")
        return out + D.require("along")[:, 0] if self.has_drift else out

    def condition_predictor(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A predictor that knows only a condition: the terminal or initial value taken as
        the solution everywhere, and its spatial gradient (a baseline of every evaluation);
        None where the PDE has no such value (a boundary target that is the solution itself)."""
        return None

    def start(self) -> tuple[str, torch.Tensor, float | None, str] | None:
        """The state a terminal-value problem's process starts from, and the solution's
        reference value there: (its name, e.g. "u(0,0)"; the point, shape (1, in_dim); the
        value, None where none is known; where it comes from). Every evaluation reports the
        model's value there (``start_value``) and its error (``start_rel_error``, where the
        value is known). None: the PDE declares none."""
        return None

    def start_baselines(self) -> dict[str, tuple[float, float, str]]:
        """Values at the start state of simpler problems that a method must beat (a PDE known
        only at its start state has no test-set baselines): by name, (value, its Monte Carlo
        standard error, what it is). Reported beside the model's value in summary.json and by
        launch/evaluate.py. {}: none."""
        return {}

    def reference_values(self) -> dict[str, tuple[torch.Tensor, float, str]]:
        """Published or independently computed values of the solution at single points, by
        name: (the point, shape (1, in_dim), the value, where it comes from). Reported in
        summary.json beside the model's values."""
        return {}

    def sample_test(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return self.sample_domain(n, gen)

    def slice(self, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Points along a 1-D line through the domain, their coordinate on it, and its name.

        Default: the first coordinate varied over the test points' range through the first
        test point (the range of 256 test points; fewer at very large d, where 256 rows are
        2 GB at d = 10^6: at least 16).
        """
        rows = min(256, max(16, SLICE_SAMPLE_ELEMENTS // self.in_dim))
        sample = self.sample_test(rows, torch.Generator().manual_seed(0))
        coord = torch.linspace(float(sample[:, 0].min()), float(sample[:, 0].max()), n, dtype=torch.float64)
        X = sample[:1].repeat(n, 1)
        X[:, 0] = coord
        return X, coord, "x_1"

    @abc.abstractmethod
    def truth(self, X: torch.Tensor, samples: int, seed: int) -> TestSet:
        """Ground truth at points X (``samples`` and ``seed`` for Monte Carlo truths)."""

    def truth_values(self, X: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
        """The solution alone at X (the plot's slice): ``truth(X, ...).u`` unless the PDE can
        skip the gradient (ExactPDE does: a (200, d) gradient is 1.6 GB at d = 10^6)."""
        return self.truth(X, samples, seed).u

    def test_points(self, start: int, stop: int, seed: int, along_process: bool = False) -> torch.Tensor:
        """Rows ``start:stop`` of the endless sequence of test points of ``seed`` (``along_process``:
        of the points along the forward process from the start state, ``sample_process``).

        Points are drawn in blocks of ``test_block`` rows, block ``k`` from a generator seeded by
        ``(seed, k)``: any slice can be produced without drawing the rows before it (several
        ranks write one test set, none holding all of it).
        """
        if stop <= start:
            return torch.zeros(0, self.in_dim, dtype=torch.float64)
        rows = self.test_block
        stream = Streams.PROCESS_TEST if along_process else Streams.TEST_POINTS
        blocks = []
        for k in range(start // rows, (stop - 1) // rows + 1):
            gen = torch.Generator().manual_seed(counter_seed(seed, k, stream))
            block = self.sample_process("domain", rows, gen) if along_process else self.sample_test(rows, gen)
            base = k * rows
            blocks.append(block[max(start, base) - base : min(stop, base + rows) - base])
        return torch.cat(blocks)

    @property
    def test_block(self) -> int:
        """Rows per block of test points: TEST_BLOCK, fewer at very large in_dim."""
        return min(TEST_BLOCK, max(1, TEST_BLOCK_ELEMENTS // self.in_dim))

    def test_set(self, n: int, seed: int, truth_samples: int) -> TestSet:
        """``n`` test points of ``seed`` and their ground truth."""
        return self.truth(self.test_points(0, n, seed), truth_samples, seed)

    def process_test_set(self, n: int, seed: int, truth_samples: int) -> TestSet | None:
        """``n`` test points along the forward process from the start state (t ~ U(0, T)) and
        their ground truth; None where the PDE declares no process."""
        if "domain" not in self.process_kinds or n == 0:
            return None
        return self.truth(self.test_points(0, n, seed, along_process=True), truth_samples, seed)

    def describe(self) -> dict:
        """Parameters that identify this PDE (stored with runs and data files); ``process_share``
        and ``process_time_power`` only where set (files written before them stay valid)."""
        share = {"process_share": self.process_share} if self.process_share else {}
        if self.process_time_power != 1:
            share["process_time_power"] = self.process_time_power
        return {"name": self.name, "dim": self.dim, **share}

    def params(self) -> dict:
        """The PDE's own parameters (``describe`` without name and dimension)."""
        return {k: v for k, v in self.describe().items() if k not in ("name", "dim")}

    def point_counts(self, domain_points: int, condition_points: int, constrained: bool = False) -> dict[str, int]:
        """Points per step of each kind: ``domain`` and every condition set (``constrained``:
        but those that the output transform makes hold exactly)."""
        kinds = [k for k in self.conditions if not (constrained and k in self.constrained)]
        return {"domain": domain_points, **{kind: condition_points for kind in kinds}}


class ExactPDE(PDE):
    """A PDE with a closed-form solution: the test set is exact."""

    @abc.abstractmethod
    def exact(self, X: torch.Tensor) -> torch.Tensor:
        """Exact solution at X, shape (B,)."""

    @abc.abstractmethod
    def exact_grad(self, X: torch.Tensor) -> torch.Tensor:
        """Exact spatial gradient at X, shape (B, dim)."""

    def truth(self, X: torch.Tensor, samples: int, seed: int) -> TestSet:
        """The closed forms at X, in blocks of rows of at most TRUTH_BLOCK_ELEMENTS numbers
        (a closed form's intermediates are as large as X, a dozen of them for the two-body
        solutions: 200 points at d = 10^6 took 11 GB whole)."""
        blocks = self._truth_blocks(X)
        return TestSet(X=X, u=torch.cat([self.exact(B) for B in blocks]),
                       grad=torch.cat([self.exact_grad(B) for B in blocks]))  # fmt: skip

    def truth_values(self, X: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
        return torch.cat([self.exact(B) for B in self._truth_blocks(X)])

    @staticmethod
    def _truth_blocks(X: torch.Tensor) -> list[torch.Tensor]:
        rows = max(1, TRUTH_BLOCK_ELEMENTS // max(1, X.shape[1]))
        return [X[lo : lo + rows] for lo in range(0, X.shape[0], rows)] or [X]


def uniform_ball(
    n: int, d: int, gen: torch.Generator, radius: float = 1.0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Points uniform in the d-ball: a uniform direction times radius U^(1/d)."""
    z = torch.randn(n, d, generator=gen, dtype=dtype)
    z = z / z.norm(dim=1, keepdim=True)
    r = torch.rand(n, 1, generator=gen, dtype=dtype) ** (1.0 / d)
    return radius * r * z


def uniform_sphere(n: int, d: int, gen: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    z = torch.randn(n, d, generator=gen, dtype=dtype)
    return z / z.norm(dim=1, keepdim=True)
