"""Fault injection for the tests: inert unless the environment variable ``DSTEIN_FAULT`` is set.

``DSTEIN_FAULT="NAME@N[@RANK][,NAME@N[@RANK]...]"`` arms fault NAME at step N (on every rank,
or only on RANK); the code that can fail calls ``fault(NAME, N, rank)`` at the right moment:

- ``nan-loss@N``: the residual loss of training step N (0-based) becomes NaN;
- ``nan-grad@N``: the residual loss of step N stays finite but its gradient is NaN;
- ``slow-step@N``: step N (its loss, before the backward pass) takes 120 s longer, as a step
  longer than the scheduler's grace period would;
- ``stall-save@N``: rank 0 stops (sleeps) inside the save of the checkpoint after N steps,
  after every file is written and before the commit marker, for a test to kill the job;
- ``fail-save@N``: the save of the checkpoint after N steps fails like a full disk
  (after DeepSpeed wrote its files);
- ``fail-dataset@0``: launch/make_dataset.py fails like a full disk before its file is complete.
"""

from __future__ import annotations

import errno
import os
import sys
import time

import torch

ENV = "DSTEIN_FAULT"
SLOW_STEP_S = 120.0


def armed(name: str, step: int, rank: int = 0) -> bool:
    for item in os.environ.get(ENV, "").split(","):
        parts = item.strip().split("@")
        if parts[0] == name and len(parts) >= 2 and parts[1] == str(step) and parts[2:] in ([], [str(rank)]):
            return True
    return False


def fault(name: str, step: int, rank: int = 0) -> None:
    """Trigger fault ``name`` here if it is armed for ``step`` (and ``rank``)."""
    if not armed(name, step, rank):
        return
    if name == "stall-save":
        print(f"fault: stalling the save of step {step} before its commit marker", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    if name in ("fail-save", "fail-dataset"):
        raise OSError(errno.ENOSPC, f"No space left on device (injected: {name}@{step})")


class _NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def fault_loss(terms: dict[str, torch.Tensor], step: int, rank: int) -> dict[str, torch.Tensor]:
    """The loss terms of a training step, with an armed ``nan-loss`` or ``nan-grad`` applied."""
    if armed("nan-loss", step, rank):
        terms = {**terms, "residual": terms["residual"] * float("nan")}
    if armed("nan-grad", step, rank):
        terms = {**terms, "residual": _NaNGradient.apply(terms["residual"])}
    if armed("slow-step", step, rank):
        print(f"fault: step {step} is slow", file=sys.stderr, flush=True)
        time.sleep(SLOW_STEP_S)
    return terms
