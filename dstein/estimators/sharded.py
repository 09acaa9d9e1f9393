"""Where ranks share the samples: the configured estimator as the trainer calls it.

MATH.md section 4. The ``size`` ranks of a sample group estimate the derivatives at the SAME
collocation points. The ``S`` Monte Carlo samples of an estimate come in fixed-size noise
chunks, each drawn from a generator keyed by ``(seed, step, stream, chunk)``; whole chunks
are dealt to the ranks (``deal_chunks``), never re-drawn, so 1, 2 or 3 ranks evaluate
exactly the same samples. Rank ``r`` forms the partial sums ``P_r = sum_{s in S_r} w_s g_s``
of every estimator (value, time derivative, gradient or its subspace coordinates, the
Laplacian, the squared per-sample gradient norms of the U-statistic); one all-reduce (sum)
over the group gives every rank the full sums, and every rank then computes the same
derivatives, residual and loss ``L``.

The parameter gradient is

    dL/dtheta = sum_r sum_{s in S_r} (dL/dE) (w_s / S) dg_s/dtheta,

so the all-reduce's backward is the identity (every rank already holds the same dL/dE) and
each rank's local backward yields its own share: the shares must be SUMMED over the group.
DeepSpeed AVERAGES gradients over all ``world_size`` ranks, hence ``loss_scale``: a rank
back-propagates ``world_size / shares`` times its loss, ``shares`` being the ranks that hold
the same full gradient (1 when the samples are sharded; the sample group's size for the
network methods, which every rank of the group computes whole).

Differentiated with respect to the points (adversarial steps), a rank's gradient through the
sharded estimates is again its share, but the residual's and the condition targets' own
dependence on the points is computed whole on every rank: ``Shard.direct`` gives that path
the weight ``1 / size`` so that the sum over the group counts it once.

Memory: chunks may be evaluated again in the backward pass instead of keeping their
activations (``estimator.recompute``; ``recomputes`` decides for ``auto``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from dstein.distributed import ranks_on_this_node, sum_in_place, sum_values
from dstein.errors import ConfigError
from dstein.estimators import NETWORK_METHODS, PAIRED_METHODS, Derivatives, estimate, make_space, make_spec
from dstein.estimators.autograd import hutchinson_estimate
from dstein.estimators.base import SteinSpec
from dstein.estimators.constraint import OutputTransform
from dstein.estimators.stein import stein_estimate, stein_estimate_halves
from dstein.noise import default_chunk, split_evenly

# estimator.recompute=auto recomputes chunks when the kept activations of one estimate would
# exceed this share of the memory a rank has (the device's on CUDA; on a CPU the available
# memory shared by the node's ranks). A loss holds one estimate per point set (domain and
# each condition), and the estimate below was 1.2x short of the measured memory (HJB
# d = 10,000, antithetic, 2048 samples: 4.7 GB estimated per estimate, 11.5 GB for both).
# Recomputing costs 1.6x to 4x the step time on this CPU (docs/benchmarks.md), so memory
# that is there is used.
RECOMPUTE_MEMORY_SHARE = 0.15


def deal_chunks(num_chunks: int, rank: int, world: int) -> range:
    """The contiguous range of chunk indices that ``rank`` of a sample group of ``world`` evaluates.

    Chunks are dealt as evenly as possible; every rank must get at least one chunk.
    """
    if world > num_chunks:
        raise ValueError(
            f"{num_chunks} noise chunks cannot be dealt to {world} ranks: each rank of a sample "
            "group needs at least one chunk (lower estimator.chunk or raise estimator.samples)"
        )
    return range(*split_evenly(num_chunks, rank, world))


class _AllReduceSum(torch.autograd.Function):
    """Sum across a group in the forward pass; identity in the backward pass (see the module
    docstring: every rank already holds the full dL/d(sum) and keeps its own share)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        return sum_in_place(tensor.clone(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


@dataclass(frozen=True)
class Shard:
    """This rank's share of the samples: rank ``rank`` of the ``size`` ranks of a sample group
    that split every estimate's noise chunks (``size`` 1: this rank evaluates all of them)."""

    rank: int = 0
    size: int = 1
    group: Any = None

    def chunks(self, num_chunks: int) -> range:
        return deal_chunks(num_chunks, self.rank, self.size)

    def reduce(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The partial sums of all ranks added, in one all-reduce of all of them packed together."""
        if self.size == 1:
            return sums
        keys = sorted(sums)
        shapes = [sums[k].shape for k in keys]
        flat = _AllReduceSum.apply(torch.cat([sums[k].reshape(-1) for k in keys]), self.group)
        out, at = {}, 0
        for k, shape in zip(keys, shapes, strict=True):
            n = shape.numel()
            out[k] = flat[at : at + n].reshape(shape)
            at += n
        return out

    def sum_shares(self, values: torch.Tensor) -> torch.Tensor:
        """This rank's share of a gradient with respect to the points, summed over the group
        (not differentiable: the adversarial steps only take its sign)."""
        return sum_values(values, self.group) if self.size > 1 else values

    def direct(self, X: torch.Tensor) -> torch.Tensor:
        """``X`` with its gradient scaled by 1 / size (the same values)."""
        if self.size == 1 or not X.requires_grad:
            return X
        return X.detach() + (X - X.detach()) / self.size


@functools.cache
def rank_memory_bytes(device: torch.device) -> int:
    """Memory one rank may count on: the CUDA device's total, or the node's available memory
    divided by its ranks (``ranks_on_this_node``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as fh:
            fields = dict(line.split(":", 1) for line in fh)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    return available // ranks_on_this_node()


@functools.cache
def _spec(
    method: str, needs: frozenset[str], samples: int, chunk: int, sigma_x: float, sigma_t: float | None, seed: int,
    laplacian: str,
) -> SteinSpec:  # fmt: skip
    return make_spec(method, needs, samples=samples, sigma_x=sigma_x, sigma_t=sigma_t, seed=seed, chunk=chunk,
                     laplacian=laplacian)  # fmt: skip


@dataclass
class Estimator:
    """The configured derivative estimator, as the trainer calls it: ``shard`` says which
    noise chunks this rank evaluates and whose partial sums it adds to its own;
    ``transform``, the PDE's hard constraint ``u = A + B f`` (model.hard_constraint): the
    estimates are then of u, made from those of the network's f."""

    method: str
    samples: int
    sigma_x: float
    sigma_t: float | None
    seed: int
    chunk: int | None = None
    condition_samples: int | None = None
    recompute: str = "never"
    shard: Shard = Shard()
    laplacian: str = "stein"
    transform: Callable[[torch.Tensor], OutputTransform | None] | None = None
    #: The PDE's own directions (B, m, d) for ``along`` and weights (B, d) for ``trace`` at
    #: points X (``PDE.coefficients``); None: the PDE needs neither.
    coefficients: Callable[[torch.Tensor], tuple[torch.Tensor | None, torch.Tensor | None]] | None = None

    def chunk_for(self, samples: int) -> int:
        """The configured chunk for the training samples, else the default for ``samples``."""
        if samples == self.samples and self.chunk:
            return self.chunk
        return default_chunk(samples, paired=self.method in PAIRED_METHODS)

    def spec(self, needs: Iterable[str], samples: int) -> SteinSpec:
        """The Stein estimate of ``needs`` with ``samples``, checked once (then cached): its
        arguments, and that every rank of the sample group gets a noise chunk."""
        spec = _spec(self.method, frozenset(needs), samples, self.chunk_for(samples), self.sigma_x, self.sigma_t,
                     self.seed, self.laplacian)  # fmt: skip
        if spec.num_chunks < self.shard.size:
            raise ConfigError(
                f"estimator.samples={samples} in chunks of {spec.chunk} gives {spec.num_chunks} noise chunks, "
                f"fewer than the {self.shard.size} ranks of a sample group (each needs one): lower "
                "estimator.chunk, raise estimator.samples, or set parallel.sample_group_size"
            )
        return spec

    def __call__(
        self,
        model: torch.nn.Module,
        X: torch.Tensor,
        needs: frozenset[str],
        *,
        step: int,
        stream: int,
        samples: int | None = None,
        rows: tuple[int, int] | None = None,
        cache: dict | None = None,
    ) -> Derivatives:
        """Derivatives at this point group's rows ``rows`` of the batch, with the noise of
        ``(step, stream)``; ``cache`` is shared by the estimates of one loss."""
        (D,) = self._estimates(model, X, needs, step, stream, samples, rows, cache, halves=False)
        return D

    def pair(
        self,
        model: torch.nn.Module,
        X: torch.Tensor,
        needs: frozenset[str],
        *,
        step: int,
        stream: int,
        samples: int | None = None,
        rows: tuple[int, int] | None = None,
        cache: dict | None = None,
    ) -> tuple[Derivatives, Derivatives]:
        """Two independent estimates, from the two halves of the samples (whole chunks:
        sharded and world-size invariant like one estimate); exact methods give the same twice."""
        first, second = self._estimates(model, X, needs, step, stream, samples, rows, cache, halves=True)
        return first, second

    def _estimates(
        self,
        model: torch.nn.Module,
        X: torch.Tensor,
        needs: frozenset[str],
        step: int,
        stream: int,
        samples: int | None,
        rows: tuple[int, int] | None,
        cache: dict | None,
        halves: bool,
    ) -> tuple[Derivatives, ...]:
        # A, B and their derivatives depend on the points directly, as the residual does; so do
        # the PDE's own directions and weights
        direct = self.shard.direct(X)
        own, weights = self.coefficients(direct) if self.coefficients is not None else (None, None)
        transform = self.transform(direct) if self.transform is not None else None
        if transform is None:
            return self._of_network(model, X, needs, step, stream, samples, rows, cache, halves, own, weights)
        directions = transform.directions(needs, own, weights)
        of_f = self._of_network(
            model, X, transform.needs_of_f(needs, own), step, stream, samples, rows, cache, halves,
            torch.stack(directions, 1) if directions else None, weights,
        )  # fmt: skip
        return tuple(transform.apply(D, needs, own, weights) for D in of_f)

    def _of_network(
        self,
        model: torch.nn.Module,
        X: torch.Tensor,
        needs: frozenset[str],
        step: int,
        stream: int,
        samples: int | None,
        rows: tuple[int, int] | None,
        cache: dict | None,
        halves: bool,
        directions: torch.Tensor | None,
        weights: torch.Tensor | None = None,
    ) -> tuple[Derivatives, ...]:
        """The derivatives of the (smoothed) network itself: one estimate, or two (``halves``)."""
        samples = samples or self.samples
        if self.method == "hutchinson" and halves:
            return hutchinson_estimate(
                model,
                X,
                needs,
                self.sigma_t is not None,
                samples,
                self.seed,
                step,
                stream,
                directions,
                halves=True,
                weights=weights,
            )  # type: ignore[return-value]
        if self.method in NETWORK_METHODS:
            D = estimate(
                model, X, method=self.method, needs=needs, samples=samples, sigma_t=self.sigma_t, seed=self.seed,
                step=step, stream=stream, directions=directions, weights=weights,
            )  # fmt: skip
            return (D, D) if halves else (D,)
        spec = self.spec(needs, samples).at(step, stream)
        space = make_space(model, X, spec, cache, self.shard.size)
        chunks = self.shard.chunks(spec.num_chunks)
        recompute = self.recomputes(model, X, len(chunks) * spec.chunk, space.width)
        reduce = self.shard.reduce if self.shard.size > 1 else None
        run = stein_estimate_halves if halves else stein_estimate
        out = run(model, X, spec, space, chunks=chunks, reduce=reduce, rows=rows, recompute=recompute,
                  directions=directions, weights=weights)  # fmt: skip
        return out if isinstance(out, tuple) else (out,)

    def recomputes(self, model: torch.nn.Module, X: torch.Tensor, samples: int, width: int | None = None) -> bool:
        """Whether chunks are evaluated again in the backward pass (``estimator.recompute``);
        ``width``: the columns of the noise (the space's; default all of X's)."""
        if self.recompute != "auto":
            return self.recompute == "always"
        widths = sum(m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
        noise = X.shape[1] if width is None else width
        kept = X.shape[0] * samples * (3 * widths + noise) * X.element_size()  # activations, noise
        return kept > RECOMPUTE_MEMORY_SHARE * rank_memory_bytes(X.device)

    def loss_scale(self, world_size: int, sample_group_size: int) -> float:
        """What a rank multiplies its loss by before DeepSpeed's backward (which averages over
        ``world_size`` ranks) so that the result is the sum of the distinct shares."""
        shares = sample_group_size // self.shard.size  # ranks holding the same full gradient
        return world_size / shares
