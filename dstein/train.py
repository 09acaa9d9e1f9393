"""The training loop: build, step, evaluate, log. No launcher logic lives here.

One step, as data: collocation points from ``(seed, step)`` -> (optional adversarial
moves) -> derivative estimates (the ``Estimator``: this process's noise chunks, partial sums,
sum across the sample group) -> PDE residual and condition losses -> backward -> Adam step
with a learning rate that is a pure function of the step -> metrics.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import dstein
from dstein.config import Config, to_yaml
from dstein.estimators import Derivatives, estimate
from dstein.estimators.stein import Reducer
from dstein.metrics import MetricsLog, relative_errors, write_json_atomic
from dstein.models import MLP
from dstein.noise import counter_seed, default_chunk, num_chunks
from dstein.pdes import PDE, TestSet, build_pde

# Noise streams: each use of the estimator within a step draws from its own stream.
DOMAIN_STREAM = 0
CONDITION_STREAM = 1  # + index of the condition
ATTACK_STREAM = 100  # + 10 * attack step + (0: domain, 1 + k: condition k)
EVAL_STREAM = 1_000_000
# Stream of the collocation point generator (separate counter space from the noise).
POINTS_STREAM = 7


@dataclass
class Estimator:
    """The configured derivative estimator, as the trainer calls it.

    ``chunks_for(num_chunks)`` picks the noise chunks this process evaluates and ``reduce``
    sums partial sums across the sample group; in one process they are all chunks and the
    identity. ``rows`` places this process's points in the step's batch.
    """

    method: str
    samples: int
    sigma_x: float
    sigma_t: float | None
    seed: int
    chunk: int | None = None
    condition_samples: int | None = None
    chunks_for: Callable[[int], range] | None = None
    reduce: Reducer | None = None

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
    ) -> Derivatives:
        if self.method == "autograd":
            return estimate(model, X, method="autograd", needs=needs, sigma_t=self.sigma_t)
        samples = samples or self.samples
        chunk = self.chunk if samples == self.samples and self.chunk else default_chunk(samples)
        chunks = self.chunks_for(num_chunks(samples, chunk)) if self.chunks_for else None
        return estimate(
            model,
            X,
            method=self.method,
            needs=needs,
            samples=samples,
            sigma_x=self.sigma_x,
            sigma_t=self.sigma_t,
            seed=self.seed,
            step=step,
            stream=stream,
            chunk=chunk,
            chunks=chunks,
            reduce=self.reduce,
            rows=rows,
        )


def lr_factor(step: int, total: int) -> float:
    """Linear decay from 1 at step 0 to 0 after the last step (a pure function of the step)."""
    return max(0.0, 1.0 - step / total)


def collocation(
    pde: PDE, config: Config, step: int, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """The step's points: ``domain`` and one set per condition, from ``(seed, step)`` alone."""
    gen = torch.Generator().manual_seed(counter_seed(config.seed, step, POINTS_STREAM))
    points = {"domain": pde.sample_domain(config.train.domain_points, gen)}
    for kind in pde.conditions:
        points[kind] = pde.sample_condition(kind, config.train.condition_points, gen)
    return {k: v.to(device=device, dtype=dtype) for k, v in points.items()}


def loss_terms(
    model: torch.nn.Module,
    pde: PDE,
    estimator: Estimator,
    points: dict[str, torch.Tensor],
    step: int,
    stream_base: int = 0,
) -> dict[str, torch.Tensor]:
    """Mean squared PDE residual (``residual``) and condition misfits (one per condition)."""
    D = estimator(model, points["domain"], pde.needs, step=step, stream=stream_base + DOMAIN_STREAM)
    res = pde.residual(points["domain"], D)
    terms = {"residual": (res * res).mean()}
    for k, kind in enumerate(pde.conditions):
        X = points[kind]
        u = estimator(
            model,
            X,
            frozenset({"u"}),
            step=step,
            stream=stream_base + CONDITION_STREAM + k,
            samples=estimator.condition_samples,
        ).require("u")
        diff = u - pde.condition_target(kind, X)
        terms[kind] = (diff * diff).mean()
    return terms


def total_loss(terms: dict[str, torch.Tensor], condition_weight: float) -> torch.Tensor:
    return sum((v if k == "residual" else condition_weight * v) for k, v in terms.items())  # type: ignore[return-value]


def adversarial_points(
    model: torch.nn.Module, pde: PDE, estimator: Estimator, points: dict[str, torch.Tensor], config: Config, step: int
) -> dict[str, torch.Tensor]:
    """Signed-gradient ascent of the loss on the points, projected back onto their sets."""
    adv = config.train.adversarial
    for j in range(adv.steps):
        moving = {k: v.detach().requires_grad_(True) for k, v in points.items()}
        terms = loss_terms(model, pde, estimator, moving, step, stream_base=ATTACK_STREAM + 10 * j)
        loss = total_loss(terms, config.train.condition_weight)
        grads = torch.autograd.grad(loss, list(moving.values()))
        moved = {}
        for (kind, X), g in zip(moving.items(), grads, strict=True):
            X = X.detach() + adv.step_size * g.sign()
            moved[kind] = pde.project(X) if kind == "domain" else pde.project_condition(kind, X)
        points = moved
    return {k: v.detach() for k, v in points.items()}


def predict(
    model: torch.nn.Module, X: torch.Tensor, config: Config, block: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained solution and its spatial gradient at test points.

    Autograd: the network itself. Stein methods: the smoothed model, its value averaged over
    ``eval.samples`` perturbations and its gradient by differentiating that average with
    respect to the points (pathwise, far less noisy than the Stein gradient; this is
    evaluation, not training).
    """
    d = config.pde.dim
    us, grads = [], []
    stein = config.estimator.method != "autograd"
    n = config.eval.samples
    for lo in range(0, X.shape[0], block):
        Xb = X[lo : lo + block].detach().requires_grad_(True)
        if stein:
            gen = torch.Generator(device=X.device).manual_seed(counter_seed(config.seed, EVAL_STREAM, lo))
            z = torch.randn((Xb.shape[0], n, Xb.shape[1]), generator=gen, dtype=X.dtype, device=X.device)
            scale = torch.full((Xb.shape[1],), config.estimator.sigma_x, dtype=X.dtype, device=X.device)
            if Xb.shape[1] > d:
                scale[d] = config.estimator.time_sigma
            Y = (Xb.unsqueeze(1) + z * scale).reshape(-1, Xb.shape[1])
            u = model(Y).reshape(Xb.shape[0], n).mean(1)
        else:
            u = model(Xb).reshape(-1)
        (g,) = torch.autograd.grad(u.sum(), Xb)
        us.append(u.detach())
        grads.append(g[:, :d].detach())
    return torch.cat(us), torch.cat(grads)


def evaluate(
    model: torch.nn.Module, test: TestSet, config: Config, dtype: torch.dtype, device: torch.device
) -> dict[str, float]:
    u, grad = predict(model, test.X.to(device=device, dtype=dtype), config)
    return relative_errors(u, grad, test.u, test.grad)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device='cuda' but no CUDA device is available (use auto or cpu)")
    return torch.device(name)


@dataclass
class Trainer:
    """Everything a run holds; built once by ``build_trainer``."""

    config: Config
    pde: PDE
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    estimator: Estimator
    test: TestSet
    device: torch.device
    dtype: torch.dtype
    run_dir: Path
    is_writer: bool = True
    world_size: int = 1
    log: Callable[[str], None] = field(default=lambda msg: print(msg, flush=True))


def build_model(config: Config, pde: PDE, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(counter_seed(config.seed, 0x4D4F44454C))
    model = MLP(pde.in_dim, config.model.width, config.model.depth, config.model.activation)
    return model.to(device=device, dtype=dtype)


def build_trainer(config: Config, is_writer: bool = True) -> Trainer:
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    device = resolve_device(config.run.device)
    dtype = getattr(torch, config.run.dtype)
    if device.type == "cuda":  # the perturbed passes must not run in TF32 (MATH.md, precision)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    pde = build_pde(config.pde.name, config.pde.dim, dict(config.pde.params), config.pde.target)
    model = build_model(config, pde, dtype, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    est = config.estimator
    estimator = Estimator(
        method=est.method,
        samples=est.samples,
        sigma_x=est.sigma_x,
        sigma_t=est.time_sigma if pde.time_dependent else None,
        seed=config.seed,
        chunk=est.chunk,
        condition_samples=est.condition_samples,
    )
    test = pde.test_set(config.eval.points, config.eval.seed, config.eval.truth_samples)
    run_dir = Path(config.run.dir)
    return Trainer(config, pde, model, optimizer, estimator, test, device, dtype, run_dir, is_writer)


def train_step(tr: Trainer, step: int) -> dict[str, float]:
    """One optimizer step; returns the loss terms as floats."""
    cfg = tr.config
    for group in tr.optimizer.param_groups:
        group["lr"] = cfg.train.lr * lr_factor(step, cfg.train.steps)
    points = collocation(tr.pde, cfg, step, tr.dtype, tr.device)
    if cfg.train.adversarial.steps:
        points = adversarial_points(tr.model, tr.pde, tr.estimator, points, cfg, step)
    terms = loss_terms(tr.model, tr.pde, tr.estimator, points, step)
    loss = total_loss(terms, cfg.train.condition_weight)
    tr.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    tr.optimizer.step()
    out = {"loss": float(loss.detach())}
    out.update({k: float(v.detach()) for k, v in terms.items()})
    return out


def run(config: Config, is_writer: bool = True) -> dict[str, Any]:
    """Train from scratch as configured; write the run directory; return the summary."""
    tr = build_trainer(config, is_writer)
    cfg = tr.config
    if tr.is_writer:
        tr.run_dir.mkdir(parents=True, exist_ok=True)
        (tr.run_dir / "config.yaml").write_text(to_yaml(cfg))
    metrics = MetricsLog(tr.run_dir / "metrics.jsonl", enabled=tr.is_writer)
    start = time.perf_counter()
    errors: dict[str, float] = {}
    try:
        for step in range(cfg.train.steps):
            terms = train_step(tr, step)
            if not all(math.isfinite(v) for v in terms.values()):
                raise FloatingPointError(f"non-finite loss at step {step}: {terms}")
            done = step + 1
            seconds = time.perf_counter() - start
            if done % cfg.train.log_every == 0 or done == cfg.train.steps or step == 0:
                lr = cfg.train.lr * lr_factor(step, cfg.train.steps)
                metrics.write({"step": done, **terms, "lr": lr, "seconds": seconds})
            if done % cfg.eval.every == 0 or done == cfg.train.steps:
                errors = evaluate(tr.model, tr.test, cfg, tr.dtype, tr.device)
                metrics.write({"step": done, **errors, "seconds": time.perf_counter() - start})
                if tr.is_writer:
                    tr.log(
                        f"step {done}/{cfg.train.steps}  loss {terms['loss']:.3e}  "
                        f"L2 rel {errors['l2_rel']:.4f}  grad L2 rel {errors['grad_l2_rel']:.4f}  "
                        f"{seconds:.1f}s"
                    )
    finally:
        metrics.close()
    summary = {
        **errors,
        "steps": cfg.train.steps,
        "wall_seconds": time.perf_counter() - start,
        "world_size": tr.world_size,
        "method": cfg.estimator.method,
        "dim": cfg.pde.dim,
        "pde": tr.pde.name,
        "dstein_version": dstein.__version__,
        "config_digest": cfg.digest(),
    }
    if tr.test.u_se is not None:
        summary["truth_max_se"] = float(tr.test.u_se.max())
    if tr.is_writer:
        write_json_atomic(tr.run_dir / "summary.json", summary)
    return summary


if __name__ == "__main__":  # pragma: no cover - use launch/train.py
    sys.exit("use: python launch/train.py --config configs/NAME.yaml")
