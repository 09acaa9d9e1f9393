"""The training loop: points, estimates, losses, DeepSpeed step, evaluation, metrics, checkpoints.

One step, as data: this point group's collocation points of ``(seed, step)`` (``Trainer.points``:
the online sampler or an HDF5 file) -> optional adversarial moves -> derivative estimates (the
sharded estimator, ``dstein/estimators/sharded.py``: this rank's noise chunks, partial sums,
one all-reduce in the sample group) -> PDE residual and condition losses -> DeepSpeed backward
and step, the learning rate a pure function of the step -> metrics on rank 0 -> a checkpoint at
the step boundary when one is due or a preemption signal arrived.

The loss of a rank is ``L_p``: its point group's squared residuals and condition misfits,
divided by the GLOBAL point counts, so that ``L = sum_p L_p``; ``Estimator.loss_scale`` turns
DeepSpeed's gradient average into the sum of the ranks' distinct shares (MATH.md section 4).
Everything is built by ``dstein.build``; this module only runs it.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import dstein
from dstein.average import WeightAverage
from dstein.build import Trainer, build_trainer
from dstein.checkpoint import Checkpointer, Interrupted, Preemption, Resume, step_of
from dstein.config import Config, config_file_text
from dstein.consistency import describe as describe_consistency
from dstein.consistency import model_consistency
from dstein.control import closed_loop, describe
from dstein.data.points import Batch
from dstein.distributed import DistInfo, gather_objects, init_distributed, stop_on_lost_peer, sum_values
from dstein.errors import Preempted, RunStopped
from dstein.estimators.sharded import Estimator
from dstein.evaluation import PROCESS, evaluate_all, not_beaten, reference_errors
from dstein.faults import fault_loss
from dstein.files import write_json_atomic, write_text_atomic
from dstein.metrics import MetricsLog, Progress, Scalars
from dstein.noise import Streams
from dstein.nonfinite import (
    StepResult,
    clip_to,
    first_bad,
    first_nonfinite,
    gradient_norm,
    ranks_with,
    skip_or_stop,
)
from dstein.pdes import PDE
from dstein.report import finish_run
from dstein.rundir import lock_on_rank0, release


def lr_factor(step: int, total: int) -> float:
    """Linear decay from 1 at step 0 to 0 after the last step (a pure function of the step)."""
    return max(0.0, 1.0 - step / total)


def loss_terms(
    model: torch.nn.Module,
    pde: PDE,
    estimator: Estimator,
    points: dict[str, Batch],
    step: int,
    stream_base: int = 0,
    samples: int | None = None,
    unbiased: bool = False,
) -> dict[str, torch.Tensor]:
    """Squared PDE residual (``residual``) and condition misfits (one per condition in
    ``points``: a hard constraint leaves out those it satisfies), each summed over this point
    group's points and divided by the step's total count. ``samples``: for the domain points,
    instead of the estimator's. ``unbiased``: the residual term is ``r1 r2`` for two
    independent estimates (halves of the samples) instead of ``r^2`` (train.residual_loss).

    Differentiated with respect to the points (adversarial steps), the residual's and the
    targets' own dependence on the points goes through ``Shard.direct``, so that the sum of
    the point gradients over a sample group counts it once (values are unchanged)."""
    dom = points["domain"]
    cache: dict = {}  # the estimates of this loss share what depends only on the weights
    where: dict[str, Any] = {
        "step": step, "stream": stream_base + Streams.DOMAIN, "rows": dom.rows, "samples": samples, "cache": cache,
    }  # fmt: skip
    X = estimator.shard.direct(dom.X)
    if unbiased:
        first, second = (pde.residual(X, D) for D in estimator.pair(model, dom.X, pde.needs, **where))
    else:
        first = second = pde.residual(X, estimator(model, dom.X, pde.needs, **where))
    terms = {"residual": (first * second).sum() / dom.total}
    for k, kind in enumerate(pde.conditions):
        if kind not in points:  # held exactly by the hard constraint
            continue
        batch = points[kind]
        u = estimator(
            model, batch.X, frozenset({"u"}), step=step, stream=stream_base + Streams.condition(k),
            samples=estimator.condition_samples, rows=batch.rows, cache=cache,
        ).require("u")  # fmt: skip
        diff = u - pde.condition_target(kind, estimator.shard.direct(batch.X))
        terms[kind] = (diff * diff).sum() / batch.total
    return terms


def total_loss(terms: dict[str, torch.Tensor], condition_weight: float) -> torch.Tensor:
    return sum((v if k == "residual" else condition_weight * v) for k, v in terms.items())  # type: ignore[return-value]


def adversarial_points(
    model: torch.nn.Module,
    pde: PDE,
    estimator: Estimator,
    points: dict[str, Batch],
    config: Config,
    step: int,
) -> dict[str, Batch]:
    """Signed-gradient ascent of the loss on the points, projected back onto their sets.

    Where the samples are sharded each rank holds a share of the gradient with respect to
    the points; the shares are summed so that every rank moves the points alike.
    """
    adv = config.train.adversarial
    for j in range(adv.steps):
        moving = {k: b.X.detach().requires_grad_(True) for k, b in points.items()}
        batches = {k: points[k].with_points(X) for k, X in moving.items()}
        terms = loss_terms(model, pde, estimator, batches, step, Streams.attack(j), adv.samples,
                           config.train.unbiased_at(step))  # fmt: skip
        loss = total_loss(terms, config.train.condition_weight)
        grads = torch.autograd.grad(loss, list(moving.values()))
        moved = {}
        for (kind, X), g in zip(moving.items(), grads, strict=True):
            g = estimator.shard.sum_shares(g)
            X = X.detach() + adv.step_size * g.sign()
            moved[kind] = points[kind].with_points(
                pde.project(X) if kind == "domain" else pde.project_condition(kind, X)
            )
        points = moved
    return points


def train_step(tr: Trainer, step: int, critical: Callable[[], Any] = contextlib.nullcontext) -> StepResult:
    """One optimizer step, applied only if the loss and the gradient are finite on every rank;
    ``critical`` guards the update (an urgent stop waits for its end)."""
    cfg, info = tr.config, tr.info
    lr = cfg.train.lr * lr_factor(step, cfg.train.steps)
    for group in tr.optimizer.param_groups:
        group["lr"] = lr
    points = tr.points(step)
    if cfg.train.adversarial.steps:
        points = adversarial_points(tr.model, tr.pde, tr.estimator, points, cfg, step)
    unbiased = cfg.train.unbiased_at(step)
    terms = fault_loss(loss_terms(tr.model, tr.pde, tr.estimator, points, step, unbiased=unbiased), step + 1, info.rank)
    loss = total_loss(terms, cfg.train.condition_weight)
    local = torch.stack([loss.detach(), *(v.detach() for v in terms.values())]).double()
    names = ["loss", *terms]
    scaled = loss * tr.estimator.loss_scale(info.world_size, info.sample_group_size)
    if tr.watch is None:  # one rank: the terms and the gradient norm read together, after the backward pass
        tr.engine.backward(scaled)
        grads = tr.grads
        norm = gradient_norm(grads)
        values = torch.cat([local, norm.double().reshape(1)]).tolist()
        result = StepResult(dict(zip(names, values[:-1], strict=True)), lr)
        result.fault = first_bad(names, values[:-1]) or ("gradient" if not math.isfinite(values[-1]) else None)
        if result.fault is not None:
            result.ranks = (info.rank,)
            tr.engine.zero_grad()  # this step is not applied
            return result
        if tr.clip:
            clip_to(grads, norm, tr.clip)
    else:
        # each point group's terms are held by its sample_group_size ranks; a NaN anywhere
        # makes every rank's sum NaN, so all ranks take the same branch below
        total = sum_values(local) / info.sample_group_size
        result = StepResult(dict(zip(names, total.tolist(), strict=True)), lr)
        if not bool(torch.isfinite(total).all()):
            result.fault, result.ranks = first_nonfinite(terms, local, info)
            return result
        tr.watch.reset()
        tr.engine.backward(scaled)
        # under ZeRO stage 0 every rank now holds the same summed gradients: their norm (which
        # clipping needs anyway) is not finite on all ranks alike exactly when some rank's local
        # gradient was not, so the ranks are asked which only then; ZeRO's partitions ask always
        # (a sum that overflowed from finite shares names them all)
        if tr.clip:
            grads = tr.grads
            norm = gradient_norm(grads)
            everyone = tuple(range(info.world_size))
            ranks = () if math.isfinite(float(norm)) else ranks_with(tr.watch.bad, info) or everyone
        else:
            ranks = ranks_with(tr.watch.bad, info)
        if ranks:
            tr.engine.optimizer.zero_grad()  # drop the reduced gradients: this step is not applied
            tr.engine.zero_grad()
            result.fault, result.ranks = "gradient", ranks
            return result
        if tr.clip:
            clip_to(grads, norm, tr.clip)
    with critical():
        tr.engine.step()
        if tr.average is not None:
            tr.average.update()
    return result


def client_state(tr: Trainer, done: int, seconds: float) -> dict[str, Any]:
    """What a checkpoint holds besides DeepSpeed's model and optimizer state."""
    state = {"data_cursor": tr.reader.cursor(done) if tr.reader is not None else None, "train_seconds": seconds}
    if tr.average is not None:
        state["average"] = tr.average.state()
    return state


def run(config: Config, info: DistInfo | None = None) -> dict[str, Any]:
    """Train as configured, from scratch or from the checkpoint that ``checkpoint.resume``
    selects; write the run directory (rank 0, holding its lock, and that of a checkpoint.dir
    outside it); return the summary.

    Raises ``Preempted`` on every rank after saving, when a rank received a preemption signal;
    ``RunStopped`` on a fault; ``RunDirError`` when a directory is in use or unwritable. A
    run that fails before it wrote anything removes the run directory it created.
    """
    if info is None:
        par = config.parallel
        info = init_distributed(par.sample_group_size, par.world_size, par.timeout_s, config.run.device)
    run_dir = Path(config.run.dir)
    locks = [lock_on_rank0(run_dir, info.rank)]
    failed = True
    try:  # the checkpoint folder is locked too, inside the run directory or not: another run
        # pointing its checkpoint.dir at this run's checkpoints is refused instead of pruning them
        ckpt = Path(config.checkpoint.dir) if config.checkpoint.dir else run_dir / "checkpoints"
        locks.append(lock_on_rank0(ckpt, info.rank, "checkpoint.dir"))
        summary = _train(config, info, [held.note for held in locks if held and held.note])
        failed = False
        return summary
    finally:
        for held in reversed(locks):  # the checkpoint folder first: then an empty run directory goes too
            if held is not None:
                release(held, clean=failed)


def _train(config: Config, info: DistInfo, notes: list[str]) -> dict[str, Any]:
    tr = build_trainer(config, info)
    cfg, writer = tr.config, tr.info.is_writer
    checkpoints = Checkpointer(cfg, tr.info.rank, tr.info.world_size)
    resumed = checkpoints.resume(tr.engine, tr.reader)
    if tr.average is not None and resumed.path is not None:
        if resumed.average is not None:
            tr.average.load(resumed.average)
        else:  # written without train.average: the average starts at the resumed weights
            tr.average = WeightAverage(tr.model, cfg.train.average)
            resumed.messages.append("train.average: the checkpoint holds no weight average; it starts from its weights")
    if writer:
        fresh = tr.notes if resumed.path is None else []  # a resumed run's weights are the checkpoint's
        for line in [*notes, *fresh, *resumed.messages]:
            print(line, flush=True)
        if cfg.pde.dim > cfg.model.width and cfg.model.family == "mlp":
            print(width_warning(cfg.pde.dim, cfg.model.width), file=sys.stderr, flush=True)
    _on_rank0(tr, checkpoints, lambda: write_text_atomic(tr.run_dir / "config.yaml", config_file_text(cfg)))
    start = time.perf_counter()
    control = None
    with stop_on_lost_peer(tr.info, cfg.parallel.timeout_s):
        errors = _steps(tr, checkpoints, resumed, start)
        wall = time.perf_counter() - start  # training and its evaluations, not the closed loop
        if tr.average is not None:  # what the evaluations reported: the closed loop, model.pt
            tr.average.install()
        if cfg.eval.control_paths and tr.pde.control_problem() is not None:  # every rank its share of the paths
            control = closed_loop(tr.model, tr.pde, cfg, tr.device, tr.dtype, tr.estimator.transform,
                                  rank=tr.info.rank, world_size=tr.info.world_size)  # fmt: skip
    _on_rank0(tr, checkpoints, lambda: finish_run(tr.run_dir, tr.model, tr.pde, tr.test, cfg, tr.device, tr.dtype,
                                                  tr.process_baselines))  # fmt: skip
    summary = {
        **errors,
        **baseline_fields(tr),
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
    if tr.test is not None and tr.test.u_se is not None:
        summary["truth_max_se"] = float(tr.test.u_se.max())
    if tr.device.type == "cuda":  # this rank's peak of allocated device memory, this start
        summary["peak_cuda_memory_mb"] = torch.cuda.max_memory_allocated(tr.device) / 2**20
    declared = tr.pde.start()
    if declared is not None:
        summary["start_name"], summary["start_source"] = declared[0], declared[3]
    if writer:
        summary["reference"] = reference_errors(tr.model, tr.pde, cfg, tr.device, tr.dtype, tr.estimator.transform)
    if control is not None:
        summary["control"] = control
        if writer:
            print(describe(control), flush=True)
    consistency = (
        model_consistency(tr.model, tr.pde, cfg, tr.device, tr.dtype, tr.estimator.transform) if writer else None
    )
    if consistency is not None:  # eval.consistency_points, where the PDE supports it
        summary["consistency"] = consistency
        print(describe_consistency(consistency), flush=True)
    _on_rank0(tr, checkpoints, lambda: write_json_atomic(tr.run_dir / "summary.json", summary))
    warnings = [not_beaten(errors, tr.baselines)]
    if tr.process_baselines is not None:
        warnings.append(not_beaten(errors, tr.process_baselines, PROCESS))
    for warning in warnings:
        if writer and warning:
            print(warning, file=sys.stderr, flush=True)
    return summary


def baseline_fields(tr: Trainer) -> dict[str, Any]:
    """The baselines of every evaluation row and the summary: the test set's, and the along-the-
    process set's where there is one."""
    out: dict[str, Any] = {"baselines": tr.baselines}
    if tr.process_baselines is not None:
        out["process_baselines"] = tr.process_baselines
    if tr.start_baselines:
        out["start_baselines"] = tr.start_baselines
    return out


def _on_rank0(tr: Trainer, checkpoints: Checkpointer, write: Callable[[], Any]) -> None:
    """Rank 0's writes into the run directory; a failure (an OSError, or the RuntimeError
    torch.save raises on a full disk) stops every rank alike with ``RunStopped``."""
    error = None
    if tr.info.is_writer:
        try:
            write()
        except (OSError, RuntimeError) as err:
            error = f"could not write in run.dir={tr.run_dir} ({str(err).strip().splitlines()[0]})"
    failed = [e for e in gather_objects(error) if e]
    if failed:
        raise RunStopped(_write_failure(failed[0], checkpoints.latest()))


def width_warning(dim: int, width: int) -> str:
    """What a first layer narrower than d means for the gradient error (said once, at the start)."""
    floor = (1 - width / dim) ** 0.5
    return (
        f"warning: pde.dim={dim} > model.width={width}: the network's input gradient lies in the {width}-dimensional "
        f"row space of its first layer, so for gradients in random directions its gradient error cannot go below "
        f"about sqrt(1 - {width}/{dim}) = {floor:.2f} (gradient_floor in the evaluations gives the actual share)"
    )


def _steps(tr: Trainer, checkpoints: Checkpointer, resumed: Resume, start: float) -> dict[str, float]:
    """The steps after the resumed one with their logs, evaluations and checkpoints; the final
    errors. Raises ``Preempted`` after saving when a rank received a preemption signal, and
    ``RunStopped`` on every rank when a non-finite streak or a failed write stops the run."""
    cfg, writer, first = tr.config, tr.info.is_writer, resumed.step

    def clock() -> float:  # training time of all starts: `seconds` in metrics runs on across resumes
        return resumed.seconds + time.perf_counter() - start

    metrics = MetricsLog(tr.run_dir / "metrics.jsonl", enabled=writer, after=first)
    if metrics.note:
        print(metrics.note, flush=True)
    scalars = Scalars(tr.run_dir, enabled=writer, after=first)
    progress = Progress(cfg.train.steps, enabled=writer, every=cfg.train.print_every, initial=first)
    preemption = Preemption(cfg.checkpoint.signal, cfg.checkpoint.deadline_s)
    errors: dict[str, float] = {}
    skips, step, applied, updates = 0, first, True, tr.engine.global_steps
    before = applied  # whether the step before this one was applied
    try:
        (stop,) = preemption.agreed(None)  # a signal while the ranks started: stop before any step
        if stop:
            who = preemption.received or "a signal on another rank"
            raise Preempted(first, checkpoints.latest() if first else None, who, " (received while starting)")
        for step in range(first, cfg.train.steps):
            updates, before = tr.engine.global_steps, applied
            result = train_step(tr, step, preemption.critical)
            terms, done, applied = result.terms, step + 1, result.fault is None
            new_errors = None
            if not applied:
                skips += 1
                skip_or_stop(result, done, skips, cfg, checkpoints.latest, metrics if writer else None)
            else:
                skips = 0
                if done % cfg.train.log_every == 0 or done == cfg.train.steps or step == first:
                    seconds = clock()
                    metrics.write({"step": done, **terms, "lr": result.lr, "seconds": seconds})
                    rate = (done - first) / (seconds - resumed.seconds)  # of this start
                    scalars.add(done, {**terms, "lr": result.lr, "steps_per_second": rate}, "train")
            if done % cfg.eval.every == 0 or done == cfg.train.steps:
                errors = new_errors = _evaluate(tr)
                metrics.write({"step": done, **errors, **baseline_fields(tr), "seconds": clock()})
                scalars.add(done, {**errors, **flat_baselines(tr.baselines),
                                   **flat_baselines(tr.process_baselines or {}, PROCESS)}, "eval")  # fmt: skip
            progress.update(done, terms, new_errors)
            write_error = metrics.error or scalars.error
            stop, write_failed = preemption.agreed(None, write_error is not None)
            if write_failed:
                raise RunStopped(_write_failure(write_error, checkpoints.latest()))
            path = checkpoints.latest()
            if checkpoints.due(done) or stop:
                if applied:
                    with preemption.critical():
                        path = checkpoints.save(tr.engine, done, client_state(tr, done, clock()))
                elif writer:  # a step that was not applied never makes a checkpoint
                    print(f"note: no checkpoint after step {done}: it was not applied; the last complete one is "
                          f"{path if path else '(none yet)'}", file=sys.stderr, flush=True)  # fmt: skip
            if stop:
                progress.close()
                raise Preempted(done, path, preemption.received or "a signal on another rank")
        if not errors:  # resumed from the final checkpoint: nothing left to train
            errors = _evaluate(tr)
    except Interrupted as urgent:
        progress.close()
        moved = tr.engine.global_steps > updates  # this step's update was made
        raise _interrupted(tr, checkpoints, step + int(moved), moved or before, urgent, clock) from None
    finally:
        preemption.restore()
        progress.close()
        scalars.close()
        metrics.close()
    return errors


def _interrupted(tr: Trainer, checkpoints: Checkpointer, held: int, applied: bool, urgent: Interrupted,
                 clock: Any) -> Preempted:  # fmt: skip
    """What a stop in the middle of a step can save: in one process the state it holds (after
    ``held`` steps, unless the last of them was not ``applied``); with several ranks nothing (a
    step cannot be cut safely across ranks), the last complete checkpoint stays."""
    latest = checkpoints.latest()
    if latest is not None and step_of(latest) == held:
        return Preempted(held, latest, urgent.args[0], " (stopped at once, mid-step)")
    if tr.info.world_size == 1 and applied and held > 0:
        path = checkpoints.save(tr.engine, held, client_state(tr, held, clock()))
        return Preempted(held, path, urgent.args[0], " (stopped at once, mid-step: the state before that step)")
    note = (f" (stopped at once in the middle of step {held + 1}: with {tr.info.world_size} ranks a step cannot be"
            " cut safely; the run resumes from the last complete checkpoint)")  # fmt: skip
    return Preempted(held, latest, urgent.args[0], note, synced=tr.info.world_size == 1)


def _write_failure(error: str | None, latest: Any) -> str:
    return (
        f"{error}; the last complete checkpoint, {latest if latest else '(none yet)'}, is intact: free space or fix "
        "run.dir, then run the same command to resume"
    )


def _evaluate(tr: Trainer) -> dict[str, float]:
    """The errors on the test set and along the process, and the value at the PDE's start
    state (every rank alike), of the averaged weights where train.average is set."""
    with tr.average.applied() if tr.average is not None else contextlib.nullcontext():
        return evaluate_all(tr.model, tr.pde, tr.test, tr.process_test, tr.config, tr.device, tr.dtype,
                            tr.estimator.transform, tr.info.rank, tr.info.world_size)  # fmt: skip


def flat_baselines(baselines: dict[str, dict[str, float]], prefix: str = "") -> dict[str, float]:
    """``<prefix>baseline_<predictor>_<error>`` scalars (TensorBoard draws them as reference lines)."""
    return {f"{prefix}baseline_{name}_{key}": value for name, errors in baselines.items()
            for key, value in errors.items()}  # fmt: skip


__all__ = ["lr_factor", "run", "train_step"]
