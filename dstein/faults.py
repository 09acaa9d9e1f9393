"""Fault injection for the tests: inert unless the environment variable ``DSTEIN_FAULT`` is set.

``DSTEIN_FAULT="NAME@STEP[,NAME@STEP...]"`` arms a named fault at a step; the code that can
fail calls ``fault(NAME, step)`` at the right moment. Faults:

- ``stall-save@N``: rank 0 stops (sleeps) inside the save of the checkpoint after step N,
  after every file is written and before the commit marker, so that a test can kill the job
  in the middle of a save.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "DSTEIN_FAULT"


def armed(name: str, step: int) -> bool:
    spec = os.environ.get(ENV, "")
    return any(item.strip() == f"{name}@{step}" for item in spec.split(",") if item.strip())


def fault(name: str, step: int) -> None:
    """Trigger fault ``name`` if it is armed for ``step``."""
    if not armed(name, step):
        return
    if name == "stall-save":
        print(f"fault: stalling the save of step {step} before its commit marker", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
