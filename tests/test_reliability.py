"""Reliability, round two, with real processes: a stop in the middle of a long step, a shared
checkpoint folder, a full disk (a real tmpfs, as root), a damaged final model."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed_utils import ROOT, base_env
from test_checkpoint import CONFIG, STEPS, TINY, finish, last_step, losses, preempt, start, train_here

from dstein.checkpoint import scan, step_dir

WORLDS = [1, pytest.param(2, marks=pytest.mark.ranks)]

pytestmark = pytest.mark.slow

SLOW = {"DSTEIN_FAULT": "slow-step@25"}  # step 25 takes 120 s longer than the grace period


def wait_for_step(run_dir: Path, procs: list[subprocess.Popen], step: int) -> None:
    deadline = time.time() + 240
    while last_step(run_dir) < step:
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.05)
    time.sleep(1.0)  # now inside the slow step


def signal_all(procs: list[subprocess.Popen], times: int = 1) -> None:
    for _ in range(times):
        for p in procs:
            p.send_signal(signal.SIGTERM)
        time.sleep(0.3)


def finish_within(procs: list[subprocess.Popen], seconds: float, status: int) -> str:
    begin = time.time()
    out = finish(procs, status=status)
    assert time.time() - begin < seconds, time.time() - begin
    return out


def test_a_second_sigterm_mid_step_saves_the_state_before_it_and_resumes_bit_exact(tmp_path, straight):
    procs = start(tmp_path, 1, env=SLOW)
    wait_for_step(tmp_path, procs, 24)
    signal_all(procs, times=2)
    out = finish_within(procs, 20, status=4)
    assert f"checkpoint {step_dir(tmp_path / 'checkpoints', 24)} (stopped at once, mid-step" in out
    out = train_here(tmp_path)
    assert f"resuming from {step_dir(tmp_path / 'checkpoints', 24)}" in out
    assert losses(tmp_path) == losses(straight[1])  # the interrupted step was never applied


def test_the_deadline_after_one_signal_stops_a_long_step(tmp_path):
    procs = start(tmp_path, 1, "checkpoint.deadline_s=2", env=SLOW)
    wait_for_step(tmp_path, procs, 24)
    signal_all(procs, times=1)
    out = finish_within(procs, 20, status=4)
    assert "stopped at once, mid-step" in out and (step_dir(tmp_path / "checkpoints", 24) / "COMMITTED").exists()


@pytest.mark.ranks
def test_on_two_ranks_a_second_sigterm_exits_at_once_and_the_last_checkpoint_resumes(tmp_path, straight):
    procs = start(tmp_path, 2, env=SLOW)
    wait_for_step(tmp_path, procs, 24)
    signal_all(procs, times=2)
    out = finish_within(procs, 30, status=4)
    assert "with 2 ranks a step cannot be cut safely" in out
    assert [p.name for p in scan(tmp_path / "checkpoints")[0]][-1] == "step-00000020"
    out = finish(start(tmp_path, 2))
    assert f"resuming from {step_dir(tmp_path / 'checkpoints', 20)}" in out
    assert losses(tmp_path) == losses(straight[2])


@pytest.mark.parametrize("inside", [False, True], ids=["a-shared-checkpoint-dir", "the-first-runs-own-checkpoints"])
def test_two_runs_cannot_share_a_checkpoint_folder(tmp_path, inside):
    """Both runs name one checkpoint.dir, or the second names the first's default
    RUN_DIR/checkpoints (it pruned the first's folders, which then stopped with exit 5)."""
    shared = tmp_path / "a" / "checkpoints" if inside else tmp_path / "shared"
    first = start(tmp_path / "a", 1, "train.steps=100000", *([] if inside else [f"checkpoint.dir={shared}"]))
    try:
        deadline = time.time() + 240
        while last_step(tmp_path / "a") < 3:
            assert first[0].poll() is None and time.time() < deadline
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "launch/train.py", "--config", CONFIG, *TINY, f"run.dir={tmp_path / 'b'}",
             f"checkpoint.dir={shared}"], cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
        assert f"error: checkpoint.dir={shared} is in use by pid {first[0].pid} on " in second.stderr
        assert not (tmp_path / "b").exists()  # refused before it wrote anything
        assert first[0].poll() is None  # and the first run goes on
    finally:
        first[0].kill()
        first[0].communicate()


def test_evaluate_refuses_a_damaged_model_in_one_line(tmp_path):
    train_here(tmp_path, "train.steps=3")
    model = tmp_path / "model.pt"
    os.truncate(model, model.stat().st_size // 2)
    out = subprocess.run([sys.executable, "launch/evaluate.py", "--run", str(tmp_path)], cwd=ROOT, env=base_env(),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert (
        out.stderr.startswith(f"error: --run {tmp_path}: model.pt cannot be loaded (") and out.stderr.count("\n") == 1
    )


# --- a full disk: a real tmpfs (root only) --------------------------------------------------


@contextlib.contextmanager
def full_disk(path: Path, size_kb: int = 256, leave_kb: int = 0):
    """A tmpfs of ``size_kb`` at ``path``, filled up to ``leave_kb``; unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        fill(path, leave_kb)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path, leave_kb: int = 0) -> None:
    with open(path / "filler", "wb") as fh, contextlib.suppress(OSError):
        while os.statvfs(path).f_bavail * os.statvfs(path).f_frsize > leave_kb * 1024:
            fh.write(bytes(4096))
            fh.flush()


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@needs_root
@pytest.mark.parametrize("world", WORLDS)
def test_a_full_disk_at_a_checkpoint_stops_every_rank_with_one_message(tmp_path, world):
    """torch.save reports ENOSPC as a RuntimeError: every rank stops with status 5, rank 0 says
    why once, the partial folder is removed and nothing else is touched."""
    with full_disk(tmp_path / "ckpt", leave_kb=8) as ckpt:  # room for the folder's lock, not a checkpoint
        results = [(p.wait(timeout=300), p) for p in start(tmp_path / "run", world, f"checkpoint.dir={ckpt}")]
        outputs = [p.communicate() for _, p in results]
        assert all(code == 5 for code, _ in results), outputs[0][1][-3000:]
        errors = [line for _, err in outputs for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: could not write checkpoint {step_dir(ckpt, 10)} ")
        assert "nothing was committed" in errors[0] and all("Traceback" not in err for _, err in outputs)
        assert not step_dir(ckpt, 10).exists()


@needs_root
def test_a_run_directory_on_a_full_disk_is_refused_in_one_line(tmp_path):
    with full_disk(tmp_path / "run") as run_dir:
        out = subprocess.run([sys.executable, "launch/train.py", "--config", CONFIG, *TINY, f"run.dir={run_dir}"],
                             cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert f"error: run.dir={run_dir} cannot be written (No space left on device)" in out.stderr


@needs_root
@pytest.mark.parametrize("world", WORLDS)
def test_a_disk_that_fills_during_the_run_stops_every_rank_alike(tmp_path, world):
    """metrics.jsonl or the TensorBoard events (whichever fails first) cannot be written: the
    ranks agree at the step's end and stop with status 5, the last complete checkpoint intact."""
    with full_disk(tmp_path / "run", size_kb=8192, leave_kb=8192) as run_dir:
        ckpt = tmp_path / "ckpt"
        procs = start(run_dir, world, "train.steps=100000", f"checkpoint.dir={ckpt}")
        deadline = time.time() + 240
        while not (step_dir(ckpt, 10) / "COMMITTED").exists():
            assert all(p.poll() is None for p in procs) and time.time() < deadline
            time.sleep(0.05)
        fill(run_dir)
        results = [(p.wait(timeout=300), p) for p in procs]
        outputs = [p.communicate() for _, p in results]
        assert all(code == 5 for code, _ in results), outputs[0][1][-3000:]
        (line,) = [line for _, err in outputs for line in err.splitlines() if line.startswith("error:")]
        assert line.startswith(f"error: could not write {run_dir}/") and "No space left on device" in line
        assert "the last complete checkpoint" in line and all("Traceback" not in err for _, err in outputs)
        assert (scan(ckpt)[0][-1] / "COMMITTED").exists()


def test_steps_constant_is_what_the_runs_use():
    assert STEPS == 80  # the slow step (25) and the checkpoints (every 10) above assume it


def handles(pid: int, name: str) -> bool:
    """Whether process ``pid`` has a handler for signal ``name`` (SigCgt in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    mask = int(next(line for line in status if line.startswith("SigCgt:")).split()[1], 16)
    return bool(mask >> (getattr(signal, name) - 1) & 1)


def test_a_signal_while_the_run_starts_ends_it_with_exit_4_before_any_step(tmp_path, straight):
    """SLURM's --signal=USR1 on a job that starts late: before, the default action killed the
    rank (exit 138, no requeue). Sent once the handler exists, while torch is still loading."""
    procs = start(tmp_path, 1)
    deadline = time.time() + 30
    while not handles(procs[0].pid, "SIGUSR1"):
        assert procs[0].poll() is None and time.time() < deadline
        time.sleep(0.005)
    assert not (tmp_path / "metrics.jsonl").exists()  # still starting
    procs[0].send_signal(signal.SIGUSR1)
    out = finish(procs, status=4)
    assert "preempted by SIGUSR1 after step 0: no checkpoint yet (received while starting); exit 4" in out
    assert "Traceback" not in out and not scan(tmp_path / "checkpoints")[0]
    train_here(tmp_path)  # the requeued job: a whole run, as if never stopped
    assert losses(tmp_path) == losses(straight[1])


def test_ctrl_c_saves_a_checkpoint_like_sigterm_and_the_run_resumes_bit_exact(tmp_path, straight):
    out = preempt(start(tmp_path, 1), tmp_path, sig=signal.SIGINT)
    assert "preempted by SIGINT after step " in out and "KeyboardInterrupt" not in out and "Traceback" not in out
    stopped = int(out.split("preempted by SIGINT after step ")[1].split(":")[0])
    assert (step_dir(tmp_path / "checkpoints", stopped) / "COMMITTED").exists()
    out = train_here(tmp_path)
    assert f"resuming from {step_dir(tmp_path / 'checkpoints', stopped)}" in out
    assert losses(tmp_path) == losses(straight[1])


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/evaluate.py", *args], cwd=ROOT, env=base_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@needs_root
def test_evaluate_on_a_read_only_run_or_a_config_cut_short_ends_in_one_line(tmp_path):
    """A shared, read-only results folder: refused before any work unless --out says where to
    write (before: a PermissionError traceback after the evaluation); a config.yaml cut short:
    refused (before: evaluated silently with defaults for what was cut)."""
    run = tmp_path / "run"
    train_here(run, "train.steps=3")
    ro = tmp_path / "ro"
    ro.mkdir()
    bound = subprocess.run(["mount", "--bind", str(run), str(ro)], capture_output=True, text=True)
    if bound.returncode:
        pytest.skip(f"cannot bind-mount here ({bound.stderr.strip()})")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        out = evaluate("--run", str(ro))
        assert out.returncode == 2 and "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
        assert out.stderr.startswith(f"error: --run {ro}: cannot write there (Read-only file system): pass --out DIR")
        out = evaluate("--run", str(ro), "--out", str(tmp_path / "elsewhere"))
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads((tmp_path / "elsewhere" / "eval.json").read_text())["l2_rel"] > 0
        assert (tmp_path / "elsewhere" / "plots" / "slice.png").is_file() and not (run / "eval.json").exists()
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    config = run / "config.yaml"
    text = config.read_text()
    config.write_text(text[: len(text) * 2 // 3])  # cut inside a section: the rest would be defaults
    out = evaluate("--run", str(run))
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"error: config {config} is cut short: it lacks its last line '# end of config'")
