"""Derivative estimators behind one interface: ``estimate(model, X, method=..., needs=...)``.

- ``autograd``: exact derivatives of the unsmoothed network (stacked back-propagation).
- ``hutchinson``: exact first derivatives, Laplacian by a randomized Hessian trace (SDGD/HTE).
- ``stein``: vanilla Stein estimator of the Gaussian-smoothed network.
- ``stein-antithetic``: antithetic pairs with the ``g(x)`` control variate.
- ``stein-subspace``: stein-antithetic in the row space of the model's linear input layer
  (MATH.md section 3): per-sample cost and variance independent of d.

``estimate`` checks its arguments on every call (the API for users); the trainer builds a
``SteinSpec`` once per configuration and calls ``stein_estimate`` through
``dstein.estimators.sharded.Estimator``, which shares the samples across ranks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from dstein.estimators.autograd import autograd_estimate, hutchinson_estimate
from dstein.estimators.base import ALL_NEEDS, Derivatives, Reducer, Space, SteinSpec, check_needs
from dstein.estimators.stein import FullSpace, check_precision, stein_estimate
from dstein.estimators.subspace import InputSubspace, RadialSubspace
from dstein.noise import default_chunk

METHODS = ("autograd", "hutchinson", "stein", "stein-antithetic", "stein-subspace")
#: Methods of the unsmoothed network, computed whole on every rank (no sample sharding).
NETWORK_METHODS = ("autograd", "hutchinson")
STEIN_METHODS = ("stein", "stein-antithetic", "stein-subspace")
PAIRED_METHODS = ("stein-antithetic", "stein-subspace")
#: How a Stein estimate forms the Laplacian (dstein/estimators/stein.py).
LAPLACIANS = ("stein", "difference")

__all__ = ["ALL_NEEDS", "METHODS", "Derivatives", "SteinSpec", "estimate", "make_space", "make_spec", "provides"]


def provides(method: str) -> frozenset[str]:
    """The derivatives a PDE residual may use with ``method``. The subspace estimator gives
    ``grad`` values too, but a loss on them would get only a first-order parameter gradient
    (MATH.md section 3), so PDEs needing ``grad`` are refused for it; its inner products with
    given directions (``along``) carry the missing term (docs/MATH.md section 6)."""
    return ALL_NEEDS - {"grad"} if method == "stein-subspace" else ALL_NEEDS


def make_spec(
    method: str,
    needs: Iterable[str],
    *,
    samples: int,
    sigma_x: float,
    sigma_t: float | None = None,
    seed: int = 0,
    step: int = 0,
    stream: int = 0,
    chunk: int | None = None,
    laplacian: str = "stein",
) -> SteinSpec:
    """Validated description of a Stein estimate (errors name the offending argument)."""
    if method not in STEIN_METHODS:
        raise ValueError(f"estimator.method={method!r} is not a Stein method {STEIN_METHODS}")
    antithetic = method in PAIRED_METHODS
    if not isinstance(samples, int) or samples < (4 if antithetic else 2):
        raise ValueError(f"estimator.samples={samples!r} must be an integer >= {4 if antithetic else 2}")
    if antithetic and samples % 2:
        raise ValueError(f"estimator.samples={samples} must be even for {method} (pairs)")
    if not sigma_x or sigma_x <= 0:
        raise ValueError(f"estimator.sigma_x={sigma_x!r} must be > 0")
    if sigma_t is not None and sigma_t <= 0:
        raise ValueError(f"estimator.sigma_t={sigma_t!r} must be > 0")
    if laplacian not in LAPLACIANS:
        raise ValueError(f"estimator.laplacian={laplacian!r} must be one of {LAPLACIANS}")
    if laplacian == "difference" and not antithetic:
        raise ValueError(
            f"estimator.laplacian=difference needs antithetic pairs (second differences): {method} has none; "
            "use stein-antithetic or stein-subspace"
        )
    chunk = default_chunk(samples, paired=antithetic) if chunk is None else chunk
    if antithetic and chunk % 2:
        raise ValueError(f"estimator.chunk={chunk} must be even for {method} (pairs)")
    spec = SteinSpec(
        antithetic=antithetic,
        needs=check_needs(needs),
        samples=samples,
        chunk=chunk,
        sigma_x=float(sigma_x),
        sigma_t=None if sigma_t is None else float(sigma_t),
        seed=seed,
        step=step,
        stream=stream,
        subspace=method == "stein-subspace",
        laplacian=laplacian,
    )
    spec.num_chunks  # noqa: B018 - validates that samples is a whole number of chunks
    return spec


def make_space(
    model: torch.nn.Module, X: torch.Tensor, spec: SteinSpec, cache: dict | None = None, shares: int = 1
) -> Space:
    """Where ``spec``'s perturbations live: the row space of the model's input layer, with x's
    own direction for a model with a quadratic feature (stein-subspace; ``cache``, a dict that
    lives for one loss, lets the estimates of that loss share its basis) or all input
    coordinates. ``shares``: the ranks that sum their partial sums (what each computes whole
    from the sums then counts 1 / shares)."""
    if not spec.subspace:
        return FullSpace(model, X, spec)
    quadratic = getattr(model, "quadratic_feature", None)
    radial = callable(quadratic) and quadratic() is not None
    return (RadialSubspace if radial else InputSubspace)(model, X, spec, cache, shares)


def estimate(
    model: torch.nn.Module,
    X: torch.Tensor,
    *,
    method: str,
    needs: Iterable[str],
    samples: int | None = None,
    sigma_x: float | None = None,
    sigma_t: float | None = None,
    seed: int = 0,
    step: int = 0,
    stream: int = 0,
    chunk: int | None = None,
    chunks: Iterable[int] | None = None,
    reduce: Reducer | None = None,
    rows: tuple[int, int] | None = None,
    recompute: bool = False,
    cache: dict | None = None,
    directions: torch.Tensor | None = None,
    laplacian: str = "stein",
    weights: torch.Tensor | None = None,
) -> Derivatives:
    """Derivatives of the model at points ``X`` (time, if any, in the last column).

    ``sigma_t`` given means ``X`` has a time column. For Stein methods all derivatives of a
    point come from one set of ``samples`` perturbations, drawn in chunks of ``chunk``
    samples from a generator seeded by ``(seed, step, stream, chunk index)``; ``chunks``
    restricts the evaluation to some chunks and ``reduce`` sums the partial sums across
    ranks (the distributed trainer sets both). The result is differentiable with respect
    to the model's parameters. ``recompute`` trades a second forward pass per chunk in the
    backward pass for a peak memory set by ``chunk`` alone. ``cache``: a dict shared by the
    estimates of ONE loss (one backward pass): stein-subspace computes its basis once.
    ``directions`` (B, m, d): for ``along``, the inner products of the spatial gradient with
    m directions per point. ``laplacian``: ``stein`` (the Laplacian of the smoothed model) or
    ``difference`` (second differences of the pairs: the network's Laplacian up to O(sigma^2),
    far less noisy at high d). ``weights`` (B, d), or (B, 1) for one weight per point: for
    ``trace``, ``sum_i w_i d^2 f / dx_i^2`` at each point (w >= 0: a diffusion's sigma_i^2).
    """
    needs = check_needs(needs)
    time_dependent = sigma_t is not None
    if "u_t" in needs and not time_dependent:
        raise ValueError("needs 'u_t' but sigma_t is None: a time-dependent input needs sigma_t")
    if "along" in needs and (directions is None or directions.dim() != 3 or directions.shape[0] != X.shape[0]):
        raise ValueError("needs 'along' requires directions of shape (B, m, d) for the B points")
    if "trace" in needs and (weights is None or weights.dim() != 2 or weights.shape[0] != X.shape[0]
                             or weights.shape[1] not in (1, X.shape[1] - int(time_dependent))):  # fmt: skip
        raise ValueError("needs 'trace' requires weights of shape (B, d) or (B, 1) for the B points")
    if method == "autograd":
        return autograd_estimate(model, X, needs, time_dependent, directions, weights)
    if method == "hutchinson":
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"estimator.samples={samples!r}: hutchinson needs an integer number of probes >= 1")
        out = hutchinson_estimate(model, X, needs, time_dependent, samples, seed, step, stream, directions,
                                  weights=weights)  # fmt: skip
        assert isinstance(out, Derivatives)
        return out
    if samples is None or sigma_x is None:
        raise ValueError(f"method {method!r} needs samples and sigma_x")
    spec = make_spec(
        method,
        needs,
        samples=samples,
        sigma_x=sigma_x,
        sigma_t=sigma_t,
        seed=seed,
        step=step,
        stream=stream,
        chunk=chunk,
        laplacian=laplacian,
    )
    check_precision(model, spec.sigma_x, needs)
    space = make_space(model, X, spec, cache)
    return stein_estimate(
        model, X, spec, space, chunks=chunks, reduce=reduce, rows=rows, recompute=recompute, directions=directions,
        weights=weights,
    )  # fmt: skip
