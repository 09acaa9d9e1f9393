"""Train a PINN: ``python launch/train.py --config configs/NAME.yaml [key=value ...]``.

Overrides are Hydra overrides (``train.steps=3``, ``estimator.method=autograd``). Works
the same under every launcher: plain python, ``deepspeed [--num_gpus N]``, ``torchrun
--nproc_per_node N``, ``mpirun -np N`` and ``srun`` (see dstein/distributed.py).

Resumes by itself: with ``checkpoint.resume=auto`` (the default) the same command starts
fresh or continues from the newest complete checkpoint in ``RUN_DIR/checkpoints``.

Exit status: 0 done; 2 a user error (config, file, layout, unusable checkpoint); 3 a lost
peer rank; 4 preempted (SIGTERM or ``checkpoint.signal``): a checkpoint was saved and the same
command continues the run, so a batch script requeues the job on 4; 5 stopped on a fault
(non-finite loss or gradient, a checkpoint that could not be written), the last complete
checkpoint untouched.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dstein import early

if __name__ == "__main__":  # before anything slow: a signal while the rank starts is caught (exit 4);
    early.install()  # not when imported (a test calling main() keeps its process's own handlers)

import argparse

from dstein.config import load_config, to_yaml
from dstein.distributed import exit_process, this_rank
from dstein.errors import ConfigError, DistributedError, DsteinError, Preempted, RunStopped

#: Whether every rank ended at the same point (then they wait for each other before exiting).
SYNCED = True


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="Train a Gaussian-smoothed PINN with Stein derivative estimators.",
        epilog="Example: python launch/train.py --config configs/quickstart.yaml train.steps=100",
    )
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    # the deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.steps=3")
    args, unknown = parser.parse_known_args(argv)
    stray = [a for a in unknown if a.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    return args, args.overrides + unknown


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config, overrides)
        if args.print_config:
            print(to_yaml(config), end="")
            return 0
        from dstein.train import run  # imports torch and DeepSpeed: not for --help or a bad config

        summary = run(config)
    except (DsteinError, ValueError) as err:
        if args.debug and not isinstance(err, Preempted):
            raise
        status = getattr(err, "exit_status", ConfigError.exit_status)  # a ValueError: a bad value
        if isinstance(err, Preempted) and not err.synced:
            global SYNCED
            SYNCED = False
        if isinstance(err, Preempted):
            if this_rank() == 0:
                print(f"{err}; exit {status}: run the same command to continue", flush=True)
        elif isinstance(err, RunStopped):  # every rank stopped alike: rank 0 says why
            if this_rank() == 0:
                print(f"error: {err}", file=sys.stderr, flush=True)
        else:
            print(f"error: {err}", file=sys.stderr, flush=isinstance(err, DistributedError))
        return status
    if this_rank() != 0:
        return 0
    start = ""
    if "start_reference" in summary:  # the value at the PDE's start state, what a control user asks first
        start = (f"{summary['start_name']} {summary['start_value']:.4f} (reference {summary['start_reference']:.4f}, "
                 f"{summary['start_rel_error']:.2%} off)  ")  # fmt: skip
    elif "start_value" in summary:  # no reference value known there
        start = f"{summary['start_name']} {summary['start_value']:.6g} (no reference)  "
    if "process_l2_rel" in summary:  # the test set along the process from the start state
        start += (f"along the process: L2 rel {summary['process_l2_rel']:.4f} grad "
                  f"{summary['process_grad_l2_rel']:.4f}  ")  # fmt: skip
    test = (f"L1 rel {summary['l1_rel']:.4f}  L2 rel {summary['l2_rel']:.4f}  grad L2 rel "
            f"{summary['grad_l2_rel']:.4f}  ") if "l2_rel" in summary else ""  # fmt: skip
    print(f"done: {test}{start}in {summary['wall_seconds']:.1f}s; run directory: {Path(config.run.dir).resolve()}")
    for name, base in summary.get("start_baselines", {}).items():  # simpler problems' values at the start state
        off = f", {base['rel_error']:.2%} off" if "rel_error" in base else ""
        print(f"  beside it, baseline {name}: {base['value']:.6g} ({base['what']}{off})")
    return 0


if __name__ == "__main__":
    status = main()
    exit_process(status, barrier=SYNCED and status in (0, 4, 5))  # every rank stopped at the same point
