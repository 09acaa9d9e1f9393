"""The run directory belongs to one run at a time: a lock held for the run's lifetime.

Rank 0 creates ``RUN_DIR`` (which shows that it is writable) and holds an exclusive
``flock`` on ``RUN_DIR/.lock``, whose text names the holder (host, pid, SLURM job, start
time). The kernel drops the lock when the process ends however it ends, so a lock file left
by a killed job is recognised as stale: the next start takes it over and says so. A second
run on a directory in use stops before any work with a message naming the holder. (flock
works across nodes on NFSv4 and on Lustre mounted with ``flock``; elsewhere it only guards
one node.)
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from dstein.distributed import from_rank0
from dstein.errors import ConfigError

LOCK_FILE = ".lock"


class RunDirError(ConfigError):
    """The run directory cannot be used: unwritable, or in use by another run."""


def _holder() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
    return f"pid {os.getpid()} on {socket.gethostname()}" + (f" (SLURM job {job})" if job else "") + f" since {since}"


def lock(run_dir: Path) -> tuple[int, str | None]:
    """Take the run directory's lock: the open descriptor (keep it open) and a note when a
    stale lock was taken over. Raises ``RunDirError``."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunDirError(
            f"run.dir={run_dir} cannot be created or written ({err.strerror or err}): choose another run.dir"
        ) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunDirError(
            f"run.dir={run_dir} is in use by {holder}: wait for that run to end or stop it, or choose another run.dir"
        ) from None
    stale = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    os.ftruncate(fd, 0)
    os.pwrite(fd, (_holder() + "\n").encode(), 0)
    return fd, (f"taking over the lock of run.dir={run_dir} left by {stale}, which has ended" if stale else None)


def release(fd: int) -> None:
    """Empty the lock file and let go (an ended process lets go by itself)."""
    os.ftruncate(fd, 0)
    os.close(fd)


def lock_on_rank0(run_dir: Path, rank: int) -> tuple[int | None, str | None]:
    """Rank 0 takes the lock; every rank raises the same ``RunDirError`` if it cannot."""
    result: tuple[int | None, str | None, str | None] = (None, None, None)
    if rank == 0:
        try:
            fd, note = lock(run_dir)
            result = (fd, note, None)
        except RunDirError as err:
            result = (None, None, str(err))
    error = from_rank0(result[2])
    if error:
        raise RunDirError(error)
    return result[0], result[1]
