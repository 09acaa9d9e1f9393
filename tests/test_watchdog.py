"""A peer that stops answering (SIGSTOP: its connections stay open, so no collective fails)
ends every other rank within parallel.timeout_s with exit 3 and one line naming it.

In one process, the watchdog threads against a real TCPStore (fast tier); then real ranks
stopped with SIGSTOP under the torchrun-style environment (the store in rank 0) and under
torchrun (the store in its agent).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
from distributed_utils import ROOT, base_env, free_port, spawn_ranks, wait_all

from dstein.watchdog import DONE, Watchdog, intervals

HOST = socket.gethostname()


class Recorded(Watchdog):
    """A watchdog whose verdict is recorded instead of ending the test's process."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.verdict: str | None = None
        self.readers = 0  # how many ranks had read the verdict when this one ended
        self.ended = threading.Event()

    def _end(self, verdict: str, posted: bool) -> None:
        if not self.stopping.is_set():
            self.verdict = verdict
            if posted:
                self._read()
                self.readers = int(self.store.add(self._key("read"), 0))
            self.stopping.set()
            self.ended.set()


def store_and_peers(world: int) -> tuple[dist.TCPStore, int, list[tuple[str, int]]]:
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))
    return server, port, [(HOST, 1000 + r) for r in range(world)]


def test_the_silence_allowed_ends_every_rank_within_the_timeout():
    for timeout in (1.0, 6.0, 10.0, 300.0):
        interval, limit = intervals(timeout)
        assert 0 < interval <= 1.0 and limit + 2 * interval < timeout


def test_a_rank_whose_heartbeat_stops_is_named_by_its_watcher_and_every_rank_reads_the_verdict():
    _server, port, peers = store_and_peers(3)  # the store lives as long as the test
    dogs = [Recorded(r, peers, "127.0.0.1", port, 1.0, "t1") for r in range(3)]
    for dog in (dogs[0], dogs[2]):  # rank 1 never beats: as if stopped from the start
        dog.start()
    begin = time.monotonic()
    assert dogs[0].ended.wait(5) and dogs[2].ended.wait(5)
    assert time.monotonic() - begin < 1.0 + 0.5
    assert dogs[0].verdict.startswith(f"rank 1 (host {HOST}, pid 1001) stopped answering: no heartbeat for")
    assert "found by rank 0 (parallel.timeout_s=1)" in dogs[0].verdict
    assert dogs[2].verdict == dogs[0].verdict  # rank 2 watches rank 0, and takes the posted verdict
    for dog in (dogs[0], dogs[2]):
        dog.join()  # before the store goes


def test_rank_0_holding_the_store_ends_only_once_the_others_have_read_the_verdict():
    """Else a rank whose collective failed because the finder exited finds the store gone
    and blames rank 0 (seen on two SLURM nodes): rank 0 waits for every rank but the stopped
    one, at most three intervals when one never reads."""
    _server, port, peers = store_and_peers(3)
    interval, limit = intervals(1.0)
    dogs = [Recorded(r, peers, "127.0.0.1", port, 1.0, "t4") for r in range(3)]
    for dog in (dogs[0], dogs[2]):  # rank 0 watches rank 1, which never beats
        dog.start()
    assert dogs[0].ended.wait(5) and dogs[2].ended.wait(5)
    assert "found by rank 0" in dogs[0].verdict and dogs[2].verdict == dogs[0].verdict
    assert dogs[0].readers == 2 and dogs[2].readers >= 1  # rank 2 had read it before rank 0 ended
    for dog in (dogs[0], dogs[2]):
        dog.join()

    alone = [Recorded(r, peers, "127.0.0.1", port, 1.0, "t5") for r in range(3)]
    begin = time.monotonic()
    alone[0].start()  # ranks 1 and 2 never read: rank 0 ends all the same, three intervals later
    assert alone[0].ended.wait(5)
    took = time.monotonic() - begin
    assert alone[0].readers == 1 and limit + 3 * interval <= took < limit + 6 * interval + 0.5, took
    alone[0].join()


def test_a_rank_that_stopped_orderly_is_not_taken_for_a_stopped_one():
    server, port, peers = store_and_peers(2)
    dogs = [Recorded(r, peers, "127.0.0.1", port, 1.0, "t2") for r in range(2)]
    for dog in dogs:
        dog.start()
    time.sleep(0.3)
    dogs[1].stop()  # exit_process after the last barrier
    time.sleep(2.0)
    assert dogs[0].verdict is None and not dogs[0].ended.is_set()
    assert int(server.add("dstein/watchdog/t2/1", 0)) >= DONE
    dogs[0].stop()


def test_a_store_that_stops_answering_ends_the_rank():
    """The store lives in rank 0 (or torchrun's agent): when it stops, so does the watching."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, datetime, torch.distributed as d; "
         f"s = d.TCPStore('127.0.0.1', {port}, is_master=True, wait_for_workers=False); "
         "print('up', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout.readline().strip() == "up"
        peers = [(HOST, server.pid), (HOST, 1001)]
        beating = Recorded(0, peers, "127.0.0.1", port, 1.0, "t3")  # rank 0's heartbeat, until the store stops
        dog = Recorded(1, peers, "127.0.0.1", port, 1.0, "t3")
        beating.start(), dog.start()
        time.sleep(0.4)
        server.send_signal(signal.SIGSTOP)
        begin = time.monotonic()
        assert dog.ended.wait(6), "the watchdog did not notice the stopped store"
        assert time.monotonic() - begin < 1.0 + 1.5
        assert dog.verdict.startswith(f"rank 0 (host {HOST}, pid {server.pid}) or the rendezvous store at 127.0.0.1")
        beating.stopping.set()
        server.send_signal(signal.SIGCONT)  # the requests under way are answered, the threads end
        beating.join(5), dog.join(5)
    finally:
        server.kill()
        server.wait()


# ----- real ranks ----------------------------------------------------------------------

TIMEOUT = 5
LONG_RUN = [
    "launch/train.py", "--config", "configs/quickstart.yaml", "train.steps=100000", "model.width=16",
    "estimator.samples=32", "eval.every=100000", "eval.points=8", "eval.truth_samples=100", "eval.plots=false",
    f"parallel.timeout_s={TIMEOUT}", "train.log_every=1", "checkpoint.every=100000",
]  # fmt: skip


def wait_for_steps(run_dir: Path, procs: list[subprocess.Popen], steps: int = 3) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert time.time() < deadline and all(p.poll() is None for p in procs), wait_all(procs, timeout=5)
        time.sleep(0.1)


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def rank_of(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(e for e in env if e.startswith(b"RANK=")).split(b"=")[1])


@pytest.mark.ranks
@pytest.mark.slow
@pytest.mark.parametrize("stopped", [1, 0], ids=["a-rank", "the-rank-holding-the-store"])
def test_a_stopped_rank_ends_the_other_with_exit_3_within_the_timeout(tmp_path, stopped):
    procs = spawn_ranks([*LONG_RUN, f"run.dir={tmp_path}"], 2)
    try:
        wait_for_steps(tmp_path, procs)
        procs[stopped].send_signal(signal.SIGSTOP)
        begin = time.time()
        other = procs[1 - stopped]
        rc, _, err = wait_all([other], timeout=TIMEOUT + 30)[0]
        elapsed = time.time() - begin
    finally:
        procs[stopped].kill()
        procs[stopped].wait()
    assert rc == 3, err[-3000:]
    assert elapsed < TIMEOUT + 2, (elapsed, err[-2000:])
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert f"rank {stopped} (host {HOST}, pid {procs[stopped].pid})" in lines[0], lines
    assert f"parallel.timeout_s={TIMEOUT}" in lines[0] and lines[0].startswith(f"error: rank {1 - stopped}: ")


@pytest.mark.ranks
@pytest.mark.slow
def test_under_torchrun_a_stopped_rank_ends_the_job_within_the_timeout(tmp_path):
    """The reported case: torchrun, one rank stopped; the other sat in DeepSpeed's gradient
    all-reduce for over 110 s with a 10 s timeout."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        *LONG_RUN, f"run.dir={tmp_path}",
    ]  # fmt: skip
    job = subprocess.Popen(cmd, cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ranks: dict[int, int] = {}
    try:
        wait_for_steps(tmp_path, [job])
        ranks = {rank_of(pid): pid for pid in children(job.pid)}
        assert sorted(ranks) == [0, 1], ranks
        subprocess.run(["kill", "-STOP", str(ranks[0])], check=True)
        begin = time.time()
        while Path(f"/proc/{ranks[1]}").exists() and time.time() - begin < TIMEOUT + 30:
            if Path(f"/proc/{ranks[1]}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.05)
        elapsed = time.time() - begin
    finally:
        if 0 in ranks:
            subprocess.run(["kill", "-9", str(ranks[0])], check=False, capture_output=True)
        else:
            job.kill()
    _, err = job.communicate(timeout=60)
    assert elapsed < TIMEOUT + 2, (elapsed, err[-3000:])
    assert job.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("error: rank 1:")]
    assert len(lines) == 1 and f"rank 0 (host {HOST}, pid {ranks[0]}) stopped answering" in lines[0], err[-3000:]
