"""Checkpoints and preemption: save and resume through DeepSpeed, commit markers, signals.

Layout of ``checkpoint.dir`` (default ``RUN_DIR/checkpoints``)::

    step-00000500/                 the state after 500 optimizer steps
        mp_rank_00_model_states.pt DeepSpeed: model (and, at ZeRO 0, the optimizer)
        zero_pp_rank_R_*.pt        DeepSpeed: optimizer shards (ZeRO 1 and 2)
        rng/rank-00000.pt          every RNG state of each rank
        config.yaml                the resolved config that wrote it
        MANIFEST.json              size and SHA-256 of every file above
        COMMITTED                  JSON; the folder counts only once this exists

Save protocol (every rank calls ``save``): rank 0 checks the free space against the last
checkpoint's size and clears a stale folder of the same step; every rank calls
``engine.save_checkpoint`` and writes its RNG file; the ranks hash the files (each a share)
and rank 0 writes ``MANIFEST.json``; rank 0 flushes the files to disk, writes ``COMMITTED``
under a temporary name and renames it, then deletes all but the newest ``checkpoint.keep``
complete folders. A write that fails on any rank (an OSError, or the RuntimeError torch
raises for a full disk) stops every rank alike (``RunStopped``) after the unfinished folder
is removed. A process killed at any moment leaves complete folders and at most one without
``COMMITTED``, which resume skips and reports.

Resume (``checkpoint.resume``): rank 0 lists the candidates (newest first) and broadcasts
them, so all ranks load the same one. A candidate is verified against its manifest (the
ranks hash shares of it), then loaded; one that fails either (damaged or truncated files,
non-finite weights, a loading error of any kind) is reported in one line, renamed
``step-NNNNNNNN.damaged`` and, with ``checkpoint.fallback`` (the default), the next one is
tried. The saved config is compared with the current one first (``check_resumable``).
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

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import time
from collections.abc import Iterator
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
from dstein.noise import split_evenly

MARKER = "COMMITTED"
MANIFEST = "MANIFEST.json"
DAMAGED = ".damaged"
MISSING = "missing"
#: A save needs this much more free space than the last checkpoint took (files may grow).
SPACE_MARGIN = 1.1
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


def files_of(path: Path) -> list[str]:
    """The files of a checkpoint folder that its manifest covers (relative, sorted)."""
    skip = {MARKER, MANIFEST}
    files = (p for p in path.rglob("*") if p.is_file() and p.name not in skip and not p.name.startswith("."))
    return sorted(str(p.relative_to(path)) for p in files)


def _digest(file: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    with open(file, "rb") as fh:
        while block := fh.read(1 << 22):
            sha.update(block)
    return {"bytes": file.stat().st_size, "sha256": sha.hexdigest()}


def shared_digests(path: Path, names: list[str], rank: int, world: int) -> dict[str, dict[str, Any] | str]:
    """Size and SHA-256 of each file, the ranks hashing a share each (every rank calls this);
    a file that cannot be read gives the reason instead."""
    mine: dict[str, dict[str, Any] | str] = {}
    for name in names[slice(*split_evenly(len(names), rank, world))]:
        try:
            mine[name] = _digest(path / name)
        except FileNotFoundError:
            mine[name] = MISSING
        except OSError as err:
            mine[name] = err.strerror or str(err)
    merged: dict[str, dict[str, Any] | str] = {}
    for part in gather_objects(mine):
        merged.update(part)
    return merged


def manifest_problem(path: Path, digests: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """What does not match the manifest (missing, truncated or changed files), or None."""
    for name, want in sorted(expected.items()):
        got = digests.get(name, MISSING)
        if isinstance(got, str):
            return f"{name} is {'missing' if got == MISSING else 'unreadable (' + got + ')'}"
        if got["bytes"] != want["bytes"]:
            return f"{name} has {got['bytes']} bytes, {want['bytes']} were written"
        if got["sha256"] != want["sha256"]:
            return f"{name} does not match its SHA-256 (changed after it was written)"
    return None


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


def check_stage(marker: dict[str, Any], saved: Config, config: Config, world: int, path: Path) -> None:
    """Refuse a checkpoint whose optimizer state is laid out for another ZeRO stage than the
    engine now runs (the stage is the configured one, or 0 on one rank: DeepSpeedConfig.stage_on).
    Markers without a ``zero_stage`` were written when one rank ran the configured stage."""
    if int(marker["world_size"]) != world:
        return  # check_resumable decides
    saved_stage = int(marker.get("zero_stage", saved.deepspeed.zero_stage))
    stage = config.deepspeed.stage_on(world)
    if saved_stage != stage:
        raise CheckpointError(
            f"checkpoint {path} holds optimizer state of ZeRO stage {saved_stage}, and this run's engine would "
            f"run stage {stage} (deepspeed.zero_stage={config.deepspeed.zero_stage} on {world} "
            f"rank{'s' if world != 1 else ''}; one rank runs stage 0, there being nothing to partition): "
            f"continue it with +deepspeed.extra.zero_optimization.stage={saved_stage}"
        )


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
                (path / CONFIG_FILE).write_text(to_yaml(self.config))
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

    # ----- resume -----------------------------------------------------------------------
    def _candidates(self) -> tuple[list[Path], list[str], bool]:
        """Rank 0: the folders to try, newest first (none: fresh start), what to report, and
        whether one folder was asked for by path (then it alone is tried)."""
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
                return [root], notes, True
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
            return [], notes, False
        if not complete and mode != "auto":
            raise CheckpointError(f"checkpoint.resume={mode}: no complete checkpoint in it")
        return complete[::-1], notes, False

    def _choose(self) -> tuple[Path | None, list[str]]:
        """Rank 0: the newest candidate (None: fresh start) and what to report."""
        candidates, notes, _ = self._candidates()
        return (candidates[0] if candidates else None), notes

    def resume(self, engine: Any, reader: Any = None) -> Resume:
        """Load the checkpoint that ``checkpoint.resume`` selects into ``engine`` (all ranks):
        the newest candidate that passes verification and loads, reporting the others."""
        choice: tuple[list[str], list[str], bool, str | None] = ([], [], False, None)
        if self.rank == 0:
            try:
                candidates, notes, explicit = self._candidates()
                choice = ([str(c) for c in candidates], notes, explicit, None)
            except CheckpointError as err:
                choice = ([], [], False, str(err))
        names, notes, explicit, error = from_rank0(choice)
        if error:
            raise CheckpointError(error)
        tried: list[str] = []
        for name in names:
            path = Path(name)
            problem = self._verify(path)  # the same verdict on every rank
            if problem is None:
                local = None
                try:
                    resumed = self._load(path, engine, reader)
                    local = self._finite(engine)
                except CheckpointError:
                    raise  # sound, but it cannot be continued under this config (alike on every rank)
                except Exception as err:  # any loading error: the checkpoint is not usable
                    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                    local = f"cannot be loaded ({type(err).__name__}{': ' + first if first else ''})"
                problem = self._agree(local)
                if problem is None:
                    resumed.messages = [*notes, *resumed.messages]
                    return resumed
            if explicit or not self.config.checkpoint.fallback:
                raise CheckpointError(
                    f"checkpoint {path} {problem}; "
                    + ("it was asked for by checkpoint.resume" if explicit else "checkpoint.fallback=false")
                    + ": restore it, or resume from another complete checkpoint (checkpoint.resume=PATH)"
                )
            moved = self._set_aside(path)
            notes.append(f"skipping {path}: {problem}; moved to {moved.name}")
            tried.append(f"{path.name} {problem}")
        if tried:
            raise CheckpointError(
                f"no checkpoint in {self.root} can be resumed from ({'; '.join(tried)}; each moved to *{DAMAGED}): "
                "restore one, or start with checkpoint.resume=never in another run.dir"
            )
        return Resume(messages=notes)

    def _agree(self, problem: str | None) -> str | None:
        """Every rank's verdict on a candidate: the first problem any rank found (or None)."""
        found = [p for p in gather_objects(problem) if p]
        return found[0] if found else None

    def _verify(self, path: Path) -> str | None:
        """What is wrong with a candidate's files (all ranks hash shares of them), or None."""
        expected: dict[str, Any] | None = None
        problem: str | None = None
        if self.rank == 0:
            try:
                read_marker(path)
                expected = json.loads((path / MANIFEST).read_text()) if (path / MANIFEST).is_file() else None
            except (OSError, ValueError, CheckpointError) as err:
                problem = f"has an unreadable {MANIFEST} or {MARKER} ({err})"
        expected, problem = from_rank0((expected, problem))
        if problem or expected is None:
            return problem
        digests = shared_digests(path, sorted(expected), self.rank, self.world_size)
        bad = manifest_problem(path, digests, expected) if self.rank == 0 else None
        return from_rank0(None if bad is None else f"failed verification: {bad}")

    def _finite(self, engine: Any) -> str | None:
        """Whether the loaded weights are finite (this rank's view)."""
        for name, p in engine.module.named_parameters():
            if not bool(torch.isfinite(p).all()):
                return f"holds non-finite weights ({name})"
        return None

    def _set_aside(self, path: Path) -> Path:
        """Rank 0 renames a candidate that failed so that it is never tried or pruned again."""
        moved = path.with_name(path.name + DAMAGED)
        if self.rank == 0:
            if moved.exists():
                shutil.rmtree(moved, ignore_errors=True)
            with contextlib.suppress(OSError):  # read-only: it stays, and is skipped again next time
                path.rename(moved)
        barrier()
        return moved

    def _load(self, path: Path, engine: Any, reader: Any) -> Resume:
        """Load one verified checkpoint into ``engine`` (all ranks)."""
        marker = read_marker(path)
        try:
            saved = load_resolved(path / CONFIG_FILE)
        except ConfigError as err:
            raise OSError(f"its {CONFIG_FILE} cannot be read ({err})") from err
        changes = check_resumable(saved, self.config, int(marker["world_size"]), self.world_size, path)
        check_stage(marker, saved, self.config, self.world_size, path)
        load_path, client = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None or client is None:
            raise OSError("DeepSpeed found nothing to load in it")
        step = int(client["step"])
        if step > self.config.train.steps:
            raise CheckpointError(
                f"checkpoint {path} holds step {step}, beyond train.steps={self.config.train.steps}; "
                f"set train.steps >= {step} or start a new run"
            )
        rng_file = path / RNG_DIR / f"rank-{self.rank:05d}.pt"
        if int(marker["world_size"]) == self.world_size:
            set_rng_state(torch.load(rng_file, weights_only=False))
        if reader is not None and client.get("data_cursor") is not None and not any("data." in c for c in changes):
            now = reader.cursor(step)
            if now != client["data_cursor"]:
                raise CheckpointError(
                    f"checkpoint {path}: data file {self.config.data.train_file} would continue at {now}, "
                    f"not where the run stopped ({client['data_cursor']}); was the file replaced?"
                )
        messages = [f"resuming from {path} (step {step} of {self.config.train.steps}, "
                    f"written by {marker['world_size']} rank{'s' if marker['world_size'] != 1 else ''})"]  # fmt: skip
        if changes:
            messages.append("continuing with changed settings: " + "; ".join(changes))
        return Resume(step=step, path=path, messages=messages, seconds=float(client.get("train_seconds", 0.0)))


class Interrupted(Exception):
    """A second preemption signal, or checkpoint.deadline_s after the first, arrived in the
    middle of a step (raised from the signal handler, outside ``Preemption.critical``)."""


class Preemption:
    """SIGTERM and ``checkpoint.signal`` set a flag; ``agreed`` all-reduces it once per step.

    A step longer than the scheduler's grace period (SLURM's KillWait, 30 s by default) would
    be killed before the step boundary: a second signal, or ``deadline_s`` seconds after the
    first, raises ``Interrupted`` at once instead, except inside ``critical()`` (the
    optimizer update, a checkpoint save), where it waits for the section's end."""

    def __init__(self, signal_name: str, deadline_s: float = 0.0):
        self.received: str | None = None
        self.deadline_s = deadline_s
        self._critical = 0
        self._pending = False
        self._previous: dict[int, Any] = {}
        names = ["SIGTERM"] + ([signal_name] if signal_name not in ("none", "SIGTERM") else [])
        for name in names:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)
        if deadline_s:
            self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._urgent)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name  # a flag: the loop saves at the step boundary
            if self.deadline_s:
                signal.setitimer(signal.ITIMER_REAL, self.deadline_s)
            return
        self._urgent(signum, frame)

    def _urgent(self, signum: int, frame: Any) -> None:
        if self._critical:
            self._pending = True
            return
        raise Interrupted(signal.Signals(signum).name)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A section that an urgent stop must not cut short (it is raised at its end)."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if self._pending and not self._critical:
            self._pending = False
            raise Interrupted("SIGTERM")

    def agreed(self, group: Any = None, *flags: bool) -> tuple[bool, ...]:
        """Once per step, every rank's view: whether any rank received a signal, then the
        same for each of ``flags`` (one all-reduce for all)."""
        values = torch.tensor([1.0 if self.received else 0.0, *(1.0 if f else 0.0 for f in flags)])
        return tuple(bool(v > 0) for v in max_values(values, group).tolist())

    def restore(self) -> None:
        if self.deadline_s:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
