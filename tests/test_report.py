"""What a user sees: log lines, TensorBoard, plots, evaluate.py, --help."""

from __future__ import annotations

import json
import sys

import matplotlib.image
import pytest
from distributed_utils import run_command, train_command

from dstein.plots import PLOTS

SMALL = [
    "train.steps=30", "train.log_every=5", "train.print_every=10", "eval.every=15", "eval.points=40",
    "eval.samples=16", "eval.truth_samples=500", "estimator.samples=32", "model.width=16", "model.depth=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    out = run_command(train_command("configs/quickstart.yaml", *SMALL, f"run.dir={run_dir}"))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir, out


def test_run_directory_holds_logs_tensorboard_and_plots(finished_run):
    run_dir, _ = finished_run
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.pt"):
        assert (run_dir / name).is_file(), name
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 500
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/residual", "train/terminal", "train/lr", "train/steps_per_second"} <= tags
    assert {"eval/l1_rel", "eval/l2_rel", "eval/grad_l2_rel"} <= tags
    for name in PLOTS:
        path = run_dir / "plots" / name
        assert path.stat().st_size > 10_000, name
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 300 and image.shape[1] > 500 and image.std() > 0.05, name


def test_redirected_log_has_plain_lines(finished_run):
    _, out = finished_run
    assert "\r" not in out.stdout and "\x1b" not in out.stdout
    lines = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["10/30", "15/30", "20/30", "30/30"]
    assert all("steps/s" in line and "ETA" in line and "loss" in line for line in lines)
    assert "L2 " in lines[-1] and "grad " in lines[-1]


def test_evaluate_reproduces_the_final_errors(finished_run):
    run_dir, _ = finished_run
    summary = json.loads((run_dir / "summary.json").read_text())
    for name in PLOTS:
        (run_dir / "plots" / name).unlink()
    out = run_command([sys.executable, "launch/evaluate.py", "--run", str(run_dir)])
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((run_dir / "eval.json").read_text())
    for key in ("l1_rel", "l2_rel", "grad_l2_rel"):
        assert result[key] == pytest.approx(summary[key], rel=1e-12, abs=0)
        assert f"{result[key]:.6f}" in out.stdout
    assert all((run_dir / "plots" / name).is_file() for name in PLOTS)


def test_evaluate_refuses_a_folder_that_is_no_run(tmp_path):
    out = run_command([sys.executable, "launch/evaluate.py", "--run", str(tmp_path)])
    assert out.returncode == 2 and "no config.yaml there" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("script", ["train.py", "make_dataset.py", "evaluate.py", "bench.py"])
def test_every_launch_script_has_help(script):
    out = run_command([sys.executable, f"launch/{script}", "--help"])
    assert out.returncode == 0 and out.stdout.startswith("usage:") and len(out.stdout.splitlines()) > 5
