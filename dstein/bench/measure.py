"""How a benchmark times and measures: ranks that build a trainer and time its training steps
(seconds per step, resident and CUDA memory), whole training runs through launch/train.py
(errors, time, peak memory), and the machine it ran on.

Memory on a CPU: the process's resident set before the first step and its peak over the
steps; step_memory_mb is their difference (what the steps add). On CUDA: peak allocated.
Timings are medians over the timed steps after warm-up steps; ranks synchronise before and
after each timed step.

A rank of ``launch_ranks`` runs this module: ``python -m dstein.bench.measure OUT WARMUP STEPS
MAX_STEP_SECONDS CONFIG -- OVERRIDES``.
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

import torch

from dstein.build import build_trainer
from dstein.config import load_config
from dstein.distributed import barrier, exit_process, free_port
from dstein.train import train_step

ROOT = Path(__file__).resolve().parents[2]


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
        cmd = [sys.executable, "-m", "dstein.bench.measure", str(out), str(warmup), str(steps), str(max_step_seconds),
               config_file, "--", *overrides]  # fmt: skip
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


def time_steps(
    args: argparse.Namespace, name: str, overrides: list[str], config_file: str = "configs/quickstart.yaml"
) -> dict:
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    record = launch_ranks(1, tmp / f"{name}.json", args.warmup, args.steps, overrides, args.max_step_seconds,
                          args.memory_limit_gb, config_file)  # fmt: skip
    print(f"{name}: {record.get('median_step_seconds', record.get('skipped'))}", file=sys.stderr, flush=True)
    return {"config": config_file, "overrides": overrides, **record}


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


def machine() -> dict:

    return {
        "host_cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="one rank of launch_ranks")
    parser.add_argument("out")
    parser.add_argument("warmup", type=int)
    parser.add_argument("steps", type=int)
    parser.add_argument("max_step_seconds", type=float)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    worker(args.out, args.warmup, args.steps, args.overrides, args.max_step_seconds, args.config)
    exit_process(0)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
