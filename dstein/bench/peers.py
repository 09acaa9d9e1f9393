"""dstein beside others: the paper's original code on identical work, the peers' two-body
problems, and the shipped configs trained to the end beside their baselines."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dstein.bench.catalog import PEER_METHODS
from dstein.bench.measure import ROOT, train_runs
from dstein.build import build_trainer
from dstein.config import load_config
from dstein.estimators import stein
from dstein.train import train_step

#: The original code's HJB d = 250 step (conf/hjb/improved-steins.yaml: depth 4 there is 3 hidden
#: layers, tanh, sigma 0.01 for x and t, 2048 samples, 50 + 50 points, boundary weight 500)
#: at width 128, and the same work in dstein: the terminal condition as a loss of the same
#: weight with as many samples, Stein's Laplacian, the squared residual, no attack.
ORIGINAL_WORK: dict[str, Any] = {
    "dim": 250, "width": 128, "hidden": 3, "samples": 2048, "points": 50, "weight": 500.0, "lr": 2e-4,
}  # fmt: skip
ORIGINAL_DSTEIN = [
    "pde.dim=250", "pde.params.spread=0", "model.family=mlp", "model.width=128", "model.depth=3",
    "model.activation=tanh", "model.hard_constraint=false", "estimator.method=stein-antithetic",
    "estimator.samples=2048", "estimator.chunk=256", "estimator.condition_samples=2048", "estimator.sigma_x=0.01",
    "estimator.sigma_t=0.01", "estimator.laplacian=stein", "train.residual_loss=squared",
    "train.condition_weight=500", "train.lr=2e-4", "train.domain_points=50", "train.condition_points=50",
    "train.adversarial.steps=0", "deepspeed=zero0", "eval.points=8", "eval.truth_samples=100", "eval.samples=8",
    "run.threads=0",
]  # fmt: skip


def suite_original(args: argparse.Namespace) -> dict:
    """One training step of the paper's original code (``--original``: a checkout of
    LithiumDA/PINN-without-Stacked-BP, its improved-steins wrapper and HJB equation) and of
    dstein on the same work (ORIGINAL_WORK), in this one process, their steps alternating:
    seconds per step (median over --steps after --warmup each) and the ratio."""

    src = Path(args.original or "")
    if not (src / "src" / "hjb" / "derivative_wrapper.py").is_file():
        print(f"error: --original={args.original!r}: not a checkout of LithiumDA/PINN-without-Stacked-BP "
              "(src/hjb/derivative_wrapper.py missing)", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    sys.path.insert(0, str(src.resolve()))
    from src.hjb.derivative_wrapper import ImprovedSteinsWrapper  # the original code
    from src.hjb.equation import HJBEquation
    from src.model import MLP as OriginalMLP

    w = ORIGINAL_WORK
    torch.manual_seed(0)
    g = OriginalMLP([w["dim"] + 1] + [w["width"]] * w["hidden"] + [1])
    f = ImprovedSteinsWrapper(g, t_std=0.01, x_std=0.01, train_sample_cnt=w["samples"], eval_sample_cnt=w["samples"])
    hjb = HJBEquation(w["dim"], 1.0, 1.0)
    optimizer = torch.optim.Adam(g.parameters(), lr=w["lr"])

    def original_step() -> None:
        x = torch.randn(2 * w["points"], w["dim"])
        t = torch.cat([torch.rand(w["points"], 1), torch.ones(w["points"], 1)])
        X = torch.cat([x, t], 1)
        optimizer.zero_grad()
        loss = hjb.domain_loss(X[: w["points"]], f) + w["weight"] * hjb.boundary_loss(X[w["points"] :], f)
        loss.backward()
        optimizer.step()

    if args.through_input:  # the ablation: dstein's full-space estimates perturbing the input itself
        stein.layered = lambda model: None
    config = load_config(ROOT / "configs/hjb_250.yaml", [*ORIGINAL_DSTEIN, f"run.dir={args.tmp}/original"])
    tr = build_trainer(config)
    sizes = [sum(p.numel() for p in model.parameters()) for model in (tr.engine.module, g)]
    if sizes[0] != sizes[1]:
        raise SystemExit(f"error: the two models differ in size ({sizes[0]} vs {sizes[1]} weights)")
    times: dict[str, list[float]] = {"original": [], "dstein": []}
    for step in range(args.warmup + args.steps):
        for name, run in (("original", original_step), ("dstein", lambda step=step: train_step(tr, step))):
            start = time.perf_counter()
            run()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "suite": "original", "work": w, "dstein_overrides": ORIGINAL_DSTEIN, "threads": torch.get_num_threads(),
        "step_seconds": times, "median_step_seconds": median, "speedup": median["original"] / median["dstein"],
        "dstein_perturbs": "the input" if args.through_input else "the first layer's pre-activation",
    }  # fmt: skip


def suite_accuracy(args: argparse.Namespace) -> dict:
    """Each config of --configs trained to the end with the method it picks and with autograd
    (--methods), for --seeds, through launch/train.py (--parallel runs at a time, one thread
    each); the errors beside the baselines and the gradient floor, HJB's u(0, 0), the time."""
    jobs = []
    for name in args.configs:
        for method in args.accuracy_methods:
            for seed in args.seeds:
                overrides = [f"seed={seed}", "run.threads=1"]
                overrides += [] if method == "config" else [f"estimator.method={method}"]
                key, run_name = f"{name}/{method}/seed={seed}", f"accuracy-{name}-{method}-{seed}"
                jobs.append((key, run_name, f"configs/{name}.yaml", overrides))
    runs = train_runs(jobs, args.parallel, Path(args.tmp))
    return {"suite": "accuracy", "parallel": args.parallel, "threads_per_run": 1, "runs": runs}


#: STDE's minimal script on this machine kind (REFERENCE.md): d = 1000, 2000 steps.
STDE_CPU = {"pde": "sine_gordon", "dim": 1000, "steps": 2000, "wall_seconds": 49.0, "steps_per_second": 48.0,
            "l2_rel": 9.4e-3}  # fmt: skip


def suite_peers(args: argparse.Namespace) -> dict:
    """The peers' two-body problems (--pdes, at --dims) with each of --peer-methods, through
    launch/train.py one run at a time with the machine's threads, for a budget of
    --budget-steps steps (configs/sine_gordon_1k.yaml's settings otherwise): steps per
    second, peak memory, the errors after the budget beside the baselines, and the training
    time at which the evaluations first reached --target-l2 (the time to a given error).
    Memory: the run's peak resident set (``peak_memory_mb``) and, on CUDA, its peak of
    allocated device memory (``peak_cuda_memory_mb``)."""
    jobs = []
    for pde in args.pdes:
        for dim in args.dims:
            for name in args.peer_methods:
                overrides = [f"pde.name={pde}", f"pde.dim={dim}", f"train.steps={args.budget_steps}",
                             "run.threads=0", *PEER_METHODS[name], *args.overrides]  # fmt: skip
                key = f"{pde}/d={dim}/{name}"
                jobs.append((key, f"peers-{pde}-{dim}-{name}", "configs/sine_gordon_1k.yaml", overrides))
    runs = train_runs(jobs, 1, Path(args.tmp))
    for run in runs.values():
        if "failed" in run:
            continue
        run["steps_per_second"] = run["steps"] / run["train_seconds"]
        reached = [e for e in run["evals"] if e["l2_rel"] <= args.target_l2]
        run["seconds_to_target"] = reached[0]["seconds"] if reached else None
        run["below_constrained_constant"] = run["l2_rel"] < run["baselines"]["constrained_constant"]["l2_rel"]
    return {"suite": "peers", "budget_steps": args.budget_steps, "target_l2": args.target_l2,
            "stde_on_this_machine_kind": STDE_CPU, "runs": runs}  # fmt: skip
