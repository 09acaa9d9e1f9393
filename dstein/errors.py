"""The errors a user sees, each with the exit status the entry points give it.

An entry point maps an exception to its status by type (``exit_status``), never by its text:

- 2 ``ConfigError`` (and its kinds: checkpoints, run directories, data files) and
  ``DistributedError``: a bad input, refused before training;
- 3 ``PeerLost``: a collective failed because a peer rank died or stopped answering;
- 4 ``Preempted``: a checkpoint was saved on a preemption signal; the same command continues;
- 5 ``RunStopped``: a fault (non-finite steps, a failed write); the last complete checkpoint is intact.
"""

from __future__ import annotations

from pathlib import Path


class DsteinError(Exception):
    """Base of the errors whose message is written for the user (one line)."""

    exit_status = 1


class ConfigError(DsteinError, ValueError):
    """A user-facing configuration problem; the message is one line, ready to print."""

    exit_status = 2


class DistributedError(DsteinError, RuntimeError):
    """A process layout that cannot work (world size, sample groups); refused before training."""

    exit_status = 2


class PeerLost(DistributedError):
    """A collective failed: a peer rank died or stopped answering within parallel.timeout_s."""

    exit_status = 3


class Preempted(DsteinError):
    """Raised on every rank after the preemption checkpoint is committed."""

    exit_status = 4

    def __init__(self, step: int, path: Path | None, signal_name: str, note: str = "", synced: bool = True):
        where = f"checkpoint {path}" if path else "no checkpoint yet"
        super().__init__(f"preempted by {signal_name} after step {step}: {where}{note}")
        self.step, self.path, self.signal_name = step, path, signal_name
        self.synced = synced  # False: the ranks stopped without meeting (a step was interrupted)


class RunStopped(DsteinError):
    """The run stopped on a fault (non-finite values, a failed write) without touching the
    last complete checkpoint; the message says what happened and where that checkpoint is."""

    exit_status = 5
