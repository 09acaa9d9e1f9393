"""The watchdog: every rank ends within ``parallel.timeout_s`` of a peer that stops answering.

A peer that dies closes its connections and the next collective fails at once (``PeerLost``
in dstein/distributed.py). A peer that stops (SIGSTOP, a frozen node, a livelocked driver)
keeps them open: gloo's waits have no deadline in every path (DeepSpeed's gradient
all-reduce waited over 110 s with a 10 s timeout), the waiting ranks do not run Python
signal handlers, and the job hangs until it is killed. So each rank runs a thread that does
not depend on the collectives:

- every ``interval`` (timeout / 10, at most 1 s) it adds one to its heartbeat counter in the
  rendezvous store (a client connection of its own, with a deadline per request);
- it watches the counter of the next rank (rank r watches r + 1 mod world: each rank is
  watched by exactly one other, and the store sees three small requests per rank and
  interval, whatever the world size);
- when that counter has not moved for ``limit`` (the timeout less three intervals), or the
  store itself has not answered for as long (it lives in rank 0, or torchrun's agent), it
  posts the verdict to the store, prints one line naming the rank, its host and pid, and ends
  this process with exit 3; every other rank reads the verdict within an interval and ends
  alike. Rank 0 holds the store: it ends only once every other rank but the stopped one has
  read the verdict (or three intervals have passed), since a rank whose collective failed
  because the finder exited would otherwise find the store gone and blame rank 0.

A rank that stops orderly (``exit_process``) first marks its counter done, so that its
watcher does not take the end of a run for a stopped peer. The thread needs the GIL only for
microseconds: a rank waiting in a collective (C++, GIL released) is watched and watches.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

#: A heartbeat counter at or above this value marks a rank that stopped orderly.
DONE = 1 << 60
#: What the ranks exit with when a peer stopped answering (``PeerLost``'s status).
LOST_STATUS = 3


def intervals(timeout_s: float) -> tuple[float, float]:
    """The heartbeat interval and the silence after which a peer counts as stopped: every
    rank has ended within ``timeout_s`` of the peer's last heartbeat."""
    interval = min(1.0, timeout_s / 10)
    return interval, max(timeout_s - 3 * interval, interval)


class Watchdog(threading.Thread):
    """The heartbeat and watcher thread of one rank (see the module's docstring)."""

    def __init__(
        self,
        rank: int,
        peers: list[tuple[str, int]],
        store_addr: str,
        store_port: int,
        timeout_s: float,
        token: str,
    ) -> None:
        super().__init__(name="dstein-watchdog", daemon=True)
        self.rank, self.peers, self.timeout_s = rank, peers, timeout_s
        self.watched = (rank + 1) % len(peers)
        self.interval, self.limit = intervals(timeout_s)
        self.where = f"{store_addr}:{store_port}"
        self.prefix = f"dstein/watchdog/{token}/"
        self.store = dist.TCPStore(
            store_addr, store_port, is_master=False, wait_for_workers=False,
            timeout=timedelta(seconds=max(2 * self.interval, 0.5)),
        )  # fmt: skip
        self.stopping = threading.Event()
        self.ending = threading.Lock()  # one verdict printed, none after an orderly stop
        self.answered = time.monotonic()  # the store's last reply
        self.counted = threading.Lock()  # this rank is counted once among the verdict's readers
        self.read = False
        self.judge = threading.Thread(target=self._judge, name="dstein-watchdog-judge", daemon=True)

    def _key(self, name: str | int) -> str:
        return f"{self.prefix}{name}"

    def _who(self, rank: int) -> str:
        host, pid = self.peers[rank]
        return f"rank {rank} (host {host}, pid {pid})"

    def start(self) -> None:
        super().start()
        self.judge.start()

    def run(self) -> None:
        """The heartbeat and watcher: three store requests per interval."""
        seen, moved = -1, time.monotonic()
        woke = moved
        while not self.stopping.wait(self.interval):
            if time.monotonic() - woke > 3 * self.interval:  # this process was stopped itself:
                moved = time.monotonic()  # the watched rank's silence meanwhile says nothing
            woke = time.monotonic()
            try:
                self.store.add(self._key(self.rank), 1)
                verdicts = self.store.add(self._key("verdicts"), 0)
                beats = self.store.add(self._key(self.watched), 0)
                verdict = self.store.get(self._key("verdict")).decode() if verdicts else ""
            except Exception:  # a gone store raises at once (its silence is the judge's to time)
                continue
            now = self.answered = time.monotonic()
            if verdict:
                self._end(verdict, posted=True)
            if beats >= DONE:
                continue
            if beats != seen:
                seen, moved = beats, now
            elif now - moved > self.limit:
                verdict = (
                    f"{self._who(self.watched)} stopped answering: no heartbeat for {now - moved:.0f}s, found by rank "
                    f"{self.rank} (parallel.timeout_s={self.timeout_s:g})"
                )
                with contextlib.suppress(Exception):  # else the others find it themselves
                    self.store.set(self._key("verdict"), verdict)
                    self.store.add(self._key("verdicts"), 1)
                self._end(verdict, posted=True)

    def _judge(self) -> None:
        """The store's silence, timed apart from its requests (a stopped store does not fail
        them, it never answers: the heartbeat thread then waits in one)."""
        woke = time.monotonic()
        while not self.stopping.wait(self.interval):
            if time.monotonic() - woke > 3 * self.interval:  # stopped itself (SIGSTOP, then SIGCONT)
                self.answered = time.monotonic()
            woke = time.monotonic()
            silent = time.monotonic() - self.answered
            if silent > self.limit:
                self._end(
                    f"{self._who(0)} or the rendezvous store at {self.where} stopped answering: no reply for "
                    f"{silent:.0f}s (parallel.timeout_s={self.timeout_s:g})",
                    posted=False,
                )

    def posted(self) -> str | None:
        """The verdict a watchdog of any rank posted, if one did (None: none, or no store)."""
        verdict = None
        with contextlib.suppress(Exception):
            if self.store.add(self._key("verdicts"), 0):
                verdict = self.store.get(self._key("verdict")).decode()
        if verdict is not None:
            self._read()
        return verdict

    def _read(self) -> None:
        """Count this rank among the verdict's readers (once); on rank 0, which holds the
        store, wait until every rank but the stopped one has read it, at most three intervals
        (the others' heartbeats read it within one)."""
        with self.counted:
            if not self.read:
                self.read = True
                with contextlib.suppress(Exception):
                    self.store.add(self._key("read"), 1)
        if self.rank != 0:
            return
        deadline = time.monotonic() + 3 * self.interval
        while time.monotonic() < deadline:
            try:
                if self.store.add(self._key("read"), 0) >= len(self.peers) - 1:
                    return
            except Exception:
                return
            time.sleep(self.interval / 20)

    def _end(self, verdict: str, posted: bool) -> None:
        """Say why on this rank and end the process at once (the main thread may be stuck in
        a collective that will never return); ``posted``: the verdict is in the store."""
        with self.ending:
            if self.stopping.is_set():
                return
            mine = verdict.startswith(f"rank {self.rank} (")
            about = " (this rank: it was stopped, and the others have ended)" if mine else ""
            print(f"error: rank {self.rank}: {verdict}{about}; stopping", file=sys.stderr, flush=True)
            sys.stdout.flush()
            if posted:
                self._read()
            os._exit(LOST_STATUS)

    def stop(self) -> None:
        """An orderly end of this rank: stop beating, wait for the request under way, and mark
        this rank done for its watcher. Call it on every rank before a last barrier: a store
        request still under way when rank 0 (holding the store) exits makes torch print a
        stack of warnings."""
        with self.ending:
            self.stopping.set()
        self.join(timeout=4 * self.interval + 1)
        with contextlib.suppress(Exception):  # the store may be gone already
            self.store.add(self._key(self.rank), DONE)


_RUNNING: Watchdog | None = None


def start_watchdog(rank: int, peers: list[tuple[str, int]], addr: str, port: int, timeout_s: float, token: str) -> Any:
    """Start this rank's watchdog (more than one rank only); one per process."""
    global _RUNNING
    if len(peers) < 2 or _RUNNING is not None:
        return _RUNNING
    _RUNNING = Watchdog(rank, peers, addr, port, timeout_s, token)
    _RUNNING.start()
    return _RUNNING


def posted_verdict() -> str | None:
    """Why a peer was found stopped, if this rank's watchdog runs and one was (a collective
    that failed because the finder exited names the stopped rank, not the finder)."""
    return _RUNNING.posted() if _RUNNING is not None else None


def stop_watchdog() -> None:
    global _RUNNING
    if _RUNNING is not None:
        _RUNNING.stop()
        _RUNNING = None
