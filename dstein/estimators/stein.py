"""Stein estimators of derivatives of the Gaussian-smoothed model (MATH.md sections 2 and 4).

The smoothed model is ``f(X) = E[g(X + eps)]`` with ``eps = (delta, tau)``, ``delta ~ N(0,
sx^2 I_d)``, ``tau ~ N(0, st^2)``. Every derivative is a weighted mean of plain forward
evaluations of ``g``; nothing is back-propagated to the inputs.

Both estimators are written in one form. Per sample (vanilla) or per antithetic pair, with
``z = eps / sigma`` the standard normal draw:

    value term   a = g                   | (g+ + g-) / 2
    odd term     o = g                   | (g+ - g-) / 2
    even term    e = g                   | (g+ + g- - 2 g0) / 2

    u = mean(a),  u_t = mean(z_t o) / st,  grad = mean(z_x o) / sx,
    lap = mean((|z_x|^2 - d) e) / sx^2        (laplacian="stein": the Laplacian of f)
    lap = mean((3 - z_t^2) e) / sx^2  or  mean(2 e) / sx^2 without time
                                              (laplacian="difference", pairs only: the
                                               network's Laplacian up to O(sx^2), with
                                               about (d/2)^2 times less variance;
                                               docs/MATH.md section 9)
    |grad|^2 = (|sum v|^2 - sum |v|^2) / (n (n - 1)),  v = z_x o / sx   (unbiased U-statistic)
    sum_i w_i d_ii = mean((c W_lap + sum_j (w_j - c)(z_j^2 - 1)) e) / sx^2,  c = mean_j w_j
                                              (``trace``: W_lap the Laplacian's weight above;
                                               docs/MATH.md section 15)

Working with ``z`` rather than ``eps`` keeps the weights of order one instead of dividing
by ``sx^4``. The estimates are assembled from *sums* over samples, which is what makes
sharding possible: a rank sums over its own noise chunks, the sums are added across ranks,
and only then are they turned into derivatives (``finalize``).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.checkpoint import checkpoint

from dstein.estimators.base import (
    Derivatives,
    NoiseOfZ,
    Reducer,
    Space,
    SteinSpec,
    body_at,
    body_at_signs,
    split_input,
)
from dstein.noise import chunk_generator

#: Unit roundoff of the matrix products under torch.set_float32_matmul_precision on CUDA:
#: 'high' allows TF32 (10-bit mantissa), 'medium' bf16 (7-bit mantissa).
MATMUL_ROUNDOFF = {"high": (2.0**-10, "TF32 matmul"), "medium": (2.0**-7, "bf16 matmul")}


def precision_problem(sigma_x: float, dtype: torch.dtype, matmul: str, on_cuda: bool, needs: frozenset[str]) -> str:
    """Why ``sigma_x`` is too small for the perturbed forward passes at this precision ('' if fine).

    The Laplacian rests on ``g+ + g- - 2 g0 ~ sx^2``; first derivatives on ``g+ - g- ~ sx``.
    Either must exceed the unit roundoff by two orders of magnitude (MATH.md, precision).
    """
    eps, precision = torch.finfo(dtype).eps, str(dtype).removeprefix("torch.")
    if on_cuda and matmul in MATMUL_ROUNDOFF and dtype == torch.float32:
        eps, precision = MATMUL_ROUNDOFF[matmul]
    scale = sigma_x**2 if "lap" in needs else sigma_x
    if scale >= 100 * eps:
        return ""
    smallest = (100 * eps) ** (0.5 if "lap" in needs else 1.0)
    return (
        f"estimator.sigma_x={sigma_x} is too small for {precision} perturbed forward passes (unit roundoff "
        f"{eps:.1e}): use sigma_x >= {smallest:.2g}, or float32 with TF32 off (run.matmul_precision=highest)"
    )


def check_precision(model: torch.nn.Module, sigma_x: float, needs: frozenset[str]) -> None:
    """Refuse a precision that cannot resolve the finite differences hidden in the estimate."""
    params = list(model.parameters())
    dtype = params[0].dtype if params else torch.float32
    on_cuda = any(p.is_cuda for p in params)
    matmul = torch.get_float32_matmul_precision()
    if on_cuda and matmul == "highest" and torch.backends.cuda.matmul.allow_tf32:
        matmul = "high"
    problem = precision_problem(sigma_x, dtype, matmul, on_cuda, needs)
    if problem:
        raise ValueError(problem)


def layered(model: torch.nn.Module) -> tuple | None:
    """``(pre_activation, input_weight, body, quadratic_feature)`` of a model that is
    ``body(pre_activation(X))`` with ``pre_activation(X) = input_weight() X + b`` (plus, with a
    quadratic feature, ``a * q(|x|^2)``): dstein.models.MLP and RadialMLP. None otherwise."""
    if not getattr(model, "layered_input", True):  # (the quadratic family: Q (x * x) per coordinate)
        return None
    parts = [getattr(model, name, None) for name in ("pre_activation", "input_weight", "body", "quadratic_feature")]
    return tuple(parts) if all(callable(p) for p in parts) else None


class FullSpace(NoiseOfZ):
    """Perturbations of all ``D`` input coordinates: ``g(X +- scale * z)``, ``z`` of width D
    (a ``base.Space``).

    For a model whose first layer is linear (``layered``), the perturbation is applied to that
    layer's pre-activation instead of the input: ``h0 +- W eps`` (and the change of its
    quadratic feature, from ``x . eps`` and ``|eps_x|^2``), so the two members of a pair share
    ``W eps`` and the first layer runs once per pair instead of twice, with no copy of the
    perturbed inputs. The same function of the same noise: ``through_input=True`` perturbs the
    input itself (any model; tests compare the two)."""

    def __init__(self, model: torch.nn.Module, X: torch.Tensor, spec: SteinSpec, through_input: bool = False):
        self.model, self.X = model, X
        self.d = split_input(X, spec.time_dependent)
        self.width = X.shape[1]  # columns of z: the d spatial ones (the "rank"), then time
        self.rank = self.d
        self.scale = torch.full((self.width,), spec.sigma_x, dtype=X.dtype, device=X.device)
        if spec.sigma_t is not None:
            self.scale[self.d] = spec.sigma_t
        parts = None if through_input else layered(model)
        self.h0: torch.Tensor | None = None
        if parts is not None:
            pre_activation, input_weight, self.body, quadratic = parts
            self.h0, self.W, self.feature = pre_activation(X), input_weight(), quadratic()
            if self.feature is not None:
                if self.feature.dim != self.d:
                    raise ValueError(
                        f"the model's quadratic feature reads {self.feature.dim} columns, the points have {self.d}"
                    )
                x = X[:, : self.d]
                self.x_sq = (x * x).sum(1).reshape(-1, 1, 1)

    def center(self) -> torch.Tensor:
        return (self.model(self.X) if self.h0 is None else self.body(self.h0)).reshape(-1)

    def _through_layer(self, eps: torch.Tensor, antithetic: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """g at pre-activations ``h0 + W eps`` (and ``h0 - W eps``), with the quadratic
        feature's change ``phi(|x +- eps_x|^2) - phi(|x|^2)``, ``|x +- eps_x|^2 - |x|^2 =
        +-2 x . eps_x + |eps_x|^2``."""
        assert self.h0 is not None
        odd = eps @ self.W.T  # (B, n, k): W eps, shared by the pair
        if self.feature is None:
            return body_at_signs(self.body, self.h0, odd, None, antithetic)
        ex = eps[..., : self.d]
        x_eps = 2 * (ex @ self.X[:, : self.d].unsqueeze(2))  # (B, n, 1)
        sq = (ex * ex).sum(-1, keepdim=True)
        plus = odd + self.feature.change(self.x_sq, sq + x_eps)
        minus = -odd + self.feature.change(self.x_sq, sq - x_eps) if antithetic else None
        return body_at(self.body, self.h0, plus, minus)

    def values(
        self, z: torch.Tensor, antithetic: bool, aux: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """g at X + scale*z (and X - scale*z), as (B, n) tensors."""
        B, n, D = z.shape
        eps = z * self.scale
        if self.h0 is not None:
            return self._through_layer(eps, antithetic)
        Xe = self.X.unsqueeze(1)
        if antithetic:
            Y = torch.cat([(Xe + eps).reshape(B * n, D), (Xe - eps).reshape(B * n, D)])
            g = self.model(Y).reshape(2, B, n)
            return g[0], g[1]
        return self.model((Xe + eps).reshape(B * n, D)).reshape(B, n), None

    def spatial(self, coords: torch.Tensor) -> torch.Tensor:
        """A vector of z's spatial coordinates as a vector in R^d (here: itself)."""
        return coords

    def along(self, coords: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        """Inner products (B, m) of the gradient ``coords`` (B, d) with ``directions`` (B, m, d)."""
        return torch.einsum("bmd,bd->bm", directions, coords)


#: Keys of the partial sums, in a fixed order (checkpointed chunks return tuples).
SUM_KEYS = ("value", "time", "grad", "grad_norms", "lap", "trace")


def _chunk_noise(
    space: Space, spec: SteinSpec, c: int, rows: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunk ``c``'s noise for the points of ``rows``: ``z`` (and the space's other noise),
    drawn from the chunk's own generator, so that chunks can be drawn in any order or at once."""
    B = space.X.shape[0]
    offset, total = rows
    gen = chunk_generator(spec.seed, spec.step, spec.stream, c, space.X.device)
    z = torch.randn((total, spec.terms_per_chunk, space.width), generator=gen, dtype=space.X.dtype,
                    device=space.X.device)  # fmt: skip
    aux = space.draw_aux(gen, (total, spec.terms_per_chunk))
    if total != B:
        z = z[offset : offset + B]
        aux = None if aux is None else aux[offset : offset + B]
    return z, aux


def _noise_in_parallel(space: Space, spec: SteinSpec, chunks: list[int], rows: tuple[int, int]) -> dict | None:
    """Every chunk's noise at once, drawn by parallel threads (None: draw chunk by chunk).

    PyTorch draws normals on one CPU core; with the chunks' independent generators, the
    other cores draw other chunks meanwhile (the same numbers). Only where the backward pass
    keeps every chunk's noise anyway (gradients on, no recomputation), so that peak memory
    is unchanged, and on CPU with more than one thread."""
    global _NOISE_POOL
    threads = torch.get_num_threads()
    numbers = rows[1] * spec.terms_per_chunk * space.width
    if (space.X.device.type != "cpu" or threads < 2 or len(chunks) < 2 or numbers < PARALLEL_NOISE_NUMBERS
            or not torch.is_grad_enabled()):  # fmt: skip
        return None
    if _NOISE_POOL is None or _NOISE_POOL[0] != threads:  # first use, or torch's thread count changed
        if _NOISE_POOL is not None:
            _NOISE_POOL[1].shutdown(wait=False)
        _NOISE_POOL = (threads, ThreadPoolExecutor(threads, thread_name_prefix="dstein-noise"))
    pool = _NOISE_POOL[1]
    return dict(zip(chunks, pool.map(lambda c: _chunk_noise(space, spec, c, rows), chunks), strict=True))


def _forget_noise_pool() -> None:
    global _NOISE_POOL
    _NOISE_POOL = None  # a forked child has none of its parent's threads


#: Chunks of fewer numbers are drawn one by one (a thread's hand-over would cost more).
PARALLEL_NOISE_NUMBERS = 1 << 18
_NOISE_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (threads, pool)
os.register_at_fork(after_in_child=_forget_noise_pool)


def _chunk_terms(
    space: Space,
    spec: SteinSpec,
    c: int,
    rows: tuple[int, int],
    g0: torch.Tensor | None,
    noise: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    trace: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, ...]:
    """One chunk's sums (SUM_KEYS that the spec needs, in order); its noise from its seed
    (``_chunk_noise``), drawn here unless given; ``trace``: the trace's weights (``_split_weights``)."""
    z, aux = noise if noise is not None else _chunk_noise(space, spec, c, rows)
    g_plus, g_minus = space.values(z, spec.antithetic, aux)
    return _sums_of(space, spec, z, aux, g_plus, g_minus, g0, trace)


def _sums_of(
    space: Space,
    spec: SteinSpec,
    z: torch.Tensor,
    aux: torch.Tensor | None,
    g_plus: torch.Tensor,
    g_minus: torch.Tensor | None,
    g0: torch.Tensor | None,
    trace: tuple[torch.Tensor, torch.Tensor | None] | None,
) -> tuple[torch.Tensor, ...]:
    """The sums over the samples ``z`` (B, n, width) of the terms of g at them (``g_plus``,
    ``g_minus``: (B, n)), SUM_KEYS that the spec needs, in order."""
    if g_minus is None:
        value = odd = g_plus
    else:
        value = 0.5 * (g_plus + g_minus)
        odd = 0.5 * (g_plus - g_minus)
    r = space.rank
    zx = z[..., :r]
    out = []
    if "u" in spec.needs:
        out.append(value.sum(1))
    if "u_t" in spec.needs:
        out.append((z[..., r] * odd).sum(1))
    if {"grad", "grad_sq", "along"} & spec.needs:
        out.append(torch.einsum("bnd,bn->bd", zx, odd))
    if {"grad_sq", "lap", "trace"} & spec.needs:
        zx_sq = (zx * zx).sum(-1)
        if "grad_sq" in spec.needs:
            out.append((zx_sq * odd * odd).sum(1))
    if {"lap", "trace"} & spec.needs:
        even = value if g0 is None else value - g0.unsqueeze(1)
        if spec.laplacian == "difference":  # (g+ + g- - 2 g0) / 2, time curvature weighted out
            lap_weight = (3 - z[..., r] ** 2) if space.width > r else 2.0
        else:
            lap_weight = space.lap_weight(zx_sq, aux)
        if "lap" in spec.needs:
            out.append((lap_weight * even).sum(1))
        if "trace" in spec.needs:  # c lap + sum_j (w_j - c) d_jj, c the mean weight (section 15)
            if trace is None:
                raise ValueError("needs 'trace' but no weights were given")
            mean, deviation = trace
            weight = mean * lap_weight
            if deviation is not None:
                weight = weight + space.weighted_sq(zx, aux, deviation)
            out.append((weight * even).sum(1))
    return tuple(out)


_HEAP_BOUNDED = False


def _bound_cpu_heap() -> None:
    """Make glibc hand freed chunk buffers back to the system (fixed 1 MiB mmap threshold).

    With its default dynamic threshold, the buffers of chunk after chunk end up in the heap
    and fragment it: at d = 1000, 32768 samples in chunks of 256 grew the process by 1.6 GB
    although each chunk is freed (0.26 GB at 1024 samples); with the fixed threshold, 0.14 GB
    (0.13 GB), at about 1.8x the time of a recomputed estimate. Process-wide and only on glibc;
    done once, when chunks are recomputed (which is when memory is the concern)."""
    global _HEAP_BOUNDED
    if _HEAP_BOUNDED:
        return
    _HEAP_BOUNDED = True
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def _keys(needs: frozenset[str]) -> list[str]:
    wanted = {
        "value": "u" in needs, "time": "u_t" in needs, "grad": bool({"grad", "grad_sq", "along"} & needs),
        "grad_norms": "grad_sq" in needs, "lap": "lap" in needs, "trace": "trace" in needs,
    }  # fmt: skip
    return [k for k in SUM_KEYS if wanted[k]]


def partial_sums(
    model: torch.nn.Module,
    X: torch.Tensor,
    spec: SteinSpec,
    chunks: Iterable[int],
    rows: tuple[int, int] | None = None,
    space: Space | None = None,
    recompute: bool = False,
    weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Sums of the estimator terms over the samples of ``chunks`` for each point of ``X``.

    ``rows = (offset, total)`` says that ``X`` holds rows ``offset:offset+B`` of a batch of
    ``total`` points (a point group's slice). Noise is drawn for the whole batch and sliced,
    so a point's samples do not depend on how points are split across groups.

    ``recompute``: keep no chunk's activations or noise for the backward pass; each chunk is
    evaluated again there, its noise regenerated from its seed, so that peak memory is set by
    the chunk size, not by the number of samples (MATH.md section 4, memory).
    """
    space = space or FullSpace(model, X, spec)
    return _grouped_sums(space, spec, [list(chunks)], rows, recompute, weights)[0]


def _grouped_sums(
    space: Space,
    spec: SteinSpec,
    groups: list[list[int]],
    rows: tuple[int, int] | None,
    recompute: bool,
    weights: torch.Tensor | None = None,
) -> list[dict[str, torch.Tensor]]:
    """``partial_sums`` of each group of chunks (one evaluation of g at the points for all);
    a group without chunks gives zeros, so that every rank adds sums of the same shapes."""
    X = space.X
    if recompute and X.device.type == "cpu":
        _bound_cpu_heap()
    rows = rows if rows is not None else (0, X.shape[0])
    trace = _split_weights(weights) if "trace" in spec.needs else None
    g0 = space.center() if spec.antithetic and {"lap", "trace"} & spec.needs else None
    keys = _keys(spec.needs)
    recomputed = recompute and torch.is_grad_enabled()
    if not recomputed and torch.is_grad_enabled() and sum(map(len, groups)) > 1:
        return _fused_sums(space, spec, groups, rows, g0, trace, keys)
    noise = None if recomputed else _noise_in_parallel(space, spec, [c for chunks in groups for c in chunks], rows)
    out = []
    for chunks in groups:
        sums: dict[str, torch.Tensor] = {}
        for c in chunks:
            if recomputed:
                terms = checkpoint(_chunk_terms, space, spec, c, rows, g0, None, trace, use_reentrant=False)
            else:
                terms = _chunk_terms(space, spec, c, rows, g0, None if noise is None else noise.pop(c), trace)
            for key, value in zip(keys, terms, strict=True):
                sums[key] = sums[key] + value if key in sums else value
        if not chunks:
            B = X.shape[0]
            sums = {k: X.new_zeros((B, space.rank) if k == "grad" else (B,)) for k in keys}
        out.append(sums)
    return out


def _fused_sums(
    space: Space,
    spec: SteinSpec,
    groups: list[list[int]],
    rows: tuple[int, int],
    g0: torch.Tensor | None,
    trace: tuple[torch.Tensor, torch.Tensor | None] | None,
    keys: list[str],
) -> list[dict[str, torch.Tensor]]:
    """``_grouped_sums`` with one evaluation of g for all chunks of all groups: their noise
    (each chunk's own, drawn as chunk by chunk) side by side, then each group's sums over its
    columns. Where the backward pass keeps every chunk's activations anyway (gradients on, no
    recomputation) this is the same memory in a few large operations instead of many small
    ones; the sums over a group's samples are formed in one pass instead of chunk by chunk,
    which changes their rounding only (docs/MATH.md section 12)."""
    every = [c for chunks in groups for c in chunks]
    noise = _noise_in_parallel(space, spec, every, rows) or {c: _chunk_noise(space, spec, c, rows) for c in every}
    z = torch.cat([noise[c][0] for c in every], 1)
    aux = None if noise[every[0]][1] is None else torch.cat([noise[c][1] for c in every], 1)
    g_plus, g_minus = space.values(z, spec.antithetic, aux)
    n, out, at = spec.terms_per_chunk, [], 0
    for chunks in groups:
        if not chunks:
            B = space.X.shape[0]
            out.append({k: space.X.new_zeros((B, space.rank) if k == "grad" else (B,)) for k in keys})
            continue
        cols = slice(at * n, (at + len(chunks)) * n)
        at += len(chunks)
        part = (z, aux, g_plus, g_minus) if len(chunks) == len(every) else tuple(
            None if t is None else t[:, cols] for t in (z, aux, g_plus, g_minus))  # fmt: skip
        out.append(dict(zip(keys, _sums_of(space, spec, *part, g0, trace), strict=True)))
    return out


def _split_weights(weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The trace's weights (B, d) as their mean per point (B, 1) and the deviations from it
    (None where every coordinate has the same weight): ``sum_j w_j d_jj = mean lap +
    sum_j (w_j - mean) d_jj``, the first from the Laplacian's weight, the rest from Stein's
    weight on the deviations only (docs/MATH.md section 15)."""
    if weights is None:
        return None
    if weights.dim() != 2:
        raise ValueError(f"trace weights must have shape (B, d) or (B, 1), got {tuple(weights.shape)}")
    mean = weights.mean(1, keepdim=True)
    return mean, (weights - mean if weights.shape[1] > 1 else None)


def finalize(
    sums: dict[str, torch.Tensor], spec: SteinSpec, space: Space, directions: torch.Tensor | None = None
) -> Derivatives:
    """Turn summed terms (over ALL samples of the estimate) into derivatives; ``space`` maps
    gradient coordinates to R^d (the subspace estimator's basis; identity in full space) and
    takes their inner products with ``directions`` (``along``)."""
    n = spec.terms
    sx, st = spec.sigma_x, spec.sigma_t
    out = Derivatives()
    if "u" in spec.needs:
        out.u = sums["value"] / n
    if "u_t" in spec.needs:
        out.u_t = sums["time"] / (n * st)  # type: ignore[operator]
    if "grad" in spec.needs:
        out.grad = space.spatial(sums["grad"] / (n * sx))
    if "grad_sq" in spec.needs:
        total = sums["grad"]
        out.grad_sq = ((total * total).sum(-1) - sums["grad_norms"]) / (n * (n - 1) * sx * sx)
    if "lap" in spec.needs:
        out.lap = sums["lap"] / (n * sx * sx)
    if "trace" in spec.needs:
        out.trace = sums["trace"] / (n * sx * sx)
    if "along" in spec.needs:
        if directions is None:
            raise ValueError("needs 'along' but no directions were given")
        out.along = space.along(sums["grad"] / (n * sx), directions)
    return out


def stein_estimate(
    model: torch.nn.Module,
    X: torch.Tensor,
    spec: SteinSpec,
    space: Space,
    chunks: Iterable[int] | None = None,
    reduce: Reducer | None = None,
    rows: tuple[int, int] | None = None,
    recompute: bool = False,
    directions: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> Derivatives:
    """Partial sums over ``chunks`` (all by default) in ``space``, summed by ``reduce``, then
    finalized. The dispatcher (``dstein.estimators``) picks the space."""
    if "grad_sq" in spec.needs and spec.terms < 2:
        raise ValueError("grad_sq needs at least 2 samples (pairs) for its U-statistic")
    chunks = range(spec.num_chunks) if chunks is None else chunks
    (sums,) = _grouped_sums(space, spec, [list(chunks)], rows, recompute, weights)
    if reduce is not None:
        sums = reduce(sums)
    return finalize(sums, spec, space, directions)


def stein_estimate_halves(
    model: torch.nn.Module,
    X: torch.Tensor,
    spec: SteinSpec,
    space: Space,
    chunks: Iterable[int] | None = None,
    reduce: Reducer | None = None,
    rows: tuple[int, int] | None = None,
    recompute: bool = False,
    directions: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[Derivatives, Derivatives]:
    """Two independent estimates from the two halves of the noise chunks (chunks below
    ``num_chunks // 2``, and the rest): whole chunks, so that sharding and the world-size
    invariance hold for each half. Their product is an unbiased estimate of the product of
    the derivatives (the unbiased residual loss)."""
    if spec.num_chunks < 2:
        raise ValueError(
            f"estimator.samples={spec.samples} in chunks of {spec.chunk} is one noise chunk: two independent "
            "estimates need at least two (lower estimator.chunk)"
        )
    half = spec.num_chunks // 2
    specs = [dataclasses.replace(spec, samples=half * spec.chunk),
             dataclasses.replace(spec, samples=(spec.num_chunks - half) * spec.chunk)]  # fmt: skip
    if "grad_sq" in spec.needs and min(h.terms for h in specs) < 2:
        raise ValueError("grad_sq needs at least 2 samples (pairs) in each half for its U-statistic")
    mine = list(range(spec.num_chunks) if chunks is None else chunks)
    groups = [[c for c in mine if c < half], [c for c in mine if c >= half]]
    first, second = _grouped_sums(space, spec, groups, rows, recompute, weights)
    if reduce is not None:
        both = reduce({**{f"0.{k}": v for k, v in first.items()}, **{f"1.{k}": v for k, v in second.items()}})
        first = {k: both[f"0.{k}"] for k in first}
        second = {k: both[f"1.{k}"] for k in second}
    return finalize(first, specs[0], space, directions), finalize(second, specs[1], space, directions)
