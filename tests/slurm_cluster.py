"""A real SLURM cluster for the tests: the one already running here, or a single-node cluster
on loopback started with slurm/local/up.sh (root, Debian packages) and stopped afterwards.

Without root or packages the SLURM tests are skipped, unless DSTEIN_REQUIRE_SLURM=1 (set by
.ci/run) turns that into a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def node_idle() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "idle" in out.stdout.split()


def unavailable(reason: str) -> None:
    if os.environ.get("DSTEIN_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM required (DSTEIN_REQUIRE_SLURM=1) but {reason}")
    pytest.skip(reason)


def cluster():
    """Generator for a session fixture: yields once a node is idle."""
    if node_idle():
        yield
        return
    if os.geteuid() != 0:
        unavailable("no idle SLURM node, and starting one (slurm/local/up.sh) needs root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        unavailable("no idle SLURM node, and neither SLURM nor apt-get is installed")
    out = subprocess.run(["bash", str(ROOT / "slurm/local/up.sh")], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        unavailable(f"slurm/local/up.sh failed: {(out.stdout + out.stderr)[-2000:]}")
    try:
        yield
    finally:
        subprocess.run(["bash", str(ROOT / "slurm/local/down.sh")], capture_output=True, timeout=120)


def job_field(job: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    match = re.search(rf"\b{name}=(\S+)", out)
    return match.group(1) if match else ""


def wait_job(job: str, timeout: float = 600) -> str:
    """Poll until the job leaves the queue (requeues included); return its final state."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=30)
        if not out.stdout.strip():
            return job_field(job, "JobState")
        time.sleep(0.5)
    subprocess.run(["scancel", job], timeout=30)
    raise TimeoutError(f"job {job} still queued after {timeout} s")
