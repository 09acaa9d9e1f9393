"""Benchmarks that write JSON: ``python launch/bench.py --suite NAME [--out FILE.json]``.

Suites:
  data     HDF5: write d = 10,000 training points (--data-steps steps of 50 + 50) and read
           them back in order and shuffled (points per second); generate the HJB d = 250
           test set (1000 points, 20,000 Monte Carlo samples each) and report its largest
           standard error.
  scaling  strong scaling of sample sharding: the same HJB training step (d = 1000, 4096
           samples, width 128, depth 4, 50 + 50 points) on 1 rank and on 2 ranks, one thread
           per rank, CPU gloo; reports seconds per step (median) and the speed-up.

Timings are medians over the timed steps after warm-up steps; ranks synchronise before
and after each timed step. Quote ratios from one run: shared machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(out: str, warmup: int, steps: int, overrides: list[str]) -> None:
    """One rank: build the trainer from the environment's launcher and time training steps."""
    import torch
    import torch.distributed as dist

    from dstein.config import load_config
    from dstein.train import build_trainer, train_step

    config = load_config(ROOT / "configs/quickstart.yaml", [*overrides, "run.dir=/tmp/dstein-bench"])
    tr = build_trainer(config)
    times = []
    for step in range(warmup + steps):
        dist.barrier()
        start = time.perf_counter()
        train_step(tr, step)
        dist.barrier()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    if tr.info.rank == 0:
        result = {
            "world_size": tr.info.world_size,
            "threads_per_rank": torch.get_num_threads(),
            "step_seconds": times,
            "median_step_seconds": statistics.median(times),
        }
        Path(out).write_text(json.dumps(result))


def launch_ranks(world: int, out: Path, warmup: int, steps: int, overrides: list[str]) -> dict:
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")  # fmt: skip
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            str(out),
            "--warmup",
            str(warmup),
            "--steps",
            str(steps),
            "--",
            *overrides,
        ]
        procs.append(
            subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        )
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"bench rank failed ({proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.read_text())


def suite_scaling(args: argparse.Namespace) -> dict:
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    runs = {w: launch_ranks(w, tmp / f"scaling-{w}.json", args.warmup, args.steps, SCALING_OVERRIDES) for w in (1, 2)}
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


SUITES = {"data": suite_data, "scaling": suite_scaling}


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
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        from dstein.distributed import exit_process

        worker(args.worker, args.warmup, args.steps, args.overrides)
        exit_process(0)
    if not args.suite:
        parser.error("--suite is required")
    result = {"machine": machine(), **SUITES[args.suite](args)}
    out = Path(args.out or f"bench-{args.suite}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
