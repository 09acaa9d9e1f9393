"""DeepSpeed's CPU op: a build lock left by a killed build is removed at once (it made every
later start wait 10 minutes in silence), one that belongs to a build under way is waited for
and its builder named, and the ranks of a host build one after another."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from distributed_utils import ROOT, base_env

from dstein import op_build
from dstein.op_build import SHM_OP, builder_flock, check_build_lock


def stale_lock(build_dir: Path, age_s: float) -> Path:
    build_dir.mkdir(parents=True, exist_ok=True)
    lock = build_dir / "lock"
    lock.write_text("")
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_a_lock_without_a_build_is_removed_at_once_and_said_so(tmp_path):
    assert check_build_lock(tmp_path / SHM_OP) is None  # no lock: nothing to say
    lock = stale_lock(tmp_path / SHM_OP, 5)  # young: no waiting for it to age
    note = check_build_lock(tmp_path / SHM_OP)
    assert note == f"note: removed the stale build lock {lock} (5s old; the build that made it was killed)"
    assert not lock.exists()


def test_a_lock_of_a_build_under_way_is_kept_and_its_builder_named(tmp_path):
    lock = stale_lock(tmp_path / SHM_OP, 2)
    compiler = subprocess.Popen(["sleep", "30"], cwd=tmp_path / SHM_OP)  # as ninja runs, in the build directory
    try:
        time.sleep(0.1)
        note = check_build_lock(tmp_path / SHM_OP)
        assert note is not None and note.startswith(f"note: the build lock {lock} (2s old) belongs to a build")
        assert f"(pid {compiler.pid})" in note and lock.exists()
    finally:
        compiler.kill()
        compiler.wait()
    assert "removed the stale build lock" in (check_build_lock(tmp_path / SHM_OP) or "")


def test_ranks_of_a_host_build_one_after_another_and_a_long_wait_names_the_builder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(op_build, "SAY_WAITING_AFTER_S", 0.2)
    path = tmp_path / f"{SHM_OP}.builder"
    inside, order = threading.Event(), []

    def builder() -> None:
        with builder_flock(path):
            inside.set()
            time.sleep(0.8)
            order.append("first done")

    first = threading.Thread(target=builder)
    first.start()
    assert inside.wait(5)
    with builder_flock(path):
        order.append("second in")
    first.join()
    assert order == ["first done", "second in"]
    assert f"note: waiting for pid {os.getpid()} on {os.uname().nodename} to finish building" in capsys.readouterr().err
    assert path.read_text() == ""  # nobody holds it now


@pytest.mark.slow
def test_a_start_after_a_killed_build_does_not_wait_for_its_lock(tmp_path):
    """End to end, in a build directory of its own (a copy of this environment's build, so
    nothing is rebuilt and the other tests' builds are not touched)."""
    from dstein.op_build import own_op_build

    own = own_op_build()
    if not (own / SHM_OP).is_dir():
        pytest.skip("the op is not built in this environment (launch/setup.sh builds it)")
    subprocess.run(["cp", "-a", str(own), str(tmp_path / "ext")], check=True)
    lock = stale_lock(tmp_path / "ext" / SHM_OP, 30)
    env = {**base_env(), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    args = ["launch/train.py", "--config", "configs/quickstart.yaml", "train.steps=2", "model.width=8",
            "estimator.samples=8", "eval.points=8", "eval.samples=8", "eval.truth_samples=100", "eval.plots=false",
            f"run.dir={tmp_path / 'run'}"]  # fmt: skip
    begin = time.time()
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert time.time() - begin < 60 and not lock.exists()
    assert re.search(rf"note: removed the stale build lock {re.escape(str(lock))} \(3\ds old; the build that made it "
                     r"was killed\)", out.stderr), out.stderr[-2000:]  # fmt: skip
