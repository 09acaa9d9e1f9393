"""On a device (a lent GPU): every method's derivatives against the CPU in float64, then
training steps per second there (launch/gpu_check.sh)."""

from __future__ import annotations

import argparse
import sys

import torch

from dstein.bench.measure import time_steps
from dstein.bench.speed import step_overrides
from dstein.estimators import METHODS, estimate
from dstein.models import MLP


def device_agreement(device: str, repeats: int = 16, samples: int = 4096) -> dict:
    """Every method's derivatives on ``device`` (float32) against the CPU in float64, small case.

    Monte Carlo methods draw other noise on another device, so the check is statistical:
    ``repeats`` estimates with different seeds on each side, and the largest
    |mean_device - mean_cpu| / sqrt(se_device^2 + se_cpu^2 + (1e-5 scale)^2) over points and
    quantities (a z-score; about 4 is the largest expected over the ~1000 comparisons, 6 is
    the pass mark). autograd is deterministic: the largest error relative to each quantity's
    scale (float32: about 1e-6)."""

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
            est = [estimate(model, points, method=method, needs=needs, sigma_t=sigma_t, seed=seed0 + r, **kw)
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
