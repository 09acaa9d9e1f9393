"""Errors against ground truth, and the run directory's metrics.jsonl / summary.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


def error_sums(u: torch.Tensor, grad: torch.Tensor, u_true: torch.Tensor, grad_true: torch.Tensor) -> torch.Tensor:
    """Sums over points that the relative errors are made of (they add across ranks)."""
    u, grad = u.double().cpu(), grad.double().cpu()
    u_true, grad_true = u_true.double().cpu(), grad_true.double().cpu()
    e, ge = u - u_true, grad - grad_true
    return torch.stack(
        [
            e.abs().sum(),
            u_true.abs().sum(),
            (e * e).sum(),
            (u_true * u_true).sum(),
            (ge * ge).sum(),
            (grad_true * grad_true).sum(),
        ]
    )


def errors_from_sums(sums: torch.Tensor) -> dict[str, float]:
    """L1 and L2 relative error of the solution, and L2 relative error of its spatial gradient."""
    s = [float(v) for v in sums]
    return {"l1_rel": s[0] / s[1], "l2_rel": (s[2] / s[3]) ** 0.5, "grad_l2_rel": (s[4] / s[5]) ** 0.5}


def relative_errors(
    u: torch.Tensor, grad: torch.Tensor, u_true: torch.Tensor, grad_true: torch.Tensor
) -> dict[str, float]:
    return errors_from_sums(error_sums(u, grad, u_true, grad_true))


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON under a temporary name and rename it: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (only the writing rank opens it)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self._fh = open(path, "a") if enabled else None  # noqa: SIM115 - held open for the run

    def write(self, row: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(row, sort_keys=True) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
