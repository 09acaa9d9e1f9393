"""What every estimator returns, the names of the derivatives one can ask for, and the
types the Stein estimators share: ``SteinSpec`` (what defines an estimate), ``Space``
(where the perturbations live) and ``Reducer`` (how partial sums are added across ranks)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Protocol

import torch

from dstein.noise import num_chunks

#: The derivatives an estimator can be asked for.
#: ``u``: value; ``u_t``: time derivative; ``grad``: spatial gradient (B, d);
#: ``grad_sq``: squared norm of the spatial gradient; ``lap``: spatial Laplacian;
#: ``along``: the spatial gradient's inner products with given directions (B, m), one set
#: of m directions per point (``directions``, (B, m, d)); ``trace``: the diagonal-weighted
#: trace of the spatial Hessian, ``sum_i w_i d^2u/dx_i^2``, one set of weights per point
#: (``weights``, (B, d), or (B, 1): the same weight for every coordinate), the second-order
#: part of a diffusion ``(1/2) sum_i sigma_i(x)^2 d^2u/dx_i^2`` (docs/MATH.md section 15).
ALL_NEEDS = frozenset({"u", "u_t", "grad", "grad_sq", "lap", "along", "trace"})

#: A function that sums partial sums across the ranks of a sample group (identity in one process).
Reducer = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass
class Derivatives:
    """Derivatives of the (smoothed) model at B points; ``None`` where not requested."""

    u: torch.Tensor | None = None
    u_t: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    grad_sq: torch.Tensor | None = None
    lap: torch.Tensor | None = None
    along: torch.Tensor | None = None
    trace: torch.Tensor | None = None

    def require(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        if value is None:
            raise KeyError(f"derivative {name!r} was not estimated; add it to the PDE's needs")
        return value

    def available(self) -> frozenset[str]:
        return frozenset(f.name for f in fields(self) if getattr(self, f.name) is not None)


def check_needs(needs) -> frozenset[str]:
    needs = frozenset(needs)
    unknown = needs - ALL_NEEDS
    if unknown or not needs:
        raise ValueError(f"needs={sorted(needs)} is not a non-empty subset of {sorted(ALL_NEEDS)}")
    return needs


def split_input(X: torch.Tensor, time_dependent: bool) -> int:
    """Spatial dimension d of inputs X of shape (B, d) or (B, d + 1) with time last."""
    if X.dim() != 2:
        raise ValueError(f"inputs must have shape (B, d) or (B, d+1), got {tuple(X.shape)}")
    d = X.shape[1] - (1 if time_dependent else 0)
    if d < 1:
        raise ValueError(f"inputs of shape {tuple(X.shape)} leave no spatial dimension")
    return d


def body_at(
    body: Callable[[torch.Tensor], torch.Tensor], h0: torch.Tensor, plus: torch.Tensor, minus: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rest of a layered model at pre-activations ``h0 + plus`` (and ``h0 + minus``): h0
    (B, k) per point, plus and minus (B, n, k) per sample; (B, n) values each, a pair in one
    batch. What the subspace spaces and the full space through the first layer share."""
    h = h0.unsqueeze(1)
    return _body_of_pair(body, h + plus, None if minus is None else h + minus)


def body_at_signs(
    body: Callable[[torch.Tensor], torch.Tensor],
    h0: torch.Tensor,
    odd: torch.Tensor,
    even: torch.Tensor | None,
    antithetic: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``body_at`` where the change is ``even + odd`` and, for a pair, ``even - odd`` (even
    None: zero), without the negated copy ``-odd`` that ``body_at`` needs (a pair's forward
    and backward take about 0.6x the time); the same values, bit for bit."""
    h = h0.unsqueeze(1)
    plus = h + odd if even is None else h + (even + odd)
    if not antithetic:
        return _body_of_pair(body, plus, None)
    return _body_of_pair(body, plus, h - odd if even is None else h + (even - odd))


def _body_of_pair(
    body: Callable[[torch.Tensor], torch.Tensor], plus: torch.Tensor, minus: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The body at pre-activations ``plus`` (and ``minus``), (B, n, k) each, in one batch."""
    B, n, k = plus.shape
    if minus is None:
        return body(plus.reshape(B * n, k)).reshape(B, n), None
    g = body(torch.cat([plus.reshape(B * n, k), minus.reshape(B * n, k)])).reshape(2, B, n)
    return g[0], g[1]


@dataclass(frozen=True)
class SteinSpec:
    """Everything that defines a Stein estimate besides the model and the points.

    Built and checked once per configuration (``dstein.estimators.make_spec``), then varied
    per call with ``at(step, stream)``, which says whose noise it draws."""

    antithetic: bool
    needs: frozenset[str]
    samples: int
    chunk: int
    sigma_x: float
    sigma_t: float | None
    seed: int = 0
    step: int = 0
    stream: int = 0
    subspace: bool = False
    laplacian: str = "stein"

    def at(self, step: int, stream: int) -> SteinSpec:
        """The same estimate with the noise of ``(step, stream)``."""
        return dataclasses.replace(self, step=step, stream=stream)

    @property
    def time_dependent(self) -> bool:
        return self.sigma_t is not None

    @property
    def terms(self) -> int:
        """Number of terms averaged: samples (vanilla) or antithetic pairs."""
        return self.samples // 2 if self.antithetic else self.samples

    @property
    def num_chunks(self) -> int:
        return num_chunks(self.samples, self.chunk)

    @property
    def terms_per_chunk(self) -> int:
        return self.chunk // 2 if self.antithetic else self.chunk


class NoiseOfZ:
    """What a space that sees the noise through ``z`` alone answers: no other noise, and
    Stein's Laplacian weight ``|z_x|^2 - rank`` (``stein.FullSpace``, ``subspace.InputSubspace``)."""

    rank: int

    def draw_aux(self, gen: torch.Generator, shape: tuple[int, int]) -> torch.Tensor | None:
        return None

    def lap_weight(self, zx_sq: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
        return zx_sq - self.rank

    def weighted_sq(self, zx: torch.Tensor, aux: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
        """``sum_j v_j (z_j^2 - 1)`` per sample (B, n), ``v`` (B, d) per point, z in R^d itself."""
        return torch.einsum("bnd,bd->bn", zx * zx, v) - v.sum(1, keepdim=True)


class Space(Protocol):
    """Where a Stein estimate perturbs the model: all input coordinates (``stein.FullSpace``)
    or the row space of its linear input layer (``subspace.InputSubspace``).

    ``X``: the points (B, columns); ``rank``: the spatial coordinates of the noise ``z``;
    ``width``: all its columns (rank, then time if any)."""

    X: torch.Tensor
    rank: int
    width: int

    def center(self) -> torch.Tensor:
        """g at the unperturbed points, (B,)."""
        ...

    def draw_aux(self, gen: torch.Generator, shape: tuple[int, int]) -> torch.Tensor | None:
        """Noise of each sample (shape (points, samples)) besides ``z``, drawn from the chunk's
        generator after ``z`` (None: the space needs none). The radial subspace draws the
        squared norm of the perturbation outside its basis here."""
        ...

    def values(
        self, z: torch.Tensor, antithetic: bool, aux: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """g at X + scale * z (and X - scale * z when ``antithetic``), as (B, n) tensors."""
        ...

    def lap_weight(self, zx_sq: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
        """Stein's Laplacian weight ``|delta|^2 / sx^2 - d`` of each sample, from ``|z_x|^2``
        (and ``aux``): ``|z_x|^2 - rank`` where g sees the noise through ``z`` alone."""
        ...

    def weighted_sq(self, zx: torch.Tensor, aux: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
        """``E[sum_j v_j (delta_j^2 / sx^2 - 1) | the space's noise]`` per sample (B, n), ``v``
        (B, d) per point: the weight of a diagonal-weighted Hessian trace (``trace``), exactly
        the full-space weight's conditional mean given what g sees (docs/MATH.md section 15)."""
        ...

    def spatial(self, coords: torch.Tensor) -> torch.Tensor:
        """A vector of z's spatial coordinates as a vector in R^d."""
        ...

    def along(self, coords: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        """Inner products (B, m) of the gradient with these coordinates and ``directions`` (B, m, d)."""
        ...
