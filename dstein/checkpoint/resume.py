"""Resume: choose the newest complete checkpoint that passes its manifest and loads, set aside
the ones that do not (``step-NNNNNNNN.damaged``), and put its state into the engine."""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dstein.checkpoint.compat import check_resumable, check_stage
from dstein.checkpoint.layout import (
    CONFIG_FILE,
    DAMAGED,
    MANIFEST,
    MARKER,
    RNG_DIR,
    CheckpointError,
    is_step_dir,
    read_marker,
    scan,
    step_of,
)  # fmt: skip
from dstein.checkpoint.manifest import manifest_problem, shared_digests
from dstein.checkpoint.state import safe_load, set_rng_state
from dstein.config import Config, ConfigError, load_resolved
from dstein.distributed import barrier, from_rank0, gather_objects


@dataclass
class Resume:
    """What ``Checkpointer.resume`` did: the step to continue from and what to tell the user."""

    step: int = 0
    path: Path | None = None
    messages: list[str] = field(default_factory=list)
    seconds: float = 0.0  # training time before this start, so metrics' clock runs on across resumes
    average: dict[str, Any] | None = None  # the weight average the checkpoint holds (train.average)


class Resumer:
    """Finds, verifies and loads the checkpoint to continue from; every rank holds one and
    calls it alike (rank 0 lists the candidates, the ranks hash shares of each)."""

    def __init__(self, config: Config, rank: int, world_size: int, root: Path):
        self.config, self.rank, self.world_size, self.root = config, rank, world_size, root

    def candidates(self) -> tuple[list[Path], list[str], bool]:
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
        damaged = sorted(root.glob(f"step-*{DAMAGED}")) if root.is_dir() and mode == "auto" else []
        if not complete and damaged:  # never start over silently in place of a run that had checkpoints
            raise CheckpointError(
                f"{root} holds no checkpoint to resume from, only {len(damaged)} set aside as damaged "
                f"({', '.join(p.name for p in damaged[-3:])}{', ...' if len(damaged) > 3 else ''}): after a "
                f"transient read error rename one back (without {DAMAGED}) to resume from it, or start over in "
                "this run directory with checkpoint.resume=never (the earlier metrics.jsonl is kept beside it)"
            )
        return complete[::-1], notes, False

    def choose(self) -> tuple[Path | None, list[str]]:
        """Rank 0: the newest candidate (None: fresh start) and what to report."""
        candidates, notes, _ = self.candidates()
        return (candidates[0] if candidates else None), notes

    def resume(self, engine: Any, reader: Any = None) -> Resume:
        """Load the checkpoint that ``checkpoint.resume`` selects into ``engine`` (all ranks):
        the newest candidate that passes verification and loads, reporting the others."""
        choice: tuple[list[str], list[str], bool, str | None] = ([], [], False, None)
        if self.rank == 0:
            try:
                candidates, notes, explicit = self.candidates()
                choice = ([str(c) for c in candidates], notes, explicit, None)
            except CheckpointError as err:
                choice = ([], [], False, str(err))
        names, notes, explicit, error = from_rank0(choice)
        if error:
            raise CheckpointError(error)
        tried: list[str] = []
        for name in names:
            path = Path(name)
            problem = self.verify(path)  # the same verdict on every rank
            if problem is None:
                local = None
                try:
                    resumed = self.load(path, engine, reader)
                    local = self.finite(engine)
                except CheckpointError:
                    raise  # sound, but it cannot be continued under this config (alike on every rank)
                except Exception as err:  # any loading error: the checkpoint is not usable
                    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                    local = f"cannot be loaded ({type(err).__name__}{': ' + first if first else ''})"
                problem = self.agree(local)
                if problem is None:
                    resumed.messages = [*notes, *resumed.messages]
                    return resumed
            if explicit or not self.config.checkpoint.fallback:
                raise CheckpointError(
                    f"checkpoint {path} {problem}; "
                    + ("it was asked for by checkpoint.resume" if explicit else "checkpoint.fallback=false")
                    + ": restore it, or resume from another complete checkpoint (checkpoint.resume=PATH)"
                )
            moved = self.set_aside(path)
            notes.append(f"skipping {path}: {problem}; moved to {moved.name}")
            tried.append(f"{path.name} {problem}")
        if tried:
            raise CheckpointError(
                f"no checkpoint in {self.root} can be resumed from ({'; '.join(tried)}; each moved to *{DAMAGED}): "
                "restore one, or start with checkpoint.resume=never in another run.dir"
            )
        return Resume(messages=notes)

    def agree(self, problem: str | None) -> str | None:
        """Every rank's verdict on a candidate: the first problem any rank found (or None)."""
        found = [p for p in gather_objects(problem) if p]
        return found[0] if found else None

    def verify(self, path: Path) -> str | None:
        """What is wrong with a candidate's files (all ranks hash shares of them), or None."""
        expected: dict[str, Any] | None = None
        problem: str | None = None
        if self.rank == 0:
            try:
                read_marker(path)
                if (path / MANIFEST).is_file():
                    expected = json.loads((path / MANIFEST).read_text())
                elif self.config.checkpoint.require_manifest:
                    problem = (f"has no {MANIFEST}, so its files cannot be verified (checkpoint.require_manifest=false "
                               "resumes such a folder unverified)")  # fmt: skip
            except (OSError, ValueError, CheckpointError) as err:
                problem = f"has an unreadable {MANIFEST} or {MARKER} ({err})"
        expected, problem = from_rank0((expected, problem))
        if problem or expected is None:
            return problem
        digests = shared_digests(path, sorted(expected), self.rank, self.world_size)
        bad = manifest_problem(path, digests, expected) if self.rank == 0 else None
        return from_rank0(None if bad is None else f"failed verification: {bad}")

    def finite(self, engine: Any) -> str | None:
        """Whether the loaded weights are finite (this rank's view)."""
        for name, p in engine.module.named_parameters():
            if not bool(torch.isfinite(p).all()):
                return f"holds non-finite weights ({name})"
        return None

    def set_aside(self, path: Path) -> Path:
        """Rank 0 renames a candidate that failed so that it is never tried or pruned again."""
        moved = path.with_name(path.name + DAMAGED)
        if self.rank == 0:
            if moved.exists():
                shutil.rmtree(moved, ignore_errors=True)
            with contextlib.suppress(OSError):  # read-only: it stays, and is skipped again next time
                path.rename(moved)
        barrier()
        return moved

    def load(self, path: Path, engine: Any, reader: Any) -> Resume:
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
            set_rng_state(safe_load(rng_file))
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
        return Resume(step=step, path=path, messages=messages, seconds=float(client.get("train_seconds", 0.0)),
                      average=client.get("average"))  # fmt: skip
