"""The run directory belongs to one run at a time: a lock held for the run's lifetime.

Rank 0 creates ``RUN_DIR`` (which shows that it is writable) and holds an exclusive
``flock`` on ``RUN_DIR/.lock``, whose text names the holder (host, pid, SLURM job, start
time). The kernel drops the lock when the process ends however it ends, so a lock file left
by a killed job is recognised as stale: the next start takes it over and says so. A second
run on a directory in use stops before any work with a message naming the holder. The
checkpoint folder (``checkpoint.dir``, by default ``RUN_DIR/checkpoints``) is locked the same
way, wherever it is, so that no other run can write or prune it: not one with its own run
directory and ``checkpoint.dir`` pointing into this one's. (flock works across nodes on NFSv4 and on Lustre
mounted with ``flock``; elsewhere it only guards one node.)

A run that fails before it wrote anything leaves no trace: a directory this run created and
that holds only the lock is removed again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from dstein.distributed import from_rank0
from dstein.errors import ConfigError

LOCK_FILE = ".lock"


class RunDirError(ConfigError):
    """The run directory cannot be used: unwritable, or in use by another run."""


@dataclass
class Lock:
    """A held lock: its descriptor, the folder, whether this run created the folder, and a
    note when a stale lock was taken over."""

    fd: int
    folder: Path
    created: bool
    note: str | None = None


def _holder() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
    return f"pid {os.getpid()} on {socket.gethostname()}" + (f" (SLURM job {job})" if job else "") + f" since {since}"


def lock(folder: Path, option: str = "run.dir") -> Lock:
    """Take the folder's lock (keep ``Lock.fd`` open). Raises ``RunDirError``, naming ``option``."""
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunDirError(
            f"{option}={folder} cannot be created or written ({err.strerror or err}): choose another {option}"
        ) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunDirError(
            f"{option}={folder} is in use by {holder}: wait for that run to end or stop it, or choose another {option}"
        ) from None
    stale = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (_holder() + "\n").encode(), 0)
    except OSError as err:  # a full disk: no run can write its results there
        os.close(fd)
        raise RunDirError(
            f"{option}={folder} cannot be written ({err.strerror or err}): free space there or choose another {option}"
        ) from err
    note = f"taking over the lock of {option}={folder} left by {stale}, which has ended" if stale else None
    return Lock(fd, folder, created, note)


def release(held: Lock, clean: bool = False) -> None:
    """Empty the lock file and let go (an ended process lets go by itself). ``clean``: the run
    wrote nothing; a folder it created that holds only the lock is removed."""
    with contextlib.suppress(OSError):
        os.ftruncate(held.fd, 0)
    os.close(held.fd)
    if clean and held.created and [p.name for p in held.folder.iterdir()] == [LOCK_FILE]:
        with contextlib.suppress(OSError):
            (held.folder / LOCK_FILE).unlink()
            held.folder.rmdir()


def lock_on_rank0(folder: Path, rank: int, option: str = "run.dir") -> Lock | None:
    """Rank 0 takes the lock; every rank raises the same ``RunDirError`` if it cannot."""
    result: tuple[Lock | None, str | None] = (None, None)
    if rank == 0:
        try:
            result = (lock(folder, option), None)
        except RunDirError as err:
            result = (None, str(err))
    error = from_rank0(result[1])
    if error:
        raise RunDirError(error)
    return result[0]
