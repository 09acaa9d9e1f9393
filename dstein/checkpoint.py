"""Checkpoints and preemption: save and resume through DeepSpeed, commit markers, signals.

Layout of ``checkpoint.dir`` (default ``RUN_DIR/checkpoints``)::

    step-00000500/                 the state after 500 optimizer steps
        mp_rank_00_model_states.pt DeepSpeed: model (and, at ZeRO 0, the optimizer)
        zero_pp_rank_R_*.pt        DeepSpeed: optimizer shards (ZeRO 1 and 2)
        rng/rank-00000.pt          every RNG state of each rank
        config.yaml                the resolved config that wrote it
        COMMITTED                  JSON; the folder counts only once this exists

Save protocol (every rank calls ``save``): rank 0 clears a stale folder of the same step;
barrier; every rank calls ``engine.save_checkpoint`` and writes its RNG file; barrier; rank 0
flushes the files to disk, writes ``COMMITTED`` under a temporary name and renames it, then
deletes all but the newest ``checkpoint.keep`` complete folders. A process killed at any
moment leaves complete folders and at most one without ``COMMITTED``, which resume skips
and reports.

Resume (``checkpoint.resume``): rank 0 picks the folder and broadcasts it, so all ranks load
the same one; the saved config is compared with the current one first (``check_resumable``).
A batch and its noise are pure functions of the step and the learning rate is a function of
the step, so model + optimizer + step is the whole training state; the RNG states and the
data cursor are saved as well, the cursor to check that the data file reads on as before.

Preemption: SIGTERM and ``checkpoint.signal`` (SIGUSR1) only set a flag (saving inside a
handler can deadlock a collective). Once per step the ranks agree on the flag with one
all-reduce; then every rank saves at the step boundary and the run raises
``errors.Preempted``, which ``launch/train.py`` turns into exit status 4 for the batch script
to requeue.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dstein
from dstein.config import Config, ConfigError, load_resolved, to_yaml
from dstein.distributed import barrier, from_rank0, gather_objects, max_values
from dstein.errors import RunStopped
from dstein.faults import fault
from dstein.files import write_text_atomic

MARKER = "COMMITTED"
PREFIX = "step-"
RNG_DIR = "rng"
CONFIG_FILE = "config.yaml"

# Settings that define the function being trained or the layout of the saved state: a
# checkpoint written under other values cannot be continued. Everything else (steps,
# samples, logging, evaluation, ...) may change between runs; the changes are reported.
FIXED = (
    "seed", "pde.", "model.", "run.dtype", "estimator.method", "estimator.sigma_x", "estimator.sigma_t",
    "deepspeed.zero_stage", "deepspeed.optimizer", "data.train_file",
)  # fmt: skip


class CheckpointError(ConfigError):
    """A checkpoint cannot be used as asked; the message says which and why."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def is_step_dir(path: Path) -> bool:
    return path.name.startswith(PREFIX) and path.name[len(PREFIX) :].isdigit()


def step_of(path: Path) -> int:
    """The step of a checkpoint folder (``is_step_dir``)."""
    return int(path.name[len(PREFIX) :])


def scan(root: Path) -> tuple[list[Path], list[Path]]:
    """Complete and incomplete checkpoint folders under ``root``, oldest first."""
    found = sorted((p for p in root.glob(PREFIX + "*") if p.is_dir() and is_step_dir(p)), key=step_of)
    complete = [p for p in found if (p / MARKER).is_file()]
    return complete, [p for p in found if not (p / MARKER).is_file()]


def read_marker(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable {MARKER} marker ({err})") from err


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and prefix + key not in ("pde.params", "deepspeed.extra"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def check_resumable(saved: Config, config: Config, saved_world: int, world: int, path: Path) -> list[str]:
    """Refuse a checkpoint written under settings that cannot be continued; return the
    harmless changes as 'key: old -> new' lines."""
    old, new = _flat(saved.to_dict()), _flat(config.to_dict())
    changed = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    fatal = [k for k in changed if any(k == f or (f.endswith(".") and k.startswith(f)) for f in FIXED)]
    lines = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed]
    if fatal:
        what = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fatal)
        raise CheckpointError(
            f"checkpoint {path} was written with other settings that it cannot continue under ({what}); "
            "restore them, or start a new run with checkpoint.resume=never in another run.dir"
        )
    if saved_world != world and config.deepspeed.zero_stage > 0:
        raise CheckpointError(
            f"checkpoint {path} was written by {saved_world} ranks with deepspeed.zero_stage="
            f"{config.deepspeed.zero_stage}: ZeRO optimizer shards load only on the world size that wrote "
            f"them (now {world}); resume with {saved_world} ranks (ZeRO 0 checkpoints load on any world size)"
        )
    return lines


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


@dataclass
class Resume:
    """What ``Checkpointer.resume`` did: the step to continue from and what to tell the user."""

    step: int = 0
    path: Path | None = None
    messages: list[str] = field(default_factory=list)
    seconds: float = 0.0  # training time before this start, so metrics' clock runs on across resumes


class Checkpointer:
    """Saves and finds checkpoints of one run; every rank holds one and calls it alike."""

    def __init__(self, config: Config, rank: int, world_size: int):
        self.config, self.rank, self.world_size = config, rank, world_size
        ck = config.checkpoint
        self.root = Path(ck.dir) if ck.dir else Path(config.run.dir) / "checkpoints"
        self.every, self.keep = ck.every, ck.keep

    def due(self, done: int) -> bool:
        return done == self.config.train.steps or (self.every > 0 and done % self.every == 0)

    # ----- save -------------------------------------------------------------------------
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
            "config_digest": self.config.digest(),
            "dstein_version": dstein.__version__,
        }

        def clear() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # left by a save that was interrupted, or an older run's
                shutil.rmtree(path)

        def write() -> None:
            engine.save_checkpoint(str(self.root), tag=path.name, client_state=state, save_latest=False)
            (path / RNG_DIR).mkdir(parents=True, exist_ok=True)
            torch.save(rng_state(), path / RNG_DIR / f"rank-{self.rank:05d}.pt")
            if self.rank == 0:
                (path / CONFIG_FILE).write_text(to_yaml(self.config))
            fault("fail-save", done, self.rank)

        def commit() -> None:
            fault("stall-save", done)  # test hook: a job killed before the commit
            _fsync_tree(path)
            marker = {key: state[key] for key in ("step", "world_size", "config_digest", "dstein_version")}
            marker["time"] = time.time()
            write_text_atomic(path / MARKER, json.dumps(marker, indent=2, sort_keys=True) + "\n")

        self._together(clear if self.rank == 0 else None, path)
        self._together(write, path)
        self._together(commit if self.rank == 0 else None, path)
        if self.rank == 0:
            self.prune()
        barrier()
        return path

    def _together(self, work: Any, path: Path) -> None:
        """Run this rank's part of a save; if it failed on any rank, clean up and stop all."""
        error = None
        if work is not None:
            try:
                work()
            except OSError as err:
                error = f"rank {self.rank}: {err}"
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

    # ----- resume -----------------------------------------------------------------------
    def _choose(self) -> tuple[Path | None, list[str]]:
        """Rank 0: the folder to resume from (None: fresh start) and what to report."""
        mode = self.config.checkpoint.resume
        notes: list[str] = []
        if mode in ("auto", "never"):
            root = self.root
        else:
            root = Path(mode)
            if not root.is_dir():
                raise CheckpointError(f"checkpoint.resume={mode}: no such directory")
            if is_step_dir(root):
                if not (root / MARKER).is_file():
                    raise CheckpointError(
                        f"checkpoint.resume={mode}: incomplete checkpoint (no {MARKER} marker: its save was "
                        "interrupted); pick a complete one"
                    )
                return root, notes
        complete, incomplete = scan(root) if root.is_dir() else ([], [])
        newest = step_of(complete[-1]) if complete else -1
        for path in incomplete:
            if step_of(path) > newest:
                notes.append(f"skipping {path}: incomplete (no {MARKER} marker; its save was interrupted)")
        if mode == "never":
            if complete:
                raise CheckpointError(
                    f"checkpoint.resume=never but {root} holds checkpoints of an earlier run (newest "
                    f"{complete[-1].name}); delete them, choose another run.dir, or use checkpoint.resume=auto"
                )
            return None, notes
        if not complete:
            if mode != "auto":
                raise CheckpointError(f"checkpoint.resume={mode}: no complete checkpoint in it")
            return None, notes
        return complete[-1], notes

    def resume(self, engine: Any, reader: Any = None) -> Resume:
        """Load the checkpoint that ``checkpoint.resume`` selects into ``engine`` (all ranks)."""
        choice: tuple[str | None, list[str], str | None] = (None, [], None)
        if self.rank == 0:
            try:
                path, notes = self._choose()
                choice = (str(path) if path else None, notes, None)
            except CheckpointError as err:
                choice = (None, [], str(err))
        path_s, notes, error = from_rank0(choice)
        if error:
            raise CheckpointError(error)
        if path_s is None:
            return Resume(messages=notes)
        path = Path(path_s)
        marker = read_marker(path)
        saved = load_resolved(path / CONFIG_FILE)
        changes = check_resumable(saved, self.config, int(marker["world_size"]), self.world_size, path)
        load_path, client = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None or client is None:
            raise CheckpointError(f"checkpoint {path}: DeepSpeed found nothing to load in it")
        step = int(client["step"])
        if step > self.config.train.steps:
            raise CheckpointError(
                f"checkpoint {path} holds step {step}, beyond train.steps={self.config.train.steps}; "
                f"set train.steps >= {step} or start a new run"
            )
        rng_file = path / RNG_DIR / f"rank-{self.rank:05d}.pt"
        if int(marker["world_size"]) == self.world_size and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        if reader is not None and client.get("data_cursor") is not None and not any("data." in c for c in changes):
            now = reader.cursor(step)
            if now != client["data_cursor"]:
                raise CheckpointError(
                    f"checkpoint {path}: data file {self.config.data.train_file} would continue at {now}, "
                    f"not where the run stopped ({client['data_cursor']}); was the file replaced?"
                )
        messages = [*notes, f"resuming from {path} (step {step} of {self.config.train.steps}, "
                    f"written by {marker['world_size']} rank{'s' if marker['world_size'] != 1 else ''})"]  # fmt: skip
        if changes:
            messages.append("continuing with changed settings: " + "; ".join(changes))
        return Resume(step=step, path=path, messages=messages, seconds=float(client.get("train_seconds", 0.0)))


class Preemption:
    """SIGTERM and ``checkpoint.signal`` set a flag; ``agreed`` all-reduces it once per step."""

    def __init__(self, signal_name: str):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        names = ["SIGTERM"] + ([signal_name] if signal_name not in ("none", "SIGTERM") else [])
        for name in names:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name  # only a flag: the loop saves at the step boundary

    def agreed(self, group: Any = None) -> bool:
        """True on every rank once any rank has received a signal."""
        return bool(max_values(torch.tensor([1.0 if self.received else 0.0]), group).item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
