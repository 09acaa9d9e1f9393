"""Checkpoint integrity (real runs of launch/train.py): every file of a checkpoint is in its
manifest (size and SHA-256); a damaged newest checkpoint is reported in one line, set aside
and the run resumes from the newest one that passes, bit for bit as if the damaged one had
never been written; a step that was not applied never makes a checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import Runs
from distributed_utils import run_here
from test_checkpoint import CONFIG, TINY, finish, losses, plant, start, train_here, train_to_end

from dstein.checkpoint import DAMAGED, MANIFEST, MARKER, files_of, scan, shared_digests, step_dir
from dstein.metrics import read_metrics

MODEL = "mp_rank_00_model_states.pt"

pytestmark = pytest.mark.slow
#: The one-rank tests share the module's one-rank runs: one worker takes them all.
ONE_RANK = pytest.mark.xdist_group("integrity-one-rank")


def first_run(root: Path, world: int) -> Path:
    """30 steps, checkpoints after 10, 20 and 30."""
    train_to_end(root, world, "train.steps=30", "checkpoint.keep=3")
    assert [p.name for p in scan(root / "checkpoints")[0]] == [f"step-000000{s}" for s in (10, 20, 30)]
    return root


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Runs:
    return Runs(lambda world: first_run(tmp_path_factory.mktemp(f"saved{world}"), world))


def resumed_copy(saved: Path, target: Path) -> Path:
    shutil.copytree(saved, target)
    return target


@pytest.fixture(scope="module")
def reference(saved, tmp_path_factory) -> Runs:
    """The continuation to 40 steps from step 20 of an undamaged copy (step 30 removed)."""

    def make(world: int) -> list[dict]:
        run_dir = resumed_copy(saved[world], tmp_path_factory.mktemp(f"ref{world}") / "run")
        shutil.rmtree(step_dir(run_dir / "checkpoints", 30))
        text = train_to_end(run_dir, world, "train.steps=40", "checkpoint.keep=3")
        assert f"resuming from {step_dir(run_dir / 'checkpoints', 20)}" in text
        return losses(run_dir)

    return Runs(make)


def overwrite(path: Path, data: bytes, at: int = 0) -> None:
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(data)


def damage_with_nan_weights(folder: Path) -> None:
    """NaN weights in a file whose manifest is rewritten to match: only loading can tell."""
    state = torch.load(folder / MODEL, weights_only=False)
    first = next(iter(state["module"]))
    state["module"][first] = torch.full_like(state["module"][first], float("nan"))
    torch.save(state, folder / MODEL)
    names = files_of(folder)
    (folder / MANIFEST).write_text(json.dumps(shared_digests(folder, names, 0, 1)))


DAMAGE = {
    "zeros inside the model states": (lambda f: overwrite(f / MODEL, bytes(min(65536, (f / MODEL).stat().st_size // 2)),
                                                          (f / MODEL).stat().st_size // 4),
                                      f"{MODEL} does not match its SHA-256"),
    "random bytes in the model states": (lambda f: overwrite(f / MODEL, os.urandom((f / MODEL).stat().st_size)),
                                         f"{MODEL} does not match its SHA-256"),
    "truncated model states": (lambda f: os.truncate(f / MODEL, (f / MODEL).stat().st_size // 2), f"{MODEL} has "),
    "model states deleted": (lambda f: (f / MODEL).unlink(), f"{MODEL} is missing"),
    "RNG file emptied": (lambda f: os.truncate(f / "rng/rank-00000.pt", 0), "rng/rank-00000.pt has 0 bytes"),
    "RNG file deleted": (lambda f: (f / "rng/rank-00000.pt").unlink(), "rng/rank-00000.pt is missing"),
    "config emptied": (lambda f: (f / "config.yaml").write_text(""), "config.yaml has 0 bytes"),
    "no manifest, random bytes": (lambda f: ((f / MANIFEST).unlink(), overwrite(f / MODEL, os.urandom(4096), 0)),
                                  "has no MANIFEST.json, so its files cannot be verified"),
    "os.system pickled into the model states": (lambda f: plant(f / MODEL, f.parent.parent / "payload-ran"),
                                                "cannot be loaded (UnpicklingError"),
    "non-finite weights": (damage_with_nan_weights, "holds non-finite weights"),
}  # fmt: skip


@ONE_RANK
@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_set_aside_and_the_previous_one_resumes(case, saved, reference, tmp_path):
    run_dir = resumed_copy(saved[1], tmp_path / "run")
    ckpt = run_dir / "checkpoints"
    damage, problem = DAMAGE[case]
    damage(step_dir(ckpt, 30))
    text = train_here(run_dir, "train.steps=40", "checkpoint.keep=3")
    skipped = [line for line in text.splitlines() if line.startswith(f"skipping {step_dir(ckpt, 30)}: ")]
    assert len(skipped) == 1 and problem in skipped[0] and f"moved to step-00000030{DAMAGED}" in skipped[0], text
    assert f"resuming from {step_dir(ckpt, 20)} (step 20 of 40" in text and "Traceback" not in text
    assert losses(run_dir) == reference[1]  # as if the damaged checkpoint had never been written
    assert (ckpt / f"step-00000030{DAMAGED}").is_dir() and (step_dir(ckpt, 40) / MARKER).is_file()
    assert not (run_dir / "payload-ran").exists()  # a crafted pickle is refused before it runs


@pytest.mark.ranks
def test_on_two_ranks_a_damaged_file_of_rank_1_makes_both_fall_back(saved, reference, tmp_path):
    run_dir = resumed_copy(saved[2], tmp_path / "run")
    ckpt = run_dir / "checkpoints"
    (step_dir(ckpt, 30) / "rng/rank-00001.pt").unlink()
    text = finish(start(run_dir, 2, "train.steps=40", "checkpoint.keep=3"))
    assert f"skipping {step_dir(ckpt, 30)}: failed verification: rng/rank-00001.pt is missing" in text
    assert f"resuming from {step_dir(ckpt, 20)}" in text and losses(run_dir) == reference[2]


def train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_here("train.py", "--config", CONFIG, *TINY, f"run.dir={run_dir}", *extra)


@ONE_RANK
def test_fallback_false_refuses_and_touches_nothing(saved, tmp_path):
    run_dir = resumed_copy(saved[1], tmp_path / "run")
    ckpt = run_dir / "checkpoints"
    os.truncate(step_dir(ckpt, 30) / MODEL, 100)
    out = train(run_dir, "train.steps=40", "checkpoint.fallback=false")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    line = next(line for line in out.stderr.splitlines() if line.startswith("error: "))
    assert f"checkpoint {step_dir(ckpt, 30)} failed verification: {MODEL} has 100 bytes" in line
    assert "checkpoint.fallback=false" in line and step_dir(ckpt, 30).is_dir()


@ONE_RANK
def test_when_no_checkpoint_passes_the_run_is_refused(saved, tmp_path):
    run_dir = resumed_copy(saved[1], tmp_path / "run")
    ckpt = run_dir / "checkpoints"
    for step in (10, 20, 30):
        (step_dir(ckpt, step) / "config.yaml").write_text("")
    out = train(run_dir, "train.steps=40")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    (line,) = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: no checkpoint in {ckpt} can be resumed from (step-00000030 failed verification")
    assert all(f"step-000000{s} failed verification: config.yaml has 0 bytes" in line for s in (10, 20, 30))
    assert not scan(ckpt)[0] and all((ckpt / f"step-000000{s}{DAMAGED}").is_dir() for s in (10, 20, 30))
    # the same command again (a requeue after a transient read error) does not start over
    rows = (run_dir / "metrics.jsonl").read_bytes()
    again = train(run_dir, "train.steps=40")
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-2000:]
    (line,) = [line for line in again.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: {ckpt} holds no checkpoint to resume from, only 3 set aside as damaged")
    assert all(f"step-000000{s}{DAMAGED}" in line for s in (10, 20, 30)) and "checkpoint.resume=never" in line
    assert (run_dir / "metrics.jsonl").read_bytes() == rows and not scan(ckpt)[0]
    # starting over, as the message says, keeps the earlier run's rows beside the new ones
    fresh = train(run_dir, "train.steps=40", "checkpoint.resume=never")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    (kept,) = run_dir.glob("metrics.before-*.jsonl")
    count = len(rows.splitlines())
    assert kept.read_bytes() == rows and f"the earlier metrics.jsonl ({count} rows) is kept as" in fresh.stdout
    assert next(r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r) == 1


def test_a_step_that_was_not_applied_makes_no_checkpoint(tmp_path):
    """Steps 25 to 40 are all non-finite: the checkpoints due after 30 and 40 are not written,
    the one after 20 (the last applied state) is kept, and the run says so."""
    faults = ",".join(f"nan-loss@{s}" for s in range(25, 41))
    text = finish(start(tmp_path, 1, "train.steps=40", "train.max_skips=100", env={"DSTEIN_FAULT": faults}))
    complete, _ = scan(tmp_path / "checkpoints")
    assert [p.name for p in complete] == ["step-00000010", "step-00000020"]
    for step in (30, 40):
        assert f"note: no checkpoint after step {step}: it was not applied; the last complete one is " \
               f"{step_dir(tmp_path / 'checkpoints', 20)}" in text  # fmt: skip
