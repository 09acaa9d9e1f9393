"""Preemption: SIGTERM, SIGINT (Ctrl-C) and ``checkpoint.signal`` set a flag that the ranks
agree on once per step; a second signal (or ``checkpoint.deadline_s``) stops a long step at
once. One that arrived while the rank was starting (``dstein.early``) counts as received."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import torch

from dstein import early
from dstein.distributed import max_values


class Interrupted(Exception):
    """A second preemption signal, or checkpoint.deadline_s after the first, arrived in the
    middle of a step (raised from the signal handler, outside ``Preemption.critical``)."""


class Preemption:
    """SIGTERM, SIGINT and ``checkpoint.signal`` set a flag; ``agreed`` all-reduces it once per
    step (and once before the first: a signal caught during start-up stops the run there).

    A step longer than the scheduler's grace period (SLURM's KillWait, 30 s by default) would
    be killed before the step boundary: a second signal, or ``deadline_s`` seconds after the
    first, raises ``Interrupted`` at once instead, except inside ``critical()`` (the
    optimizer update, a checkpoint save), where it waits for the section's end."""

    def __init__(self, signal_name: str, deadline_s: float = 0.0):
        self.received: str | None = None
        self.deadline_s = deadline_s
        self._critical = 0
        self._pending = False
        self._previous: dict[int, Any] = {}
        names = ["SIGTERM", "SIGINT"] + ([signal_name] if signal_name not in ("none", "SIGTERM") else [])
        for name in names:
            sig = getattr(signal, name)
            previous = signal.signal(sig, self._handle)
            # after training a signal acts as it would without dstein, not as start-up's recorder
            default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            self._previous[sig] = default if early.is_recorder(previous) else previous
        if deadline_s:
            self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._urgent)
        caught = early.release(tuple(names))  # one that came while starting, now ours
        if caught is not None:
            self._handle(getattr(signal, caught), None)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name  # a flag: the loop saves at the step boundary
            if self.deadline_s:
                signal.setitimer(signal.ITIMER_REAL, self.deadline_s)
            return
        self._urgent(signum, frame)

    def _urgent(self, signum: int, frame: Any) -> None:
        if self._critical:
            self._pending = True
            return
        raise Interrupted(signal.Signals(signum).name)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A section that an urgent stop must not cut short (it is raised at its end)."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if self._pending and not self._critical:
            self._pending = False
            raise Interrupted("SIGTERM")

    def agreed(self, group: Any = None, *flags: bool) -> tuple[bool, ...]:
        """Once per step, every rank's view: whether any rank received a signal, then the
        same for each of ``flags`` (one all-reduce for all)."""
        values = torch.tensor([1.0 if self.received else 0.0, *(1.0 if f else 0.0 for f in flags)])
        return tuple(bool(v > 0) for v in max_values(values, group).tolist())

    def restore(self) -> None:
        if self.deadline_s:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
