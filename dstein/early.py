"""Signals caught from the first line of an entry point, before torch and DeepSpeed load.

A preemption signal that arrives while a rank starts (imports, DeepSpeed's op build, the
rendezvous, resuming: seconds to minutes) would otherwise meet Python's defaults: SIGUSR1
kills the process (exit 138, so SLURM's ``--signal=USR1`` on a job that starts late is not
requeued) and Ctrl-C prints a KeyboardInterrupt traceback. ``install`` records the first one
instead; ``Preemption`` (dstein/checkpoint/preemption.py) takes it over when training
begins, so the run stops before its first step with exit 4 like any preempted run. A
recorded signal that the config does not treat as preemption is re-raised with its default
action then. This module imports nothing but the standard library.
"""

from __future__ import annotations

import signal
from typing import Any

#: Caught from the start: SIGTERM and SIGINT always preempt, SIGUSR1 and SIGUSR2 are the
#: usual ``checkpoint.signal`` values (SIGUSR1 the default).
EARLY_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")

_received: list[str] = []


def _record(signum: int, frame: Any) -> None:
    if not _received:
        _received.append(signal.Signals(signum).name)


def install() -> None:
    """Record the first of EARLY_SIGNALS from now on (main thread only)."""
    for name in EARLY_SIGNALS:
        signal.signal(getattr(signal, name), _record)


def received() -> str | None:
    """The name of the first signal recorded since ``install``, if any."""
    return _received[0] if _received else None


def is_recorder(handler: Any) -> bool:
    """Whether ``handler`` (as ``signal.signal`` returned it) is this module's recorder."""
    return handler is _record


def release(taken: tuple[str, ...]) -> str | None:
    """Hand the signals over: the recorded one if it is in ``taken`` (it preempts the run);
    every other early signal goes back to its default action, and a recorded one that is not
    taken is raised again now with that action."""
    name = received()
    for other in EARLY_SIGNALS:
        if other not in taken and signal.getsignal(getattr(signal, other)) is _record:
            signal.signal(getattr(signal, other), signal.SIG_DFL if other != "SIGINT" else signal.default_int_handler)
    _received.clear()
    if name is not None and name not in taken:
        signal.raise_signal(getattr(signal, name))
        return None
    return name
