"""Write a collocation/test set to HDF5:
``python launch/make_dataset.py --config configs/NAME.yaml --out FILE.h5 [options] [key=value ...]``.

Training points are the online sampler's for steps 0 .. --steps-1 (default: train.steps),
so ``data.train_file=FILE.h5 data.shuffle=false`` reproduces the online run; test points
(--test-points, default eval.points) carry the ground truth (HJB: Monte Carlo with
--truth-samples samples per point and its standard error). Under a launcher (torchrun,
mpirun, srun, deepspeed) the ranks share the work. The file appears only when complete.
Exit status: 0 done, 2 a user error, 5 the file could not be written (disk full, permissions):
an existing file of that name is left as it was.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dstein.config import load_config
from dstein.distributed import barrier, exit_process
from dstein.errors import ConfigError, DistributedError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("--out", required=True, help="HDF5 file to write")
    parser.add_argument(
        "--steps", type=int, default=None, help="steps of training points (default train.steps; 0: none)"
    )
    parser.add_argument("--test-points", type=int, default=None, help="test points (default eval.points; 0: none)")
    parser.add_argument(
        "--truth-samples",
        type=int,
        default=None,
        help="Monte Carlo samples per test point (default eval.truth_samples)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the config, e.g. pde.dim=250")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config, args.overrides)
        steps = config.train.steps if args.steps is None else args.steps
        test_points = config.eval.points if args.test_points is None else args.test_points
        truth = config.eval.truth_samples if args.truth_samples is None else args.truth_samples
        if steps < 0 or test_points < 0 or truth < 2 or steps + test_points == 0:
            raise ConfigError("--steps and --test-points must be >= 0 (not both 0) and --truth-samples >= 2")
        out = Path(args.out)
        if out.is_dir():
            raise ConfigError(f"--out {out}: is a folder, expected a file name")
        from dstein.data import generate
        from dstein.distributed import init_distributed

        info = init_distributed(timeout_s=config.parallel.timeout_s, device="cpu")
        start = time.perf_counter()
        caught: list[int] = []

        def interrupt(signum: int, frame: object) -> None:  # recorded, acted on between blocks (writer._halt)
            caught.append(signum)

        previous = signal.signal(signal.SIGINT, interrupt)
        try:
            generate(
                config, out, steps=steps, test_points=test_points, truth_samples=truth, rank=info.rank,
                world_size=info.world_size, barrier=barrier, progress=sys.stderr.isatty(), stop=lambda: bool(caught),
            )  # fmt: skip
        finally:
            signal.signal(signal.SIGINT, previous)
    except (ConfigError, DistributedError, ValueError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, permissions: nothing half-written is left as the file
        if args.debug:
            raise
        kept = "is unchanged" if Path(args.out).exists() else "was not created"
        print(f"error: could not write {args.out} ({err}); {args.out} {kept}", file=sys.stderr)
        return 5
    except KeyboardInterrupt:  # Ctrl-C: the parts are removed, the file is written whole or not at all
        kept = "is unchanged" if Path(args.out).exists() else "was not created"
        print(f"interrupted: {args.out} {kept}", file=sys.stderr)
        return 130
    if info.rank == 0:
        seconds = time.perf_counter() - start
        print(f"wrote {out} ({steps} steps of training points, {test_points} test points) in {seconds:.1f}s")
    return 0


if __name__ == "__main__":
    status = main()
    exit_process(status, barrier=status == 0)
