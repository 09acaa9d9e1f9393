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
  floor    the step's fixed cost: steps per second of the training loop (launch/train.py,
           --budget-steps steps, --rounds rounds alternating over the configs) for
           configs/sine_gordon_1k.yaml with almost no arithmetic (d = 4, width 16, 4 + 2
           points), the same at d = 100 and 1000 as it ships, and the quickstart; with --stde
           (and --stde-python), STDE's own script after each two-body config, on the same
           coefficients (dstein/bench/stde_shim.py).
  gpu      on --device (cuda): every method's derivatives there in float32 against CPU
           float64 on a small case (HJB d = 20, width 32; Monte Carlo methods: 16 repeats
           on each side, largest z-score of the difference of means; autograd: relative
           error), then HJB training steps with stein-subspace at d = 10^4, 10^5, 10^6
           (width 128, depth 4, 50 + 50 points, 1024 samples; --dims to change) and, at
           the first of --dims, with the other methods. launch/gpu_check.sh runs it on a lent GPU.

How each is measured: dstein/bench/measure.py (the suites live beside it, one module per
concern). Quote ratios from one run: shared machines are noisy.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dstein.bench.catalog import ACCURACY_CONFIGS, FLOOR, METHODS, PEER_METHODS

#: suite -> (module of dstein.bench, function): imported once chosen (torch and DeepSpeed load
#: only for a suite, not for --help)
SUITES = {
    "acceptance": ("speed", "suite_acceptance"), "accuracy": ("peers", "suite_accuracy"),
    "beyond": ("speed", "suite_beyond"), "data": ("data", "suite_data"), "floor": ("speed", "suite_floor"),
    "gpu": ("gpu", "suite_gpu"), "methods": ("speed", "suite_methods"), "original": ("peers", "suite_original"),
    "peers": ("peers", "suite_peers"), "samples": ("speed", "suite_samples"), "scaling": ("speed", "suite_scaling"),
}  # fmt: skip


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
    parser.add_argument("--budget-steps", type=int, default=2000, help="peers, floor: training steps of each run")
    parser.add_argument("--rounds", type=int, default=2, help="floor suite: rounds over its configs, alternating")
    parser.add_argument("--floor", nargs="+", choices=list(FLOOR), default=list(FLOOR),
                        help="floor suite: its configs")  # fmt: skip
    parser.add_argument("--stde", default=None,
                        help="floor suite: STDE's sine_gordon.py, run beside the two-body configs")  # fmt: skip
    parser.add_argument("--stde-python", default="python3", help="floor suite: the interpreter with STDE's jax")
    parser.add_argument("--target-l2", type=float, default=9.4e-3,
                        help="peers suite: the error whose time to reach is reported (STDE's here)")  # fmt: skip
    parser.add_argument("--parallel", type=int, default=2, help="accuracy suite: runs at a time")
    parser.add_argument("--max-step-seconds", type=float, default=60.0,
                        help="skip a configuration whose first step takes longer (0: never)")  # fmt: skip
    parser.add_argument("--memory-limit-gb", type=float, default=16.0,
                        help="address-space limit per benchmark process; a run beyond it is skipped")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.suite:
        parser.error("--suite is required")
    if args.dims is None:
        default_dims = {"gpu": [10000, 100000, 1000000], "beyond": [1000, 100000], "peers": [1000]}
        args.dims = default_dims.get(args.suite, [100, 1000, 10000, 100000])
    from dstein.bench.measure import machine

    module, function = SUITES[args.suite]
    suite = getattr(importlib.import_module(f"dstein.bench.{module}"), function)
    result = {"machine": machine(), **suite(args)}
    out = Path(args.out or f"bench-{args.suite}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
