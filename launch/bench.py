"""Benchmarks that write JSON: ``python launch/bench.py --suite NAME [--out FILE.json]``.

Suites:
  data     HDF5: write d = 10,000 training points (--data-steps steps of 50 + 50) and read
           them back in order and shuffled (points per second); generate the HJB d = 250
           test set (1000 points, 20,000 Monte Carlo samples each) and report its largest
           standard error.
  scaling  strong scaling of sample sharding: the same HJB training step (d = 1000, 4096
           samples, width 128, depth 4, 50 + 50 points) on 1 rank and on 2 ranks, one thread
           per rank, CPU gloo; reports seconds per step (median) and the speed-up.
  methods  seconds per HJB training step and memory versus d (--dims, default 100 ... 100,000)
           for autograd, hutchinson (64 probes), stein-antithetic and stein-subspace (--methods; 2048
           samples; width 128, depth 4, 50 + 50 points, no adversarial steps). A
           configuration whose first step exceeds --max-step-seconds (60) or whose process
           exceeds --memory-limit-gb (16) is recorded as skipped, with the reason.
  samples  the same versus samples (1024 ... 32768, chunks of 256) at d = 1000.
  beyond   configs/hjb_10k.yaml (or --config) as it ships (radial family, stein-subspace, its
           samples and loss) at d = 1000 and 100,000 (--dims): seconds per step and their ratio.
  accuracy each config of --configs (quickstart, hjb_100, hjb_250) trained with the method it
           picks and with autograd, over --seeds, through launch/train.py: errors beside the
           baselines and the gradient floor (docs/benchmarks.md, "Accuracy").
  acceptance  the ratios of issue 6 from one run: subspace vs autograd and antithetic at
           d = 10,000; subspace at d = 100,000 vs 1000; memory at 32768 vs 1024 samples;
           antithetic at d = 250 vs the original code's 2.56 s per step (REFERENCE.md).
  peers    the peers' two-body problems (--pdes sine_gordon allen_cahn, d = --dims, default
           1000) trained with configs/sine_gordon_1k.yaml's settings and each of dstein's
           methods (--peer-methods) for --budget-steps steps, one run at a time: steps per
           second, peak memory, errors beside the baselines, time to --target-l2 (STDE's
           9.4e-3 on this machine kind, REFERENCE.md).
  original one training step of the paper's original code (--original: a checkout of
           LithiumDA/PINN-without-Stacked-BP) and of dstein on identical work (HJB d = 250,
           width 128, 3 hidden tanh layers, 2048 samples, antithetic, 50 + 50 points),
           alternating in one process: seconds per step and the speed-up.
  gpu      on --device (cuda): every method's derivatives there in float32 against CPU
           float64 on a small case (HJB d = 20, width 32; Monte Carlo methods: 16 repeats
           on each side, largest z-score of the difference of means; autograd: relative
           error), then HJB training steps with stein-subspace at d = 10^4, 10^5, 10^6
           (width 128, depth 4, 50 + 50 points, 1024 samples; --dims to change) and, at
           the first of --dims, with the other methods. launch/gpu_check.sh runs it on a lent GPU.

Memory on a CPU: the process's resident set before the first step and its peak over the
steps; step_memory_mb is their difference (what the steps add). On CUDA: peak allocated.

Timings are medians over the timed steps after warm-up steps; ranks synchronise before
and after each timed step. Quote ratios from one run: shared machines are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCALING_OVERRIDES = [
    "pde.dim=1000", "estimator.method=stein-antithetic", "estimator.samples=4096", "estimator.condition_samples=null",
    "model.width=128", "model.depth=4", "train.domain_points=50", "train.condition_points=50",
    "train.adversarial.steps=0", "eval.points=8", "eval.truth_samples=100", "run.threads=1",
]  # fmt: skip


def _peak_rss_mb() -> float:
    """The process's peak resident set since the last ``_reset_peak_rss`` (Linux's VmHWM),
    else since it started."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> None:
    """Start the peak over again (``echo 5 > /proc/self/clear_refs``), so that the steps'
    peak is not the build's (drawing points at d = 100,000 once took 6 GB there)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(
    out: str, warmup: int, steps: int, overrides: list[str], max_step_seconds: float = 0.0,
    config_file: str = "configs/quickstart.yaml",
) -> None:  # fmt: skip
    """One rank: build the trainer from the environment's launcher and time training steps.

    Memory: the resident set before the first step and its peak over the steps (CPU), and
    the peak of allocated device memory (CUDA). A first step slower than ``max_step_seconds``
    ends the run with a ``skipped`` record instead of timings."""
    import torch

    from dstein.build import build_trainer
    from dstein.config import load_config
    from dstein.distributed import barrier
    from dstein.train import train_step

    config = load_config(ROOT / config_file, [*overrides, "run.dir=/tmp/dstein-bench"])
    tr = build_trainer(config)
    _reset_peak_rss()
    before = _rss_mb()
    if tr.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + steps):
        barrier()
        start = time.perf_counter()
        train_step(tr, step)
        if tr.device.type == "cuda":
            torch.cuda.synchronize()
        barrier()
        seconds = time.perf_counter() - start
        if step == 0 and tr.info.rank == 0:
            Path(out).with_suffix(".first-step").write_text(str(seconds))
        if step >= warmup:
            times.append(seconds)
        elif max_step_seconds and seconds > max_step_seconds:
            if tr.info.rank == 0:
                why = f"first step took {seconds:.0f} s > {max_step_seconds:.0f} s"
                Path(out).write_text(json.dumps({"skipped": why}))
            return
    if tr.info.rank == 0:
        result = {
            "world_size": tr.info.world_size,
            "threads_per_rank": torch.get_num_threads(),
            "method": config.estimator.method,
            "step_seconds": times,
            "median_step_seconds": statistics.median(times),
            "rss_before_steps_mb": before,
            "peak_rss_mb": _peak_rss_mb(),
            "step_memory_mb": _peak_rss_mb() - before,
        }
        if tr.device.type == "cuda":
            result["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        Path(out).write_text(json.dumps(result))


def launch_ranks(
    world: int,
    out: Path,
    warmup: int,
    steps: int,
    overrides: list[str],
    max_step_seconds: float = 0.0,
    memory_limit_gb: float = 0.0,
    config_file: str = "configs/quickstart.yaml",
) -> dict:
    """Run ``world`` worker ranks; their rank 0's JSON record, or a ``skipped`` record when the
    first step is too slow (or does not finish within startup + max_step_seconds), or the
    memory limit is hit."""
    import resource

    from dstein.distributed import free_port

    port = str(free_port())
    out.unlink(missing_ok=True)
    cap = int(memory_limit_gb * 2**30)

    def limit() -> None:
        if cap:
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    procs = []
    threads = str(max(1, (os.cpu_count() or 1) // world))
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS=threads)  # fmt: skip
        cmd = [sys.executable, __file__, "--worker", str(out), "--warmup", str(warmup), "--steps", str(steps),
               "--max-step-seconds", str(max_step_seconds), "--worker-config", config_file,
               "--", *overrides]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True, preexec_fn=limit))  # fmt: skip
    # a first step still running after start-up + max_step_seconds is skipped at once
    first = out.with_suffix(".first-step")
    first.unlink(missing_ok=True)
    started = time.monotonic()
    while max_step_seconds and not first.exists() and any(p.poll() is None for p in procs):
        if time.monotonic() - started > 120 + max_step_seconds:
            for p in procs:
                p.kill()
            return {"skipped": f"first step not done within {max_step_seconds:.0f} s (plus start-up)"}
        time.sleep(0.5)
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            if "out of memory" in err or "MemoryError" in err or "DefaultCPUAllocator" in err:
                return {"skipped": f"out of memory (limit {memory_limit_gb:g} GB of address space)"}
            raise SystemExit(f"bench rank failed ({proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.read_text())


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


def suite_data(args: argparse.Namespace) -> dict:
    """HDF5: write and read d = 10,000 training points; generate the HJB d = 250 test set."""
    from dstein.config import load_config
    from dstein.data import H5Collocation, generate, read_test_set

    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = load_config(ROOT / "configs/hjb_10k.yaml", ["eval.truth_samples=2"])
    path = tmp / "hjb_10k-train.h5"
    start = time.perf_counter()
    generate(cfg, path, steps=args.data_steps, test_points=0, truth_samples=2)
    write_s = time.perf_counter() - start
    rows = args.data_steps * cfg.train.domain_points
    out: dict = {"train_file": {"dim": 10000, "rows_per_kind": rows, "kinds": 2, "write_seconds": write_s,
                                "file_bytes": path.stat().st_size}}  # fmt: skip
    for shuffle in (False, True):
        reader = H5Collocation(path, {"domain": 50, "terminal": 50}, seed=0, shuffle=shuffle)
        start, points = time.perf_counter(), 0
        for step in range(args.data_steps):
            for kind in ("domain", "terminal"):
                points += reader.read(kind, step)[0].shape[0]
        seconds = time.perf_counter() - start
        out[f"read_{'shuffled' if shuffle else 'in_order'}"] = {"points": points, "seconds": seconds,
                                                                 "points_per_second": points / seconds}  # fmt: skip
        reader.close()
    cfg250 = load_config(ROOT / "configs/hjb_250.yaml")
    test_path = tmp / "hjb_250-test.h5"
    start = time.perf_counter()
    generate(cfg250, test_path, steps=0, test_points=1000, truth_samples=cfg250.eval.truth_samples)
    test = read_test_set(test_path)
    out["hjb_250_test_set"] = {
        "points": 1000, "truth_samples": cfg250.eval.truth_samples, "seconds": time.perf_counter() - start,
        "max_u_se": float(test.u_se.max()), "max_relative_se": float((test.u_se / test.u.abs()).max()),
        "u_range": [float(test.u.min()), float(test.u.max())], "bytes": test_path.stat().st_size,
    }  # fmt: skip
    return {"suite": "data", **out}


# HJB (the quickstart's problem), width 128, depth 4, 50 + 50 points, no adversarial steps:
# the configuration of issue 6's acceptance and of REFERENCE.md's table.
STEP_BASE = [
    "model.width=128", "model.depth=4", "train.domain_points=50", "train.condition_points=50",
    "train.adversarial.steps=0", "eval.points=8", "eval.truth_samples=100", "estimator.condition_samples=null",
]  # fmt: skip
METHODS = ("autograd", "hutchinson", "stein-antithetic", "stein-subspace")
HUTCHINSON_PROBES = 64


def step_overrides(method: str, dim: int, samples: int, chunk: int | None = None) -> list[str]:
    probes = HUTCHINSON_PROBES if method == "hutchinson" else samples
    out = [*STEP_BASE, f"pde.dim={dim}", f"estimator.method={method}", f"estimator.samples={probes}"]
    return out + ([f"estimator.chunk={chunk}"] if chunk else [])


def time_steps(
    args: argparse.Namespace, name: str, overrides: list[str], config_file: str = "configs/quickstart.yaml"
) -> dict:
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    record = launch_ranks(1, tmp / f"{name}.json", args.warmup, args.steps, overrides, args.max_step_seconds,
                          args.memory_limit_gb, config_file)  # fmt: skip
    print(f"{name}: {record.get('median_step_seconds', record.get('skipped'))}", file=sys.stderr, flush=True)
    return {"config": config_file, "overrides": overrides, **record}


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
    ratio = secs[1] / secs[0] if None not in secs else None
    return {"suite": "beyond", "config": config, "runs": runs,
            f"d{max(args.dims)}_over_d{min(args.dims)}": ratio}  # fmt: skip


#: The original code's HJB d = 250 step (conf/hjb/improved-steins.yaml: depth 4 there is 3 hidden
#: layers, tanh, sigma 0.01 for x and t, 2048 samples, 50 + 50 points, boundary weight 500)
#: at width 128, and the same work in dstein: the terminal condition as a loss of the same
#: weight with as many samples, Stein's Laplacian, the squared residual, no attack.
ORIGINAL_WORK = {"dim": 250, "width": 128, "hidden": 3, "samples": 2048, "points": 50, "weight": 500.0, "lr": 2e-4}
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
    import torch

    src = Path(args.original or "")
    if not (src / "src" / "hjb" / "derivative_wrapper.py").is_file():
        print(f"error: --original={args.original!r}: not a checkout of LithiumDA/PINN-without-Stacked-BP "
              "(src/hjb/derivative_wrapper.py missing)", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    sys.path.insert(0, str(src.resolve()))
    from src.hjb.derivative_wrapper import ImprovedSteinsWrapper  # the original code
    from src.hjb.equation import HJBEquation
    from src.model import MLP as OriginalMLP

    from dstein.build import build_trainer
    from dstein.config import load_config
    from dstein.train import train_step

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
        import dstein.estimators.stein as stein

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


def device_agreement(device: str, repeats: int = 16, samples: int = 4096) -> dict:
    """Every method's derivatives on ``device`` (float32) against the CPU in float64, small case.

    Monte Carlo methods draw other noise on another device, so the check is statistical:
    ``repeats`` estimates with different seeds on each side, and the largest
    |mean_device - mean_cpu| / sqrt(se_device^2 + se_cpu^2 + (1e-5 scale)^2) over points and
    quantities (a z-score; about 4 is the largest expected over the ~1000 comparisons, 6 is
    the pass mark). autograd is deterministic: the largest error relative to each quantity's
    scale (float32: about 1e-6)."""
    import torch

    import dstein
    from dstein.estimators import METHODS
    from dstein.models import MLP

    torch.manual_seed(0)
    d, sigma_x, sigma_t = 20, 0.05, 0.05
    ref = MLP(d + 1, 32, 3).double()
    X = torch.cat([torch.randn(16, d, dtype=torch.float64), torch.rand(16, 1, dtype=torch.float64)], 1)
    on_device = (MLP(d + 1, 32, 3).to(device), X.float().to(device))
    on_device[0].load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    needs = ("u", "u_t", "grad", "grad_sq", "lap")
    out = {}
    for method in METHODS:
        runs = 1 if method == "autograd" else repeats
        probes = 64 if method == "hutchinson" else samples

        def draws(model, points, seed0, method=method, runs=runs, probes=probes):
            kw = {} if method == "autograd" else {"samples": probes, "sigma_x": sigma_x}
            est = [dstein.estimate(model, points, method=method, needs=needs, sigma_t=sigma_t, seed=seed0 + r, **kw)
                   for r in range(runs)]  # fmt: skip
            return {q: torch.stack([getattr(e, q).detach().double().cpu() for e in est]) for q in needs}

        cpu, dev = draws(ref, X, 0), draws(*on_device, 1000)
        worst = 0.0
        for q in needs:
            scale = cpu[q].abs().max().item() + 1e-12
            if runs == 1:
                worst = max(worst, ((dev[q] - cpu[q]).abs().max() / scale).item())
                continue
            se2 = cpu[q].var(0) / runs + dev[q].var(0) / runs + (1e-5 * scale) ** 2
            worst = max(worst, ((dev[q].mean(0) - cpu[q].mean(0)).abs() / se2.sqrt()).max().item())
        key = "max_relative_error" if runs == 1 else "max_z"
        limit = 1e-4 if runs == 1 else 6.0
        out[method] = {key: worst, "ok": worst < limit, "repeats": runs, "samples": None if runs == 1 else probes}
        print(f"agreement {method}: {key} = {worst:.3g}", file=sys.stderr, flush=True)
    return out


def suite_gpu(args: argparse.Namespace) -> dict:
    """Device agreement, then training steps per second on the device (see the module doc)."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--suite gpu: CUDA is not available here (use --device cpu for a dry run)")
    args.memory_limit_gb = 0.0  # an address-space limit breaks CUDA's reservations
    agreement = device_agreement(args.device)
    device = [f"run.device={args.device}"]
    runs = {}
    for dim in args.dims:
        name = f"stein-subspace/d={dim}"
        runs[name] = time_steps(args, f"gpu-sub-{dim}", [*step_overrides("stein-subspace", dim, 1024), *device])
    dim = args.dims[0]  # the other methods at the first d (10,000 by default)
    for method in ("autograd", "hutchinson", "stein-antithetic"):
        runs[f"{method}/d={dim}"] = time_steps(args, f"gpu-{method}", [*step_overrides(method, dim, 1024), *device])
    for record in runs.values():
        if "median_step_seconds" in record:
            record["steps_per_second"] = 1 / record["median_step_seconds"]
    return {"suite": "gpu", "device": args.device, "agreement": agreement, "samples": 1024, "runs": runs}


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


ACCURACY_CONFIGS = ("quickstart", "hjb_100", "hjb_250")
#: What a training run's summary contributes to a suite's record.
SUMMARY_KEYS = ("l1_rel", "l2_rel", "grad_l2_rel", "gradient_floor", "baselines", "reference", "method",
                "train_seconds", "steps", "dim", "peak_cuda_memory_mb")  # fmt: skip


def train_runs(jobs: list[tuple[str, str, str, list[str]]], parallel: int, tmp: Path) -> dict[str, dict]:
    """Run ``launch/train.py --config CONFIG OVERRIDES`` for each ``(key, name, config,
    overrides)``, ``parallel`` at a time (one thread each unless the overrides say otherwise),
    in run directory ``tmp/name``: the summary's errors and time, the eval rows of metrics.jsonl
    (step, seconds, errors), the process's peak resident memory, the command and warnings."""
    runs: dict[str, dict] = {}
    pending = list(jobs)
    active: dict[int, tuple[subprocess.Popen, str, Path, list[str]]] = {}
    tmp.mkdir(parents=True, exist_ok=True)
    while pending or active:
        while pending and len(active) < parallel:
            key, name, config, overrides = pending.pop(0)
            run_dir = tmp / name
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
            overrides = [f"run.dir={run_dir}", "eval.plots=false", "checkpoint.resume=never", *overrides]
            cmd = [sys.executable, str(ROOT / "launch/train.py"), "--config", config, *overrides]
            threads = next((o.split("=", 1)[1] for o in overrides if o.startswith("run.threads=")), "1")
            env = dict(os.environ, OMP_NUM_THREADS=threads if threads != "0" else str(os.cpu_count()))
            with open(run_dir.with_suffix(".err"), "w") as err_file:  # a pipe could fill and stall the run
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err_file)
            active[proc.pid] = (proc, key, run_dir, ["launch/train.py", "--config", config, *overrides])
        pid, status, usage = os.wait4(-1, 0)  # the peak memory of this child alone
        if pid not in active:
            continue
        proc, key, run_dir, command = active.pop(pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = run_dir.with_suffix(".err").read_text()
        if proc.returncode:
            runs[key] = {"failed": proc.returncode, "stderr": err[-2000:]}
        else:
            summary = json.loads((run_dir / "summary.json").read_text())
            runs[key] = {k: summary[k] for k in SUMMARY_KEYS if k in summary}
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
            runs[key]["evals"] = [{k: r[k] for k in ("step", "seconds", "l2_rel", "grad_l2_rel") if k in r}
                                  for r in rows if "l2_rel" in r and "step" in r]  # fmt: skip
            runs[key]["peak_memory_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
            runs[key]["command"] = " ".join(command)
            runs[key]["warnings"] = [line for line in err.splitlines() if line.startswith("warning:")]
        print(f"{key}: {runs[key].get('l2_rel', runs[key].get('failed'))}", file=sys.stderr, flush=True)
    return runs


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


#: dstein's methods on the peers' two-body problems (--suite peers): the config as it ships,
#: then the other estimators at equal points and steps; hutchinson's probes are the nearest
#: thing dstein has to STDE's sampled dimensions (16).
PEER_METHODS = {
    "config": [],
    "stein-subspace-32": ["estimator.method=stein-subspace", "estimator.samples=32"],
    "stein-antithetic": ["estimator.method=stein-antithetic", "estimator.samples=8"],
    "hutchinson-16": ["estimator.method=hutchinson", "estimator.samples=16"],
}
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


SUITES = {
    "acceptance": suite_acceptance, "accuracy": suite_accuracy, "data": suite_data, "gpu": suite_gpu,
    "methods": suite_methods, "samples": suite_samples, "scaling": suite_scaling, "beyond": suite_beyond,
    "original": suite_original, "peers": suite_peers,
}  # fmt: skip


def machine() -> dict:
    import torch

    return {
        "host_cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), help="benchmark suite to run")
    parser.add_argument("--out", default=None, help="JSON output file (default: bench-SUITE.json)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--tmp", default="/tmp/dstein-bench", help="scratch folder")
    parser.add_argument("--data-steps", type=int, default=40, help="data suite: steps of d = 10,000 points to write")
    parser.add_argument(
        "--dims",
        type=int,
        nargs="+",
        default=None,
        help="methods: d (default 100 1000 10000 100000); gpu: 10000 100000 1000000; beyond: 1000 100000; peers: 1000",
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods suite: methods")
    parser.add_argument("--device", default="cuda", help="gpu suite: the device to check and time (cpu: dry run)")
    parser.add_argument("--config", default=None, help="beyond suite: the config (default configs/hjb_10k.yaml)")
    parser.add_argument("--configs", nargs="+", default=list(ACCURACY_CONFIGS), help="accuracy suite: configs")
    parser.add_argument("--original", default=None,
                        help="original suite: a checkout of LithiumDA/PINN-without-Stacked-BP")  # fmt: skip
    parser.add_argument("--through-input", action="store_true",
                        help="original suite: dstein perturbs the input itself (an ablation)")  # fmt: skip
    parser.add_argument("--accuracy-methods", nargs="+", default=["config", "autograd"],
                        help="accuracy suite: config (the method the config picks) and/or method names")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="accuracy suite: seeds")
    parser.add_argument("--pdes", nargs="+", default=["sine_gordon", "allen_cahn"], help="peers suite: PDEs")
    parser.add_argument("--peer-methods", nargs="+", choices=sorted(PEER_METHODS), default=list(PEER_METHODS),
                        help="peers suite: methods (config: configs/sine_gordon_1k.yaml as it ships)")  # fmt: skip
    parser.add_argument("--budget-steps", type=int, default=2000, help="peers suite: training steps of each run")
    parser.add_argument("--target-l2", type=float, default=9.4e-3,
                        help="peers suite: the error whose time to reach is reported (STDE's here)")  # fmt: skip
    parser.add_argument("--parallel", type=int, default=2, help="accuracy suite: runs at a time")
    parser.add_argument("--max-step-seconds", type=float, default=60.0,
                        help="skip a configuration whose first step takes longer (0: never)")  # fmt: skip
    parser.add_argument("--memory-limit-gb", type=float, default=16.0,
                        help="address-space limit per benchmark process; a run beyond it is skipped")  # fmt: skip
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", default="configs/quickstart.yaml", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        from dstein.distributed import exit_process

        worker(args.worker, args.warmup, args.steps, args.overrides, args.max_step_seconds, args.worker_config)
        exit_process(0)
    if not args.suite:
        parser.error("--suite is required")
    if args.dims is None:
        default_dims = {"gpu": [10000, 100000, 1000000], "beyond": [1000, 100000], "peers": [1000]}
        args.dims = default_dims.get(args.suite, [100, 1000, 10000, 100000])
    result = {"machine": machine(), **SUITES[args.suite](args)}
    out = Path(args.out or f"bench-{args.suite}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
