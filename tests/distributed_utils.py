"""Start real CPU ranks (gloo) for tests: directly with the torchrun-style environment, or
through a launcher command."""

from __future__ import annotations

import contextlib
import importlib.util
import io
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


def _entry_point(script: str):
    """The ``main`` of launch/SCRIPT, loaded once per process (launch/ is no package)."""
    name = f"_dstein_launch_{Path(script).stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "launch" / script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].main


def run_here(script: str, *args: str) -> subprocess.CompletedProcess:
    """``python launch/SCRIPT ARGS`` as its ``main`` in this process, from the repository root:
    its exit status and what it printed, as ``run_command`` gives them.

    For one-rank runs whose process boundary the test does not check (no signal, kill or
    environment of its own): a new interpreter imports torch, DeepSpeed and torch._dynamo
    again, 3 to 4 s of a core per start, about as long as a tiny run itself.
    """
    import torch  # the settings a run makes for its process (run.threads, run.matmul_precision), put back

    out, err = io.StringIO(), io.StringIO()
    cwd, threads, precision = os.getcwd(), torch.get_num_threads(), torch.get_float32_matmul_precision()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = _entry_point(script)(list(args))
            except SystemExit as exit_:  # argparse's refusals, as the process would end
                status = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)
    return subprocess.CompletedProcess([script, *args], status, out.getvalue(), err.getvalue())
