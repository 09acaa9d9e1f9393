"""Errors against ground truth, and what rank 0 writes while training: metrics.jsonl,
progress lines or bar, TensorBoard scalars."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from dstein.files import json_safe, write_text_atomic


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


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (only the writing rank opens it;
    a non-finite number is written as null, which JSON can read).

    ``after``: the step the run starts from. Nothing an earlier start wrote is lost: rows of
    later steps (written by a run that went on past its last checkpoint before it was stopped)
    move to ``metrics.discarded.jsonl``, so that a resumed run's file reads as one
    uninterrupted run; a fresh start (0) over an earlier run's rows keeps them as
    ``metrics.before-TIME.jsonl``. ``note`` says what was moved (rank 0 prints it).
    """

    def __init__(self, path: Path, enabled: bool = True, after: int = 0):
        self.path = path
        self._fh = None
        self.error: str | None = None  # the first write that failed (the loop stops all ranks on it)
        self.note: str | None = None
        if enabled:
            rows, damaged = read_metrics_kept(path) if path.exists() else ([], [])
            keep = [row for row in rows if row.get("step", 0) <= after] if after else []
            moved = [row for row in rows if row.get("step", 0) > after] if after else rows
            if moved and after:
                aside = path.with_name("metrics.discarded.jsonl")
                with open(aside, "a") as fh:
                    fh.write("".join(json.dumps(row, sort_keys=True) + "\n" for row in moved))
                self.note = (f"note: {len(moved)} rows of {path.name} after step {after} (steps the stopped run made "
                             f"past its last checkpoint) moved to {aside.name}")  # fmt: skip
            elif moved:
                aside = path.with_name(f"metrics.before-{time.strftime('%Y%m%dT%H%M%S')}.jsonl")
                os.replace(path, aside)
                self.note = f"note: starting over: the earlier {path.name} ({len(moved)} rows) is kept as {aside.name}"
            if damaged:  # a line cut by a kill mid-write: kept, raw, beside the file
                aside = path.with_name("metrics.discarded.jsonl")
                with open(aside, "a") as fh:
                    fh.write("".join(line + "\n" for line in damaged))
                self.note = (self.note + "; " if self.note else "note: ") + (
                    f"{len(damaged)} unreadable line{'s' if len(damaged) > 1 else ''} of {path.name} (cut by a stop "
                    f"mid-write) moved to {aside.name}"
                )
            if moved or damaged or not path.exists():  # else the rows are the resumed steps': appended to
                write_text_atomic(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in keep))
            self._fh = open(path, "a")  # noqa: SIM115 - held open for the run

    def write(self, row: dict[str, Any]) -> None:
        if self._fh is None or self.error:
            return
        try:
            self._fh.write(json.dumps(json_safe(row), sort_keys=True, allow_nan=False) + "\n")
            self._fh.flush()
        except OSError as err:  # a full disk: reported at the step's end, on every rank alike
            self.error = f"could not write {self.path} ({err})"

    def close(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):  # what could not be written was reported already
                self._fh.close()
            self._fh = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_metrics_kept(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of a metrics file, and the lines that are not JSON objects (a row cut short
    when its writer was killed, bytes of a damaged disk), which ``read_metrics`` refuses."""
    rows, damaged = [], []
    with open(path, errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                damaged.append(line.rstrip("\n"))
    return rows, damaged


class Progress:
    """What rank 0 shows while training: a progress bar on a terminal (step, loss, last
    error, steps per second, ETA), plain log lines every ``every`` steps otherwise (batch
    jobs: no control characters in the log). Other ranks show nothing."""

    def __init__(self, total: int, enabled: bool, every: int, stream: TextIO | None = None, initial: int = 0):
        self.total, self.every, self.enabled, self.initial = total, every, enabled, initial
        self.stream = stream or sys.stdout
        self.start = time.perf_counter()
        self.bar = None
        self.last_error = ""
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, file=self.stream, unit="step", dynamic_ncols=True)

    def update(self, step: int, terms: dict[str, float], errors: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        if errors:
            self.last_error = ""
            if "l2_rel" in errors:  # a test set (none where the PDE knows no solution there)
                self.last_error = f"L2 {errors['l2_rel']:.4f} grad {errors['grad_l2_rel']:.3f}"
            if "process_l2_rel" in errors:  # along the process from the start state
                along = f" process L2 {errors['process_l2_rel']:.4f} grad {errors['process_grad_l2_rel']:.3f}"
                self.last_error += along
            if "start_rel_error" in errors:  # the value at the start state (PDE.start)
                self.last_error = f"{self.last_error} start {errors['start_rel_error']:.2%}".strip()
            elif "start_value" in errors:  # no reference value known there
                self.last_error = f"{self.last_error} start value {errors['start_value']:.6g}".strip()
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {terms['loss']:.3e} {self.last_error}", refresh=False)
            return
        if step % self.every == 0 or step == self.total or errors:
            elapsed = time.perf_counter() - self.start
            rate = (step - self.initial) / elapsed if elapsed > 0 else 0.0
            eta = (self.total - step) / rate if rate > 0 else 0.0
            print(
                f"step {step}/{self.total}  loss {terms['loss']:.3e}  {self.last_error}  "
                f"{rate:.2f} steps/s  ETA {eta:.0f}s",
                file=self.stream, flush=True,
            )  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Scalars:
    """TensorBoard scalars under ``RUN_DIR/tensorboard`` (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool, after: int = 0):
        self.writer = None
        self.folder = run_dir / "tensorboard"
        self.error: str | None = None  # the first write that failed (the loop stops all ranks on it)
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides what an earlier run logged after the starting step
            self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=after + 1)
            self._previous_hook = threading.excepthook
            threading.excepthook = self._thread_failed

    def _thread_failed(self, args: threading.ExceptHookArgs) -> None:
        """TensorBoard writes from a thread of its own: a failed write there (a full disk) is
        noted for the loop to stop on, instead of a traceback on standard error."""
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard"):
            self.error = self.error or f"could not write {self.folder} ({args.exc_value})"
            return
        self._previous_hook(args)

    def add(self, step: int, values: dict[str, float], prefix: str) -> None:
        if self.writer is None or self.error:
            return
        try:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        except OSError as err:  # a full disk: reported at the step's end, on every rank alike
            self.error = f"could not write {self.folder} ({err})"

    def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(OSError):
                self.writer.close()
            self.writer = None
            threading.excepthook = self._previous_hook
