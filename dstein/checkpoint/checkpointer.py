"""Checkpointer: the checkpoints of one run, saved together by every rank (the save protocol
of ``dstein.checkpoint``), pruned to ``checkpoint.keep``, and resumed through ``Resumer``."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

import dstein
from dstein.checkpoint.layout import CONFIG_FILE, MANIFEST, MARKER, RNG_DIR, files_of, scan, step_dir, step_of
from dstein.checkpoint.manifest import shared_digests
from dstein.checkpoint.resume import Resume, Resumer
from dstein.checkpoint.state import rng_state
from dstein.config import Config, config_file_text
from dstein.distributed import barrier, from_rank0, gather_objects
from dstein.errors import RunStopped
from dstein.faults import fault
from dstein.files import write_text_atomic

#: A save needs this much more free space than the last checkpoint took (files may grow).
SPACE_MARGIN = 1.1


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    for p in [*sorted(q for q in path.rglob("*") if q.is_dir()), path, path.parent]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Checkpointer:
    """Saves and finds checkpoints of one run; every rank holds one and calls it alike."""

    def __init__(self, config: Config, rank: int, world_size: int):
        self.config, self.rank, self.world_size = config, rank, world_size
        ck = config.checkpoint
        self.root = Path(ck.dir) if ck.dir else Path(config.run.dir) / "checkpoints"
        self.every, self.keep = ck.every, ck.keep

    def due(self, done: int) -> bool:
        return done == self.config.train.steps or (self.every > 0 and done % self.every == 0)

    def save(self, engine: Any, done: int, client: dict[str, Any]) -> Path:
        """Save the state after ``done`` steps on every rank; return the committed folder.

        A write that fails on any rank (disk full, permissions) raises ``RunStopped`` on every
        rank, after the unfinished folder is removed; earlier complete folders are untouched.
        """
        path = step_dir(self.root, done)
        state = {
            **client,
            "step": done,
            "world_size": self.world_size,
            "zero_stage": self.config.deepspeed.stage_on(self.world_size),
            "config_digest": self.config.digest(),
            "dstein_version": dstein.__version__,
        }

        def clear() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            self._check_space()
            if path.exists():  # left by a save that was interrupted, or an older run's
                shutil.rmtree(path)

        def write() -> None:
            try:
                engine.save_checkpoint(str(self.root), tag=path.name, client_state=state, save_latest=False)
            except Exception:
                barrier()  # the ranks whose writes succeeded wait in DeepSpeed's closing barrier
                raise
            (path / RNG_DIR).mkdir(parents=True, exist_ok=True)
            torch.save(rng_state(), path / RNG_DIR / f"rank-{self.rank:05d}.pt")
            if self.rank == 0:
                (path / CONFIG_FILE).write_text(config_file_text(self.config))
            fault("fail-save", done, self.rank)

        def manifest() -> None:
            names = from_rank0(files_of(path) if self.rank == 0 else None)
            digests = shared_digests(path, names, self.rank, self.world_size)
            unreadable = [f"{name} ({why})" for name, why in digests.items() if isinstance(why, str)]
            if unreadable:
                raise OSError(f"cannot read back {', '.join(unreadable)}")
            if self.rank == 0:
                write_text_atomic(path / MANIFEST, json.dumps(digests, indent=1, sort_keys=True) + "\n")

        def commit() -> None:
            fault("stall-save", done)  # test hook: a job killed before the commit
            _fsync_tree(path)
            keys = ("step", "world_size", "zero_stage", "config_digest", "dstein_version")
            marker = {key: state[key] for key in keys}
            marker["time"] = time.time()
            write_text_atomic(path / MARKER, json.dumps(marker, indent=2, sort_keys=True) + "\n")

        self._together(clear if self.rank == 0 else None, path)
        self._together(write, path)
        self._together(manifest, path)
        self._together(commit if self.rank == 0 else None, path)
        if self.rank == 0:
            self.prune()
        barrier()
        return path

    def _check_space(self) -> None:
        """Refuse to start a save that cannot fit: the free space against the size of the
        newest complete checkpoint (the first save has nothing to compare with)."""
        last = self.latest()
        if last is None:
            return
        need = SPACE_MARGIN * sum(f.stat().st_size for f in last.rglob("*") if f.is_file())
        free = shutil.disk_usage(self.root).free
        if free < need:
            raise OSError(
                errno.ENOSPC,
                f"No space left on device: {free / 2**20:.1f} MiB free in {self.root}, the last checkpoint took "
                f"{need / SPACE_MARGIN / 2**20:.1f} MiB",
            )

    def _together(self, work: Any, path: Path) -> None:
        """Run this rank's part of a save; if it failed on any rank, clean up and stop all.

        Any error of a write counts: an OSError, and the RuntimeError torch.save raises when
        the disk is full ("file write failed")."""
        error = None
        if work is not None:
            try:
                work()
            except Exception as err:  # every failure of a write stops the run alike
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                error = f"rank {self.rank}: {first}"
        failed = [e for e in gather_objects(error) if e]
        if not failed:
            return
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        previous = self.latest()  # the unfinished folder has no marker: never counted
        raise RunStopped(
            f"could not write checkpoint {path} ({failed[0]}); nothing was committed and the previous "
            f"complete checkpoint {previous if previous else '(none)'} is intact: free space or fix the "
            "directory (checkpoint.dir), then run the same command to resume"
        )

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder, if any."""
        complete, _ = scan(self.root) if self.root.is_dir() else ([], [])
        return complete[-1] if complete else None

    def prune(self) -> None:
        """Delete all but the newest ``keep`` complete folders, and incomplete ones older
        than the newest complete one (interrupted saves that can never be finished)."""
        complete, incomplete = scan(self.root)
        newest = step_of(complete[-1]) if complete else -1
        for path in complete[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)
        for path in incomplete:
            if step_of(path) < newest:
                shutil.rmtree(path, ignore_errors=True)

    @property
    def resumer(self) -> Resumer:
        """Choosing, verifying and loading the checkpoint to continue from (dstein/checkpoint/resume.py)."""
        return Resumer(self.config, self.rank, self.world_size, self.root)

    def resume(self, engine: Any, reader: Any = None) -> Resume:
        """Load the checkpoint that ``checkpoint.resume`` selects into ``engine`` (all ranks)."""
        return self.resumer.resume(engine, reader)
