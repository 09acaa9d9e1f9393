"""Start real CPU ranks (gloo) for tests: directly with the torchrun-style environment, or
through a launcher command."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env(threads: int = 1) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    env["OMP_NUM_THREADS"] = str(threads)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
    env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    return env


def spawn_ranks(
    args: list[str], world: int, port: int | None = None, env: dict[str, str] | None = None
) -> list[subprocess.Popen]:
    """``world`` processes of ``python args...`` with RANK/WORLD_SIZE/MASTER_* set (and ``env``)."""
    port = port or free_port()
    procs = []
    extra = env or {}
    for rank in range(world):
        env = {**base_env(), **extra}
        env.update(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append((proc.returncode, out, err))
    return results


def run_command(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=timeout)


def train_command(config: str, *overrides: str) -> list[str]:
    """``python launch/train.py --config CONFIG overrides...`` (one process)."""
    return [sys.executable, "launch/train.py", "--config", config, *overrides]
