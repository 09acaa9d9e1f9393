"""A real SLURM cluster for the tests: the one already running here, or a single-node cluster
on loopback started with slurm/local/up.sh (root, Debian packages) and stopped afterwards;
and a cluster of two nodes in network namespaces (slurm/local/multinode-up.sh).

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


def job_field(job: str, name: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30,
                         env=env).stdout  # fmt: skip
    match = re.search(rf"\b{name}=(\S+)", out)
    return match.group(1) if match else ""


def wait_job(job: str, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    """Poll until the job leaves the queue (requeues included); return its final state.
    ``env``: the clients' environment (another cluster's SLURM_CONF)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=30, env=env)
        if not out.stdout.strip():
            return job_field(job, "JobState", env)
        time.sleep(0.5)
    subprocess.run(["scancel", job], timeout=30, env=env)
    raise TimeoutError(f"job {job} still queued after {timeout} s")


MULTI_STATE = Path(os.environ.get("DSTEIN_SLURM_MULTI_STATE", "/tmp/dstein-slurm-multi"))


def multinode_cluster(nodes: int = 2):
    """Generator for a session fixture: a cluster of ``nodes`` SLURM nodes, each in its own
    network and UTS namespace (slurm/local/multinode-up.sh, root only); yields the
    environment its clients need (SLURM_CONF), and removes every namespace, link and daemon
    afterwards, also when a test failed."""
    if os.geteuid() != 0:
        unavailable("a multi-node cluster in network namespaces (slurm/local/multinode-up.sh) needs root")
    if not shutil.which("ip") or not shutil.which("nsenter"):
        unavailable("ip (iproute2) and nsenter (util-linux) are needed for the multi-node harness")
    up = subprocess.run(["bash", str(ROOT / "slurm/local/multinode-up.sh"), str(nodes)], capture_output=True,
                        text=True, timeout=600)  # fmt: skip
    try:
        if up.returncode != 0:
            unavailable(f"slurm/local/multinode-up.sh failed: {(up.stdout + up.stderr)[-2000:]}")
        yield {"SLURM_CONF": str(MULTI_STATE / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(ROOT / "slurm/local/multinode-down.sh")], capture_output=True, timeout=300)
