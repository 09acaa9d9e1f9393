"""The training loop: build, step, evaluate, log. No launcher logic lives here.

One step, as data: collocation points from ``(seed, step)`` (every rank draws the full batch
and keeps its point group's rows) -> optional adversarial moves -> derivative estimates
(the ``Estimator``: this rank's noise chunks, partial sums, one all-reduce in the sample
group) -> PDE residual and condition losses -> DeepSpeed backward and step, the learning
rate a pure function of the step -> metrics on rank 0.

Gradient scaling (MATH.md section 4). The loss is ``L = sum_p L_p`` where ``L_p`` sums the
point group's squared residuals divided by the GLOBAL point counts. A rank's local backward of
``L_p`` gives its share of the gradient (the all-reduce's backward is the identity), and the
full gradient is the SUM of the shares over all ranks. DeepSpeed AVERAGES gradients over
its data-parallel ranks, so each rank back-propagates ``world_size * L_p``.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import dstein
from dstein.config import Config, ConfigError, to_yaml
from dstein.data import H5Collocation, read_test_set, validate
from dstein.distributed import (
    DistInfo,
    DistributedError,
    describe_failure,
    init_distributed,
    ranks_on_this_node,
    sum_partial_sums,
    sum_values,
)
from dstein.estimators import NETWORK_METHODS, PAIRED_METHODS, STEIN_METHODS, Derivatives, estimate
from dstein.estimators.stein import Reducer
from dstein.metrics import MetricsLog, error_sums, errors_from_sums, write_json_atomic
from dstein.models import MLP
from dstein.noise import counter_seed, deal_chunks, default_chunk, num_chunks, split_evenly
from dstein.pdes import PDE, TestSet, build_pde

# Noise streams: each use of the estimator within a step draws from its own stream.
DOMAIN_STREAM = 0
CONDITION_STREAM = 1  # + index of the condition
ATTACK_STREAM = 100  # + 10 * attack step + (0: domain, 1 + k: condition k)
EVAL_STREAM = 1_000_000
# Counter of the collocation point generator (separate from the noise counters).
POINTS_STREAM = 7
# Training points are drawn in float32 (the training precision), then converted where a
# caller wants another type (the HDF5 writer stores them as float64, same values): drawing
# 10^7 normals in float64 costs four times as much (250 vs 60 ms, HJB d = 100,000, 100 points).
POINTS_DTYPE = torch.float32
# estimator.recompute=auto recomputes chunks when the kept activations of one estimate would
# exceed this share of the memory a rank has (the device's on CUDA; on a CPU the available
# memory shared by the node's ranks). A loss holds one estimate per point set (domain and
# each condition), and the estimate below was 1.2x short of the measured memory (HJB
# d = 10,000, antithetic, 2048 samples: 4.7 GB estimated per estimate, 11.5 GB for both).
# Recomputing costs 1.6x to 4x the step time on this CPU (docs/benchmarks.md), so memory
# that is there is used.
RECOMPUTE_MEMORY_SHARE = 0.15


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


# Test points are evaluated in blocks of this size; a block's noise is keyed by its index.
EVAL_BLOCK = 64


@dataclass
class Estimator:
    """The configured derivative estimator, as the trainer calls it.

    ``chunks_for(num_chunks)`` picks the noise chunks this rank evaluates and ``reduce``
    sums partial sums across the sample group; in one process they are all chunks and None.
    """

    method: str
    samples: int
    sigma_x: float
    sigma_t: float | None
    seed: int
    chunk: int | None = None
    condition_samples: int | None = None
    recompute: str = "never"
    chunks_for: Callable[[int], range] | None = None
    reduce: Reducer | None = None
    shards: int = 1
    """Ranks that share the samples of an estimate (its sample group), 1 when unsharded."""

    def chunk_for(self, samples: int) -> int:
        """The configured chunk for the training samples, else the default for ``samples``."""
        if samples == self.samples and self.chunk:
            return self.chunk
        return default_chunk(samples, paired=self.method in PAIRED_METHODS)

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
        samples = samples or self.samples
        if self.method in NETWORK_METHODS:
            return estimate(
                model, X, method=self.method, needs=needs, samples=samples, sigma_t=self.sigma_t, seed=self.seed,
                step=step, stream=stream,
            )  # fmt: skip
        chunk = self.chunk_for(samples)
        chunks = self.chunks_for(num_chunks(samples, chunk)) if self.chunks_for else None
        mine = len(chunks) * chunk if chunks is not None else samples
        return estimate(
            model, X, method=self.method, needs=needs, samples=samples, sigma_x=self.sigma_x,
            sigma_t=self.sigma_t, seed=self.seed, step=step, stream=stream, chunk=chunk,
            chunks=chunks, reduce=self.reduce, rows=rows, recompute=self.recomputes(model, X, mine), cache=cache,
        )  # fmt: skip

    def recomputes(self, model: torch.nn.Module, X: torch.Tensor, samples: int) -> bool:
        """Whether chunks are evaluated again in the backward pass (``estimator.recompute``)."""
        if self.recompute != "auto":
            return self.recompute == "always"
        layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        widths = sum(m.out_features for m in layers)
        noise = X.shape[1] if self.method != "stein-subspace" else layers[0].out_features + 1
        kept = X.shape[0] * samples * (3 * widths + noise) * X.element_size()  # activations, noise
        return kept > RECOMPUTE_MEMORY_SHARE * rank_memory_bytes(X.device)


def lr_factor(step: int, total: int) -> float:
    """Linear decay from 1 at step 0 to 0 after the last step (a pure function of the step)."""
    return max(0.0, 1.0 - step / total)


@dataclass(frozen=True)
class Batch:
    """This point group's rows of one kind of points: ``X[start:start+len]`` of ``total``."""

    X: torch.Tensor
    start: int
    total: int

    @property
    def rows(self) -> tuple[int, int]:
        return (self.start, self.total)

    def with_points(self, X: torch.Tensor) -> Batch:
        return Batch(X, self.start, self.total)


def collocation(
    pde: PDE, config: Config, step: int, dtype: torch.dtype, device: torch.device, part: int = 0, parts: int = 1
) -> dict[str, Batch]:
    """The step's points (``domain`` and one set per condition) from ``(seed, step)`` alone;
    point group ``part`` of ``parts`` keeps its rows of each set."""
    gen = torch.Generator().manual_seed(counter_seed(config.seed, step, POINTS_STREAM))
    counts = pde.point_counts(config.train.domain_points, config.train.condition_points)
    points = {kind: pde.training_points(kind, n, gen, POINTS_DTYPE) for kind, n in counts.items()}
    out = {}
    for kind, X in points.items():
        start, stop = split_evenly(X.shape[0], part, parts)
        out[kind] = Batch(X[start:stop].to(device=device, dtype=dtype), start, X.shape[0])
    return out


def loss_terms(
    model: torch.nn.Module,
    pde: PDE,
    estimator: Estimator,
    points: dict[str, Batch],
    step: int,
    stream_base: int = 0,
    samples: int | None = None,
) -> dict[str, torch.Tensor]:
    """Squared PDE residual (``residual``) and condition misfits (one per condition), each
    summed over this point group's points and divided by the step's total count.
    ``samples``: for the domain points, instead of the estimator's.

    Differentiated with respect to the points (adversarial steps) on the ranks of a sample
    group, each rank's gradient through the sharded estimates is its share, while the
    residual's and the targets' own dependence on the points is computed whole on every
    rank: that path enters with weight 1 / shards, so that the sum over the group counts it
    once (values are unchanged)."""
    dom = points["domain"]
    cache: dict = {}  # the estimates of this loss share what depends only on the weights
    D = estimator(
        model, dom.X, pde.needs, step=step, stream=stream_base + DOMAIN_STREAM, rows=dom.rows, samples=samples,
        cache=cache,
    )  # fmt: skip
    res = pde.residual(_direct(dom.X, estimator.shards), D)
    terms = {"residual": (res * res).sum() / dom.total}
    for k, kind in enumerate(pde.conditions):
        batch = points[kind]
        u = estimator(
            model, batch.X, frozenset({"u"}), step=step, stream=stream_base + CONDITION_STREAM + k,
            samples=estimator.condition_samples, rows=batch.rows, cache=cache,
        ).require("u")  # fmt: skip
        diff = u - pde.condition_target(kind, _direct(batch.X, estimator.shards))
        terms[kind] = (diff * diff).sum() / batch.total
    return terms


def _direct(X: torch.Tensor, shards: int) -> torch.Tensor:
    """``X`` with its gradient scaled by 1 / shards (the same values)."""
    if shards == 1 or not X.requires_grad:
        return X
    return X.detach() + (X - X.detach()) / shards


def total_loss(terms: dict[str, torch.Tensor], condition_weight: float) -> torch.Tensor:
    return sum((v if k == "residual" else condition_weight * v) for k, v in terms.items())  # type: ignore[return-value]


def adversarial_points(
    model: torch.nn.Module,
    pde: PDE,
    estimator: Estimator,
    points: dict[str, Batch],
    config: Config,
    step: int,
    sample_group: Any = None,
) -> dict[str, Batch]:
    """Signed-gradient ascent of the loss on the points, projected back onto their sets.

    In a sample group each rank holds a share of the gradient with respect to the points;
    the shares are summed so that every rank moves the points alike.
    """
    adv = config.train.adversarial
    for j in range(adv.steps):
        moving = {k: b.X.detach().requires_grad_(True) for k, b in points.items()}
        batches = {k: points[k].with_points(X) for k, X in moving.items()}
        terms = loss_terms(model, pde, estimator, batches, step, ATTACK_STREAM + 10 * j, adv.samples)
        loss = total_loss(terms, config.train.condition_weight)
        grads = torch.autograd.grad(loss, list(moving.values()))
        moved = {}
        for (kind, X), g in zip(moving.items(), grads, strict=True):
            g = sum_values(g, sample_group)
            X = X.detach() + adv.step_size * g.sign()
            moved[kind] = points[kind].with_points(
                pde.project(X) if kind == "domain" else pde.project_condition(kind, X)
            )
        points = moved
    return points


def predict(
    model: torch.nn.Module, X: torch.Tensor, config: Config, first_block: int = 0, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained solution and its spatial gradient at test points (blocks of EVAL_BLOCK).

    Autograd: the network itself. Stein methods: the smoothed model, its value averaged over
    ``eval.samples`` perturbations and its gradient by differentiating that average with
    respect to the points (pathwise, far less noisy than the Stein gradient; this is
    evaluation, not training). Block ``b``'s noise is keyed by ``first_block + b``.
    ``progress`` shows a bar over the blocks (on standard error).
    """
    from tqdm import tqdm

    d = config.pde.dim
    us, grads = [], []
    stein = config.estimator.method in STEIN_METHODS
    n = config.eval.samples
    scale = torch.full((X.shape[1],), config.estimator.sigma_x, dtype=X.dtype, device=X.device)
    if X.shape[1] > d:
        scale[d] = config.estimator.time_sigma
    starts = range(0, X.shape[0], EVAL_BLOCK)
    for b, lo in enumerate(tqdm(starts, desc="evaluating", unit="block", disable=not progress, leave=False)):
        Xb = X[lo : lo + EVAL_BLOCK].detach().requires_grad_(True)
        if stein:
            key = counter_seed(config.seed, EVAL_STREAM, first_block + b)
            gen = torch.Generator(device=X.device).manual_seed(key)
            z = torch.randn((Xb.shape[0], n, Xb.shape[1]), generator=gen, dtype=X.dtype, device=X.device)
            Y = (Xb.unsqueeze(1) + z * scale).reshape(-1, Xb.shape[1])
            u = model(Y).reshape(Xb.shape[0], n).mean(1)
        else:
            u = model(Xb).reshape(-1)
        (g,) = torch.autograd.grad(u.sum(), Xb)
        us.append(u.detach())
        grads.append(g[:, :d].detach())
    return torch.cat(us), torch.cat(grads)


def evaluate(tr: Trainer) -> dict[str, float]:
    """Errors on the test set; its blocks are dealt to all ranks and the error sums added."""
    n = tr.test.X.shape[0]
    blocks = math.ceil(n / EVAL_BLOCK)
    first, last = split_evenly(blocks, tr.info.rank, tr.info.world_size)
    lo, hi = first * EVAL_BLOCK, min(n, last * EVAL_BLOCK)
    sums = torch.zeros(6, dtype=torch.float64, device=tr.device)
    if hi > lo:
        X = tr.test.X[lo:hi].to(device=tr.device, dtype=tr.dtype)
        u, grad = predict(tr.model, X, tr.config, first_block=first)
        sums = error_sums(u, grad, tr.test.u[lo:hi], tr.test.grad[lo:hi]).to(tr.device)
    return errors_from_sums(sum_values(sums).cpu())


@dataclass
class Trainer:
    """Everything a run holds; built once by ``build_trainer``."""

    config: Config
    info: DistInfo
    pde: PDE
    engine: Any  # deepspeed.DeepSpeedEngine: owns the model and optimizer state
    estimator: Estimator
    test: TestSet
    device: torch.device
    dtype: torch.dtype
    run_dir: Path
    reader: H5Collocation | None = None
    watch: GradientWatch | None = None

    def points(self, step: int) -> dict[str, Batch]:
        """This point group's training points of ``step``: from the file or the online sampler."""
        info = self.info
        if self.reader is None:
            return collocation(
                self.pde, self.config, step, self.dtype, self.device, info.point_group, info.num_point_groups
            )
        out = {}
        for kind in self.reader.batch:
            X, start, total = self.reader.read(kind, step)
            out[kind] = Batch(torch.from_numpy(X).to(device=self.device, dtype=self.dtype), start, total)
        return out

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer


def build_model(config: Config, pde: PDE, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(counter_seed(config.seed, 0x4D4F44454C))  # same initial weights on every rank
    model = MLP(pde.in_dim, config.model.width, config.model.depth, config.model.activation)
    return model.to(device=device, dtype=dtype)


def build_estimator(config: Config, pde: PDE, info: DistInfo | None = None) -> Estimator:
    """The configured estimator; with ``info``, sharded over this rank's sample group."""
    est = config.estimator
    estimator = Estimator(
        method=est.method, samples=est.samples, sigma_x=est.sigma_x,
        sigma_t=est.time_sigma if pde.time_dependent else None, seed=config.seed,
        chunk=est.chunk, condition_samples=est.condition_samples, recompute=est.recompute,
    )  # fmt: skip
    if info is not None and info.sample_group_size > 1 and est.method in STEIN_METHODS:
        rank, size = info.sample_rank, info.sample_group_size
        estimator.chunks_for = lambda n: deal_chunks(n, rank, size)
        estimator.reduce = sum_partial_sums(info.sample_group)
        estimator.shards = size
        attack = config.train.adversarial.samples if config.train.adversarial.steps else None
        for samples in {est.samples, est.condition_samples or est.samples, attack or est.samples}:  # before any work
            chunk = estimator.chunk_for(samples)
            if num_chunks(samples, chunk) < size:
                raise ConfigError(
                    f"estimator.samples={samples} in chunks of {chunk} gives {num_chunks(samples, chunk)} noise "
                    f"chunks, fewer than the {size} ranks of a sample group (each needs one): lower "
                    "estimator.chunk, raise estimator.samples, or set parallel.sample_group_size"
                )
    return estimator


def deepspeed_config(config: Config, world_size: int) -> dict[str, Any]:
    ds = config.deepspeed
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "zero_optimization": {"stage": ds.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    if ds.optimizer == "deepspeed":
        out["optimizer"] = {"type": "Adam", "params": {"lr": config.train.lr, "torch_adam": True}}
    out.update(dict(ds.extra))
    return out


def check_estimator_fits(config: Config, pde: PDE, dtype: torch.dtype) -> None:
    """Refuse a method that cannot give what the PDE needs, and a precision too coarse for
    sigma_x (judged as on a GPU, so that a config behaves alike on every device)."""
    from dstein.estimators import provides
    from dstein.estimators.stein import precision_problem

    method = config.estimator.method
    missing = pde.needs - provides(method)
    if missing:
        raise ConfigError(
            f"pde {pde.name} needs {sorted(missing)}, which estimator.method={method} cannot give "
            f"(it gives {sorted(provides(method))})"
        )
    if method in STEIN_METHODS:
        problem = precision_problem(config.estimator.sigma_x, dtype, config.run.matmul_precision, True, pde.needs)
        if problem:
            raise ConfigError(f"run.matmul_precision={config.run.matmul_precision}: {problem}")


def build_trainer(config: Config, info: DistInfo | None = None) -> Trainer:
    """Join the ranks, build PDE, model, DeepSpeed engine, estimator and test set."""
    import deepspeed

    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    if info is None:
        par = config.parallel
        info = init_distributed(par.sample_group_size, par.world_size, par.timeout_s, config.run.device)
    if info.world_size % info.sample_group_size:
        raise DistributedError("sample group size does not divide the world size")
    if config.train.domain_points < info.num_point_groups:
        raise DistributedError(
            f"train.domain_points={config.train.domain_points} is fewer than the "
            f"{info.num_point_groups} point groups: every point group needs points"
        )
    device, dtype = info.device, getattr(torch, config.run.dtype)
    pde = build_pde(config.pde.name, config.pde.dim, dict(config.pde.params), config.pde.target)
    check_estimator_fits(config, pde, dtype)
    if device.type == "cuda":  # TF32/bf16 products only where sigma allows (checked above)
        torch.set_float32_matmul_precision(config.run.matmul_precision)
        torch.backends.cudnn.allow_tf32 = config.run.matmul_precision != "highest"
    estimator = build_estimator(config, pde, info)
    model = build_model(config, pde, dtype, device)
    optimizer = (
        None if config.deepspeed.optimizer == "deepspeed" else torch.optim.Adam(model.parameters(), lr=config.train.lr)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=model.parameters(),
        config=deepspeed_config(config, info.world_size), dist_init_required=False,
    )  # fmt: skip
    reader, test = open_data(config, pde, info)
    return Trainer(config, info, pde, engine, estimator, test, device, dtype, Path(config.run.dir), reader)


def open_data(config: Config, pde: PDE, info: DistInfo) -> tuple[H5Collocation | None, TestSet]:
    """The training-point reader (None: online sampler) and the test set, files validated first."""
    reader = None
    if config.data.train_file:
        kinds = pde.point_counts(config.train.domain_points, config.train.condition_points)
        validate(
            config.data.train_file,
            pde_name=pde.name,
            dim=pde.dim,
            pde_params=pde.params(),
            groups={"train": list(kinds)},
        )
        reader = H5Collocation(
            config.data.train_file, kinds, config.seed, config.data.shuffle, info.point_group, info.num_point_groups
        )
    return reader, load_test_set(config, pde, config.data.test_file)


def load_test_set(config: Config, pde: PDE, test_file: str | None) -> TestSet:
    """The test set from ``test_file`` (validated; its first eval.points rows) or drawn from eval.seed."""
    if not test_file:
        return pde.test_set(config.eval.points, config.eval.seed, config.eval.truth_samples)
    validate(test_file, pde_name=pde.name, dim=pde.dim, pde_params=pde.params(), groups={"test": ["X", "u", "grad"]})
    return read_test_set(test_file, config.eval.points)


@dataclass
class StepResult:
    """The loss terms of the whole step (all point groups) and, when the step was not
    applied, what was not finite: a loss term, or "gradient", and on which ranks."""

    terms: dict[str, float]
    fault: str | None = None
    ranks: tuple[int, ...] = ()


class GradientWatch:
    """Tensor hooks on the parameters that note a non-finite LOCAL gradient, before DeepSpeed
    sums gradients across ranks (after which every rank would see it anyway, or, with ZeRO
    partitions, only some)."""

    def __init__(self, model: torch.nn.Module):
        self.finite: torch.Tensor | None = None  # no host sync per parameter: one after backward
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(self._check)

    def _check(self, grad: torch.Tensor) -> None:
        if not grad.numel():
            return
        # min and max are NaN or infinite exactly when some entry is: one read of the
        # gradient (isfinite().all() makes several, 35 vs 2.4 ms for 12.8M floats on a CPU)
        ok = torch.isfinite(torch.stack(torch.aminmax(grad))).all()
        self.finite = ok if self.finite is None else self.finite & ok

    def reset(self) -> None:
        self.finite = None

    @property
    def bad(self) -> bool:
        return self.finite is not None and not bool(self.finite)


def _ranks_with(flag: bool, info: DistInfo) -> tuple[int, ...]:
    """The ranks on which ``flag`` holds (every rank calls this, with its own flag)."""
    rows = torch.zeros(info.world_size, dtype=torch.float64, device=info.device)
    rows[info.rank] = float(flag)
    return tuple(int(r) for r in torch.nonzero(sum_values(rows)).flatten().tolist())


def train_step(tr: Trainer, step: int) -> StepResult:
    """One optimizer step, applied only if the loss and the gradient are finite on every rank."""
    from dstein.faults import fault_loss

    cfg, info = tr.config, tr.info
    for group in tr.optimizer.param_groups:
        group["lr"] = cfg.train.lr * lr_factor(step, cfg.train.steps)
    points = tr.points(step)
    if cfg.train.adversarial.steps:
        points = adversarial_points(tr.model, tr.pde, tr.estimator, points, cfg, step, info.sample_group)
    terms = fault_loss(loss_terms(tr.model, tr.pde, tr.estimator, points, step), step + 1, info.rank)
    loss = total_loss(terms, cfg.train.condition_weight)
    local = torch.stack([loss.detach(), *(v.detach() for v in terms.values())]).double()
    # each point group's terms are held by its sample_group_size ranks; a NaN anywhere
    # makes every rank's sum NaN, so all ranks take the same branch below
    total = sum_values(local) / info.sample_group_size
    result = StepResult(dict(zip(["loss", *terms], total.tolist(), strict=True)))
    if not bool(torch.isfinite(total).all()):
        bad = {k for k, v in terms.items() if not bool(torch.isfinite(v.detach()).all())}
        for name in terms:  # the first term that is not finite on some rank, and where
            ranks = _ranks_with(name in bad, info)
            if ranks:
                result.fault, result.ranks = name, ranks
                return result
        result.fault, result.ranks = "loss", _ranks_with(not bool(torch.isfinite(local).all()), info)
        return result
    if tr.watch is None:
        tr.watch = GradientWatch(tr.model)
    tr.watch.reset()
    # Stein estimates are sharded: each rank's backward gives its share of the gradient.
    # Network methods are computed whole by every rank of a sample group: count them once.
    shares = info.sample_group_size // tr.estimator.shards  # ranks holding the same full gradient
    tr.engine.backward(loss * (info.world_size / shares))
    ranks = _ranks_with(tr.watch.bad, info)
    if ranks:
        tr.engine.optimizer.zero_grad()  # drop the reduced gradients: this step is not applied
        tr.engine.zero_grad()
        result.fault, result.ranks = "gradient", ranks
        return result
    tr.engine.step()
    return result


def skip_or_stop(
    result: StepResult, done: int, skips: int, cfg: Config, latest: Callable[[], Any], metrics: MetricsLog | None
) -> None:
    """A step that was not applied: report it and go on (train.nonfinite=skip, within
    train.max_skips in a row), or raise ``RunStopped`` naming the step, the term and the ranks."""
    from dstein.checkpoint import RunStopped

    ranks = ", ".join(map(str, result.ranks))
    what = f"non-finite {result.fault} in step {done} on rank{'s' if len(result.ranks) > 1 else ''} {ranks}"
    if cfg.train.nonfinite == "stop" or skips > cfg.train.max_skips:
        why = "train.nonfinite=stop" if cfg.train.nonfinite == "stop" else f"{skips} in a row"
        last = latest()
        raise RunStopped(
            f"{what}: stopped ({why}); the step was not applied and the last complete checkpoint, "
            f"{last if last else '(none yet)'}, is untouched"
        )
    if metrics is not None:
        print(f"warning: {what}: step skipped ({skips} in a row; train.max_skips={cfg.train.max_skips})",
              file=sys.stderr, flush=True)  # fmt: skip
        metrics.write({"step": done, "skipped": result.fault, "ranks": list(result.ranks)})


def client_state(tr: Trainer, done: int, seconds: float) -> dict[str, Any]:
    """What a checkpoint holds besides DeepSpeed's model and optimizer state."""
    return {"data_cursor": tr.reader.cursor(done) if tr.reader is not None else None, "train_seconds": seconds}


def run(config: Config, info: DistInfo | None = None) -> dict[str, Any]:
    """Train as configured, from scratch or from the checkpoint that ``checkpoint.resume``
    selects; write the run directory (rank 0, holding its lock); return the summary.

    Raises ``Preempted`` on every rank after saving, when a rank received a preemption signal;
    ``RunStopped`` on a fault; ``RunDirError`` when the run directory is in use or unwritable.
    """
    from dstein.rundir import lock_on_rank0, release

    if info is None:
        par = config.parallel
        info = init_distributed(par.sample_group_size, par.world_size, par.timeout_s, config.run.device)
    fd, note = lock_on_rank0(Path(config.run.dir), info.rank)
    try:
        return _train(config, info, [note] if note else [])
    finally:
        if fd is not None:
            release(fd)


def _train(config: Config, info: DistInfo, notes: list[str]) -> dict[str, Any]:
    from dstein.checkpoint import Checkpointer, Preempted, Preemption
    from dstein.metrics import Progress, Scalars
    from dstein.report import finish_run

    tr = build_trainer(config, info)
    cfg, writer = tr.config, tr.info.is_writer
    checkpoints = Checkpointer(cfg, tr.info.rank, tr.info.world_size)
    resumed = checkpoints.resume(tr.engine, tr.reader)
    first = resumed.step
    if writer:
        for line in [*notes, *resumed.messages]:
            print(line, flush=True)
        tr.run_dir.mkdir(parents=True, exist_ok=True)
        (tr.run_dir / "config.yaml").write_text(to_yaml(cfg))
    metrics = MetricsLog(tr.run_dir / "metrics.jsonl", enabled=writer, after=first)
    scalars = Scalars(tr.run_dir, enabled=writer, after=first)
    progress = Progress(cfg.train.steps, enabled=writer, every=cfg.train.print_every, initial=first)
    preemption = Preemption(cfg.checkpoint.signal)
    start = time.perf_counter()

    def clock() -> float:  # training time of all starts: `seconds` in metrics runs on across resumes
        return resumed.seconds + time.perf_counter() - start

    errors: dict[str, float] = {}
    skips = 0
    try:
        for step in range(first, cfg.train.steps):
            result = train_step(tr, step)
            terms, done = result.terms, step + 1
            new_errors = None
            if result.fault:
                skips += 1
                skip_or_stop(result, done, skips, cfg, checkpoints.latest, metrics if writer else None)
            else:
                skips = 0
                if done % cfg.train.log_every == 0 or done == cfg.train.steps or step == first:
                    lr = cfg.train.lr * lr_factor(step, cfg.train.steps)
                    seconds = clock()
                    metrics.write({"step": done, **terms, "lr": lr, "seconds": seconds})
                    rate = (done - first) / (seconds - resumed.seconds)  # of this start
                    scalars.add(done, {**terms, "lr": lr, "steps_per_second": rate}, "train")
            if done % cfg.eval.every == 0 or done == cfg.train.steps:
                errors = new_errors = evaluate(tr)
                metrics.write({"step": done, **errors, "seconds": clock()})
                scalars.add(done, errors, "eval")
            progress.update(done, terms, new_errors)
            stop = preemption.agreed()
            if checkpoints.due(done) or stop:
                path = checkpoints.save(tr.engine, done, client_state(tr, done, clock()))
            if stop:
                progress.close()
                raise Preempted(done, path, preemption.received or "a signal on another rank")
        if not errors:  # resumed from the final checkpoint: nothing left to train
            errors = evaluate(tr)
    except RuntimeError as err:
        if tr.info.world_size > 1:
            raise DistributedError(describe_failure(tr.info, err, cfg.parallel.timeout_s)) from err
        raise
    finally:
        preemption.restore()
        progress.close()
        scalars.close()
        metrics.close()
    wall = time.perf_counter() - start
    if writer:
        finish_run(tr.run_dir, tr.model, tr.pde, tr.test, cfg, tr.device, tr.dtype)
    summary = {
        **errors,
        "steps": cfg.train.steps,
        "wall_seconds": wall,  # this start only
        "train_seconds": resumed.seconds + wall,  # all starts of the run together
        "world_size": tr.info.world_size,
        "sample_group_size": tr.info.sample_group_size,
        "method": cfg.estimator.method,
        "dim": cfg.pde.dim,
        "pde": tr.pde.name,
        "dstein_version": dstein.__version__,
        "config_digest": cfg.digest(),
    }
    if tr.test.u_se is not None:
        summary["truth_max_se"] = float(tr.test.u_se.max())
    if writer:
        write_json_atomic(tr.run_dir / "summary.json", summary)
    return summary


__all__ = ["Batch", "Estimator", "Trainer", "build_trainer", "run", "train_step"]

if __name__ == "__main__":  # pragma: no cover - use launch/train.py
    sys.exit("use: python launch/train.py --config configs/NAME.yaml")
