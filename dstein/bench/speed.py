"""Seconds per training step: strong scaling of sample sharding, every method versus d and
versus samples, a config beyond its width (``beyond``), issue 6's acceptance ratios, and the
step's fixed cost (``floor``)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dstein.bench.catalog import FLOOR, HUTCHINSON_PROBES
from dstein.bench.measure import launch_ranks, time_steps, train_runs
from dstein.metrics import read_metrics
from dstein.pdes import build_pde

SCALING_OVERRIDES = [
    "pde.dim=1000", "estimator.method=stein-antithetic", "estimator.samples=4096", "estimator.condition_samples=null",
    "model.width=128", "model.depth=4", "train.domain_points=50", "train.condition_points=50",
    "train.adversarial.steps=0", "eval.points=8", "eval.truth_samples=100", "run.threads=1",
]  # fmt: skip


def suite_scaling(args: argparse.Namespace) -> dict:
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    runs = {w: launch_ranks(w, tmp / f"scaling-{w}.json", args.warmup, args.steps, SCALING_OVERRIDES) for w in (1, 2)}
    for record in runs.values():
        assert "skipped" not in record, record
    return {
        "suite": "scaling",
        "config": "configs/quickstart.yaml + " + " ".join(SCALING_OVERRIDES),
        "runs": runs,
        "speedup_2_ranks": runs[1]["median_step_seconds"] / runs[2]["median_step_seconds"],
    }


# HJB (the quickstart's problem), width 128, depth 4, 50 + 50 points, no adversarial steps:
# the configuration of issue 6's acceptance and of REFERENCE.md's table.
STEP_BASE = [
    "model.width=128", "model.depth=4", "train.domain_points=50", "train.condition_points=50",
    "train.adversarial.steps=0", "eval.points=8", "eval.truth_samples=100", "estimator.condition_samples=null",
]  # fmt: skip


def step_overrides(method: str, dim: int, samples: int, chunk: int | None = None) -> list[str]:
    probes = HUTCHINSON_PROBES if method == "hutchinson" else samples
    out = [*STEP_BASE, f"pde.dim={dim}", f"estimator.method={method}", f"estimator.samples={probes}"]
    return out + ([f"estimator.chunk={chunk}"] if chunk else [])


def suite_beyond(args: argparse.Namespace) -> dict:
    """A config's own settings (--config, default configs/hjb_10k.yaml: its model family,
    method, samples and loss) at d = 1000 and 100,000 (--dims), with the eval set shrunk (it
    is not timed) and any overrides given after ``--``: seconds per training step and the
    ratio of the largest d to the smallest (the cost targets: at most 2)."""
    runs = {}
    config = args.config or "configs/hjb_10k.yaml"
    small = ["eval.points=8", "eval.truth_samples=100", "eval.samples=8", "run.threads=0", *args.overrides]
    for dim in args.dims:
        runs[f"d={dim}"] = time_steps(args, f"beyond-{dim}", [f"pde.dim={dim}", *small], config)
    secs = [runs[f"d={dim}"].get("median_step_seconds") for dim in (min(args.dims), max(args.dims))]
    ratio = secs[1] / secs[0] if secs[0] is not None and secs[1] is not None else None
    return {"suite": "beyond", "config": config, "runs": runs,
            f"d{max(args.dims)}_over_d{min(args.dims)}": ratio}  # fmt: skip


def suite_methods(args: argparse.Namespace) -> dict:
    """Seconds per step and memory versus d for every method (2048 samples; hutchinson: 64 probes)."""
    runs = {}
    for dim in args.dims:
        for method in args.methods:
            runs[f"{method}/d={dim}"] = time_steps(args, f"methods-{method}-{dim}", step_overrides(method, dim, 2048))
    return {"suite": "methods", "samples": 2048, "hutchinson_probes": HUTCHINSON_PROBES, "runs": runs}


def suite_samples(args: argparse.Namespace) -> dict:
    """Seconds per step and memory versus samples (chunks of 256) at d = 1000."""
    runs = {}
    for method in ("stein-antithetic", "stein-subspace"):
        for samples in (1024, 2048, 4096, 8192, 16384, 32768):
            runs[f"{method}/samples={samples}"] = time_steps(
                args, f"samples-{method}-{samples}", step_overrides(method, 1000, samples, chunk=256)
            )
    return {"suite": "samples", "dim": 1000, "chunk": 256, "runs": runs}


def suite_acceptance(args: argparse.Namespace) -> dict:
    """Issue 6's ratios, measured in one run (HJB, width 128, depth 4, 50 + 50 points)."""
    run = {}
    for method in ("autograd", "stein-antithetic", "stein-subspace"):
        run[f"{method}/d=10000"] = time_steps(args, f"acc-{method}-10000", step_overrides(method, 10000, 2048))
    for dim in (1000, 100000):
        run[f"stein-subspace/d={dim}"] = time_steps(args, f"acc-sub-{dim}", step_overrides("stein-subspace", dim, 2048))
    for samples in (1024, 32768):
        run[f"stein-subspace/samples={samples}"] = time_steps(
            args, f"acc-mem-{samples}",
            [*step_overrides("stein-subspace", 1000, samples, chunk=256), "estimator.recompute=always"],
        )  # fmt: skip
    run["stein-antithetic/d=250"] = time_steps(args, "acc-anti-250", step_overrides("stein-antithetic", 250, 2048))

    def secs(key: str) -> float:
        return run[key].get("median_step_seconds", float("inf"))  # a skipped run counts as infinitely slow

    sub = secs("stein-subspace/d=10000")
    ratios = {
        "autograd_over_subspace_d10000": secs("autograd/d=10000") / sub,
        "antithetic_over_subspace_d10000": secs("stein-antithetic/d=10000") / sub,
        "subspace_d100000_over_d1000": secs("stein-subspace/d=100000") / secs("stein-subspace/d=1000"),
        "memory_32768_over_1024": run["stein-subspace/samples=32768"]["step_memory_mb"]
        / max(run["stein-subspace/samples=1024"]["step_memory_mb"], 1e-9),
        "peak_rss_32768_over_1024": run["stein-subspace/samples=32768"]["peak_rss_mb"]
        / run["stein-subspace/samples=1024"]["peak_rss_mb"],
        "antithetic_d250_seconds_vs_reference_2.56": secs("stein-antithetic/d=250") / 2.56,
    }
    # JSON has no infinity: a ratio over a skipped run is null, its reason is in "runs"
    finite = {k: v if v != float("inf") else None for k, v in ratios.items()}
    return {"suite": "acceptance", "runs": run, "ratios": finite}


#: Logged every this many steps; the rate is taken from the first logged step after the warm-up
#: (the first FLOOR_LOG steps) to the last (the final evaluation and the start-up left out).
FLOOR_LOG = 50


def loop_rate(metrics: Path, after: int) -> dict:
    """Steps per second of the training loop as a user sees it (points, estimates, the
    optimizer, logging, checkpoints when due), from metrics.jsonl's training rows: between
    the first row after step ``after`` and the last."""
    rows = [r for r in read_metrics(metrics) if "loss" in r and r["step"] >= after]
    (a, b) = rows[0], rows[-1]
    rate = (b["step"] - a["step"]) / (b["seconds"] - a["seconds"])
    return {"from_step": a["step"], "to_step": b["step"], "steps_per_second": rate, "ms_per_step": 1000 / rate}


#: STDE's options beside a two-body config (REFERENCE.md: sparse STDE, 16 sampled dimensions;
#: its defaults: width 128, three hidden layers, 100 points a step, 20,000 test points).
STDE_OPTIONS = ["--sparse", "--rand_batch_size", "16"]


def stde_run(args: argparse.Namespace, dim: int, tag: str) -> dict:
    """STDE's script (--stde, under --stde-python) at ``dim`` for --budget-steps steps with
    dstein's coefficients (``stde_shim``): the command's wall time, its training loop's rate
    from step FLOOR_LOG to the step before the last (the last one evaluates), its final L2."""
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    coeffs, times = tmp / f"stde-coeffs-{dim}.npy", tmp / f"stde-times-{tag}.json"
    pde = build_pde("sine_gordon", dim, {"coeff_seed": 0})
    np.save(coeffs, pde.coeffs.numpy())  # type: ignore[attr-defined]  # a TwoBody's c_1 .. c_{d-1}
    script = Path(args.stde).resolve()
    cmd = [args.stde_python, str(Path(__file__).with_name("stde_shim.py")), str(coeffs), str(times), str(script),
           "--dim", str(dim), "--epochs", str(args.budget_steps), "--eval_every", str(args.budget_steps - 1),
           *STDE_OPTIONS]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=script.parent, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"floor suite: STDE's script failed ({done.returncode}):\n{done.stderr[-3000:]}")
    ends = json.loads(times.read_text())["step_ends"]
    a, b = FLOOR_LOG, len(ends) - 2
    rate = (b - a) / (ends[b] - ends[a])
    l2 = [float(word.split("=")[1]) for word in (done.stdout + done.stderr).split() if word.startswith("l2_rel=")]
    return {"steps_per_second": rate, "ms_per_step": 1000 / rate, "from_step": a + 1, "to_step": b + 1,
            "command_seconds": wall, "l2_rel": l2[-1], "command": " ".join(cmd[4:])}  # fmt: skip


def suite_floor(args: argparse.Namespace) -> dict:
    """Steps per second of FLOOR's configs, each trained for --budget-steps steps through
    launch/train.py (one at a time, the machine's threads; no evaluation but the final one, no
    checkpoint), rounds alternating over the configs (--rounds): the training loop's rate and
    the process's wall time per run. With --stde, STDE's script runs after each two-body
    config at its d, on the same coefficients (``stde_run``)."""
    if args.budget_steps < 2 * FLOOR_LOG:
        raise SystemExit(f"error: --budget-steps={args.budget_steps}: the floor suite times steps {FLOOR_LOG} to the "
                         f"last, so it needs at least {2 * FLOOR_LOG}")  # fmt: skip
    tmp = Path(args.tmp)
    chosen = {name: FLOOR[name] for name in args.floor}
    runs: dict[str, list[dict]] = {name: [] for name in chosen}
    for round_ in range(args.rounds):
        for name, (config, overrides) in chosen.items():
            run_name = f"floor-{name.replace('/', '-').replace('=', '')}-{round_}"
            quiet = [f"train.steps={args.budget_steps}", f"train.log_every={FLOOR_LOG}", "eval.every=100000",
                     "checkpoint.every=100000", "eval.control_paths=0", "run.threads=0"]  # fmt: skip
            start = time.perf_counter()
            record = train_runs([(name, run_name, config, [*overrides, *quiet, *args.overrides])], 1, tmp)[name]
            wall = time.perf_counter() - start
            if "failed" in record:
                raise SystemExit(f"floor suite: {name} failed:\n{record['stderr']}")
            rate = loop_rate(tmp / run_name / "metrics.jsonl", FLOOR_LOG)
            runs[name].append({**rate, "command_seconds": wall, "l2_rel": record["l2_rel"]})
            print(f"{name}: {rate['ms_per_step']:.2f} ms per step", file=sys.stderr, flush=True)
            if args.stde and name.startswith("sine_gordon/d="):
                dim = int(name.split("=")[1])
                peer = stde_run(args, dim, f"{dim}-{round_}")
                runs.setdefault(f"stde/d={dim}", []).append(peer)
                print(f"stde/d={dim}: {peer['ms_per_step']:.2f} ms per step", file=sys.stderr, flush=True)
    best = {name: min(r["ms_per_step"] for r in rows) for name, rows in runs.items()}
    return {"suite": "floor", "budget_steps": args.budget_steps, "rounds": args.rounds, "configs": chosen,
            "runs": runs, "best_ms_per_step": best}  # fmt: skip
