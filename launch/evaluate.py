"""Re-evaluate a finished run: ``python launch/evaluate.py --run RUN_DIR [--test-file F.h5] [--samples N]
[--out DIR] [--control [--paths N] [--steps K]] [--consistency N]``.

Loads the run's resolved config.yaml and final model (model.pt), computes the test errors
exactly as training did (same test set and noise unless --test-file / --samples change
them), prints a table beside the baselines (best constant, best function of t alone,
condition value everywhere, the best constant under a hard constraint) and the gradient
floor, the same for the test set along the process from the start state (PDEs with one),
and with --control the closed-loop cost of the learned feedback (PDEs that are control
problems, hjb: dstein/control.py), with --consistency N the Feynman-Kac consistency value of
u(0, x0) from N states along the process (dstein/consistency.py);
writes RUN_DIR/eval.json and redraws RUN_DIR/plots (or eval.json and plots/ in --out DIR:
a run directory that cannot be written, read-only or shared, is refused before any work
unless --out says where).
Exit status: 0 done, 2 a user error (missing run directory, model or file; a config.yaml cut
short; nowhere to write).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dstein.config import ConfigError
from dstein.data import DataFileError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory (run.dir of the training run)")
    parser.add_argument("--test-file", default=None, help="HDF5 file with a test set (default: the run's own)")
    parser.add_argument("--samples", type=int, default=None, help="samples per test point for the smoothed model")
    parser.add_argument("--out", default=None, help="folder for eval.json and plots/ (default: the run directory)")
    parser.add_argument("--at", default=None, metavar="FILE",
                        help="print u and |grad u| at the points of FILE (.npy, or text with one point a "
                             "row: x_1 .. x_d, then t if the PDE has time) instead of the test set")  # fmt: skip
    parser.add_argument("--control", action="store_true",
                        help="simulate the closed loop of the learned feedback control (hjb): its cost, the gap to "
                             "u(0, x0), the uncontrolled cost")  # fmt: skip
    parser.add_argument("--paths", type=int, default=None,
                        help="--control: paths (default eval.control_paths or 1000)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None,
                        help="--control: time steps, even (default eval.control_steps)")  # fmt: skip
    parser.add_argument("--consistency", type=int, default=0, metavar="N",
                        help="E[g(X_T) + int f] with the model frozen in f, from N states along the process, beside "
                             "the model's u(0, x0) (PDEs with a forward process)")  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.samples is not None and args.samples < 1:
        parser.error("--samples must be >= 1")
    if args.paths is not None and args.paths < 2:
        parser.error("--paths must be >= 2")
    if args.steps is not None and (args.steps < 2 or args.steps % 2):
        parser.error("--steps must be even and >= 2")
    if args.consistency < 0 or args.consistency == 1:
        parser.error("--consistency must be >= 2 (states along the process)")
    if args.at is not None:
        return at_points(args.run, args.at, args.debug)
    try:
        from dstein.report import evaluate_run

        result = evaluate_run(args.run, args.test_file, args.samples, args.out, args.control, args.paths, args.steps,
                              args.consistency)  # fmt: skip
    except (ConfigError, DataFileError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: eval.json and the plots are written whole or not at all
        print("interrupted: eval.json and the plots are each written whole or not at all", file=sys.stderr)
        return 130
    if "l2_rel" in result:  # no test set where the PDE knows no solution away from its references
        table(result, "", result["baselines"])
    if "process_baselines" in result:  # the second test set: along the process from the start state
        print(f"along the process from the start state ({result['process_points']} points):")
        table(result, "process_", result["process_baselines"])
    if "start_reference" in result:  # the value at the PDE's start state, beside its reference
        print(f"{result['start_name']}: model {result['start_value']:.6f}, reference {result['start_reference']:.6f} "
              f"({result['start_source']}): {result['start_rel_error']:.3%} off")  # fmt: skip
    elif "start_value" in result:
        print(f"{result['start_name']}: model {result['start_value']:.6f} ({result['start_source']})")
    for name, base in result.get("start_baselines", {}).items():  # simpler problems' values there
        off = f": {base['rel_error']:.3%} off" if "rel_error" in base else ""
        print(f"  baseline {name}: {base['value']:.6f} +- {base['se']:.1e} ({base['what']}){off}")
    if result.get("control"):
        from dstein.control import describe

        print(describe(result["control"]))
    if result.get("consistency"):
        from dstein.consistency import describe as describe_consistency

        print(describe_consistency(result["consistency"]))
    where = Path(args.out or args.run) / "eval.json"
    print(f"test points {result.get('test_points', 0)}, eval samples {result['eval_samples']}; wrote {where}")
    return 0


def table(result: dict, prefix: str, baselines: dict) -> None:
    """The model's errors (keys ``prefix + l1_rel`` ...) beside the baselines, and the gradient floor."""
    names = list(baselines)
    widths = [max(17, len(name) + 2) for name in names]
    print(f"{'metric':<14}{'model':>12}" + "".join(f"{name:>{w}}" for name, w in zip(names, widths, strict=True)))
    for key in ("l1_rel", "l2_rel", "grad_l2_rel"):
        row = "".join(f"{baselines[name][key]:>{w}.6f}" for name, w in zip(names, widths, strict=True))
        print(f"{key:<14}{result[prefix + key]:>12.6f}{row}")
    if prefix + "gradient_floor" in result:
        print(f"{'gradient_floor':<14}{result[prefix + 'gradient_floor']:>12.6f}  (the gradient error no training of "
              "this first layer can go below)")  # fmt: skip


def at_points(run: str, path: str, debug: bool = False) -> int:
    """``--at FILE``: the trained solution (``dstein.load``) at the file's points."""
    import numpy as np

    try:
        from dstein.solution import load

        try:
            rows = np.load(path) if path.endswith(".npy") else np.loadtxt(path, ndmin=2)
        except (OSError, ValueError) as err:
            raise ConfigError(f"--at {path}: cannot be read as points ({str(err).splitlines()[0]})") from err
        solution = load(run)
        rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
        width = solution.dim + int(solution.time_dependent)
        if rows.shape[1] != width:
            raise ConfigError(f"--at {path}: rows of {rows.shape[1]} numbers, expected {width} (x_1 .. x_d"
                              f"{', then t' if solution.time_dependent else ''})")  # fmt: skip
        x = rows[:, : solution.dim]
        t = rows[:, solution.dim] if solution.time_dependent else None
        u, grad = solution.u(x, t), solution.grad(x, t)
    except (ConfigError, ValueError) as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{'point':>6} {'u':>14} {'|grad u|':>14}")
    for i, (value, g) in enumerate(zip(u.tolist(), grad.norm(dim=1).tolist(), strict=True)):
        print(f"{i:>6} {value:>14.6f} {g:>14.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
