"""What a user sees: log lines, TensorBoard, plots, evaluate.py, --help."""

from __future__ import annotations

import json
import sys

import matplotlib.image
import pytest
from distributed_utils import run_command, run_here, train_command

from dstein.plots import PLOTS

SMALL = [
    "train.steps=30", "train.log_every=5", "train.print_every=10", "eval.every=15", "eval.points=40",
    "eval.samples=16", "eval.truth_samples=500", "estimator.samples=32", "model.width=16", "model.depth=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    out = run_here("train.py", "--config", "configs/quickstart.yaml", *SMALL, "eval.process_points=32",
                   "pde.process_share=0.5", "eval.control_paths=64", "eval.control_steps=4",
                   "eval.consistency_points=64", f"run.dir={run_dir}")  # fmt: skip
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
    # the quickstart's hard constraint holds the terminal condition: no terminal loss term
    assert {"train/loss", "train/residual", "train/lr", "train/steps_per_second"} <= tags
    assert not any(tag.startswith("train/terminal") for tag in tags)
    assert {"eval/l1_rel", "eval/l2_rel", "eval/grad_l2_rel", "eval/gradient_floor"} <= tags
    assert {
        "eval/baseline_constant_l2_rel",
        "eval/baseline_t_only_l2_rel",
        "eval/baseline_condition_value_grad_l2_rel",
    } <= tags
    for name in PLOTS:
        path = run_dir / "plots" / name
        assert path.stat().st_size > 10_000, name
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 300 and image.shape[1] > 500 and image.std() > 0.05, name


def test_every_evaluation_stands_beside_its_baselines(finished_run):
    """summary.json and each eval row of metrics.jsonl carry the baselines (best constant,
    best function of t, terminal value, and the best constant under the quickstart's hard
    constraint) and the gradient floor; a run that does not beat the best function of t says
    so in one warning line."""
    run_dir, out = finished_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["baselines"]) == {"constant", "t_only", "condition_value", "constrained_constant"}
    for errors in summary["baselines"].values():
        assert set(errors) == {"l1_rel", "l2_rel", "grad_l2_rel"}
    assert summary["baselines"]["t_only"]["grad_l2_rel"] == 1.0 and 0 <= summary["gradient_floor"] < 1e-6  # d <= width
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "l2_rel" in r]
    assert evals and all(r["baselines"] == summary["baselines"] and "gradient_floor" in r for r in evals)
    for key, baselines in (("l2_rel", "baselines"), ("process_l2_rel", "process_baselines")):
        warnings = [line for line in out.stderr.splitlines() if line.startswith(f"warning: the solution error {key}=")]
        beaten = summary[key] < summary[baselines]["t_only"]["l2_rel"]
        assert len(warnings) == (0 if beaten else 1), out.stderr[-2000:]


def test_every_evaluation_reports_the_value_at_the_start_state(finished_run):
    """u(0, x0), the value at the state HJB's process starts from, beside its Cole-Hopf
    reference: in every eval row of metrics.jsonl, TensorBoard, summary.json and the last line."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, out = finished_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["start_name"] == "u(0,0)" and summary["start_source"].startswith("Cole-Hopf Monte Carlo")
    reference = summary["reference"]["u(0,0)"]
    assert summary["start_value"] == reference["model"] and summary["start_reference"] == reference["reference"]
    assert summary["start_rel_error"] == pytest.approx(abs(reference["model"] / reference["reference"] - 1))
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "l2_rel" in r]
    assert [r["step"] for r in evals] == [15, 30] and all(r["start_reference"] == reference["reference"] for r in evals)
    assert evals[-1]["start_value"] == summary["start_value"]
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("eval/start_rel_error")] == [15, 30]
    last = out.stdout.strip().splitlines()[-1]
    assert f"u(0,0) {summary['start_value']:.4f} (reference {summary['start_reference']:.4f}, " in last, last


def test_every_evaluation_reports_the_errors_along_the_process(finished_run):
    """The second test set, along the process from the start state: its errors, gradient floor
    and baselines in every eval row, summary.json, TensorBoard, the progress and last lines; a
    second panel of errors.png."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, out = finished_run
    summary = json.loads((run_dir / "summary.json").read_text())
    keys = ("process_l1_rel", "process_l2_rel", "process_grad_l2_rel", "process_gradient_floor")
    assert all(0 <= summary[k] < 10 for k in keys) and summary["process_l2_rel"] != summary["l2_rel"]
    assert set(summary["process_baselines"]) == set(summary["baselines"])
    assert summary["process_baselines"]["t_only"] != summary["baselines"]["t_only"]  # fitted on the other set
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "l2_rel" in r]
    assert all(r["process_baselines"] == summary["process_baselines"] and set(keys) <= set(r) for r in evals)
    assert evals[-1]["process_l2_rel"] == summary["process_l2_rel"]
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("eval/process_grad_l2_rel")] == [15, 30]
    assert "eval/process_baseline_t_only_l2_rel" in events.Tags()["scalars"]
    assert f"process L2 {summary['process_l2_rel']:.4f}" in out.stdout
    assert f"along the process: L2 rel {summary['process_l2_rel']:.4f}" in out.stdout.strip().splitlines()[-1]
    image = matplotlib.image.imread(run_dir / "plots" / "errors.png")
    assert image.shape[1] > 1.6 * image.shape[0]  # two panels side by side


def test_the_run_ends_with_the_closed_loop_cost_of_its_control(finished_run):
    """eval.control_paths: the learned feedback's closed-loop cost, its standard error and
    time-step bias, the gap to the model's u(0, 0) and the uncontrolled cost, in summary.json
    and one line."""
    run_dir, out = finished_run
    control = json.loads((run_dir / "summary.json").read_text())["control"]
    assert control["paths"] == 64 and control["steps"] == 4 and control["cost_se"] > 0
    assert control["value"] == json.loads((run_dir / "summary.json").read_text())["start_value"]
    assert control["gap"] == pytest.approx(control["cost"] - control["value"], rel=1e-12)
    assert control["uncontrolled"] > 0 and control["start_name"] == "u(0,0)"
    line = next(line for line in out.stdout.splitlines() if line.startswith("closed loop (64 paths, 4 steps)"))
    assert f"cost J {control['cost']:.5f}" in line and "uncontrolled" in line and "gap J - u(0,0)" in line


def test_the_run_ends_with_the_consistency_along_the_process(finished_run):
    """eval.consistency_points: E[g(X_T) + int f] with the model frozen in f, beside the model's
    own u(0, 0) (the same number as the run's start value) and the reference, in summary.json
    and one line."""
    run_dir, out = finished_run
    summary = json.loads((run_dir / "summary.json").read_text())
    check = summary["consistency"]
    assert check["points"] == 64 and check["se"] > 0 and check["model"] == summary["start_value"]
    assert check["gap"] == pytest.approx(check["model"] - check["value"], rel=1e-12)
    assert check["reference"] == summary["start_reference"] and check["terminal_draws"] == 4096
    line = next(line for line in out.stdout.splitlines() if line.startswith("consistency along the process (64"))
    assert f"{check['value']:.6g}" in line and "reference" in line


def test_a_reference_line_far_from_the_curves_does_not_stretch_the_axis(tmp_path):
    """A gradient floor of 1e-15 (d <= width) pulled errors.png's log axis down to 1e-15 and
    squeezed every curve into the top of the figure: such a line is named in the legend only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dstein.plots import _reference_lines

    fig, ax = plt.subplots()
    ax.plot([1, 2], [0.01, 0.2])
    _reference_lines(ax, [("floor", 1e-15, ":", "C2"), ("t only", 0.1, "--", "0.35")], [0.01, 0.2])
    low, high = ax.get_ylim()
    assert low == pytest.approx(0.005) and high == pytest.approx(0.4)
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["floor: 1e-15, off the axis", "t only"]
    assert len(ax.get_lines()) == 3  # the curve, the line drawn, the legend entry of the other
    plt.close(fig)


def test_the_slice_has_fewer_points_only_where_each_costs_a_huge_input():
    from dstein.report import slice_points

    assert [slice_points(d) for d in (1, 250, 10_000, 100_000)] == [200] * 4
    assert slice_points(400_000) == 50 and slice_points(1_000_000) == 50 and slice_points(10**8) == 50


def test_a_first_layer_narrower_than_d_is_warned_of_once(tmp_path):
    out = run_command(train_command("configs/quickstart.yaml", *SMALL, "train.steps=2", "pde.dim=40",
                                    "eval.plots=false", f"run.dir={tmp_path}"))  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if "pde.dim=40 > model.width=16" in line]
    assert len(lines) == 1 and "sqrt(1 - 16/40) = 0.77" in lines[0]


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
    out = run_here("evaluate.py", "--run", str(run_dir), "--control", "--paths", "64", "--steps", "4",
                   "--consistency", "64")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((run_dir / "eval.json").read_text())
    for key in ("l1_rel", "l2_rel", "grad_l2_rel", "gradient_floor"):
        for prefix in ("", "process_"):
            assert result[prefix + key] == pytest.approx(summary[prefix + key], rel=1e-12, abs=1e-15)
            assert f"{result[prefix + key]:.6f}" in out.stdout
    assert result["process_baselines"] == summary["process_baselines"] and result["process_points"] == 32
    assert "along the process from the start state (32 points):" in out.stdout
    for key in ("cost", "cost_se", "time_step_bias", "uncontrolled", "gap"):  # the same paths as the run's end
        assert result["control"][key] == pytest.approx(summary["control"][key], rel=1e-9), key
    assert "closed loop (64 paths, 4 steps): cost J" in out.stdout
    assert result["consistency"]["value"] == pytest.approx(summary["consistency"]["value"], rel=1e-12)
    assert "consistency along the process (64 points)" in out.stdout
    assert result["baselines"] == summary["baselines"]
    assert result["start_value"] == pytest.approx(summary["start_value"], rel=1e-12)
    assert f"u(0,0): model {summary['start_value']:.6f}, reference {summary['start_reference']:.6f}" in out.stdout
    header = next(line for line in out.stdout.splitlines() if line.startswith("metric"))
    # 40 test points: too few for the radial fit's 20 points per coefficient
    assert header.split() == ["metric", "model", "constant", "t_only", "condition_value", "constrained_constant"]
    t_only = f"{summary['baselines']['t_only']['l2_rel']:.6f}"
    assert any(line.startswith("l2_rel") and t_only in line for line in out.stdout.splitlines())
    assert all((run_dir / "plots" / name).is_file() for name in PLOTS)


def test_evaluate_control_refuses_a_pde_that_is_no_control_problem(tmp_path):
    """--control on a Poisson run: one line naming the option and the PDEs it takes, exit 2."""
    out = run_here("train.py", "--config", "configs/poisson_2d.yaml", "train.steps=2", "eval.points=8",
                   "eval.samples=8", "estimator.samples=16", "model.width=8", "eval.plots=false",
                   f"run.dir={tmp_path}")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_command([sys.executable, "launch/evaluate.py", "--run", str(tmp_path), "--control"])
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("error: --control: pde poisson is not a stochastic control problem")
    out = run_command([sys.executable, "launch/evaluate.py", "--run", str(tmp_path), "--control", "--steps", "3"])
    assert out.returncode == 2 and "--steps must be even and >= 2" in out.stderr
    out = run_command([sys.executable, "launch/evaluate.py", "--run", str(tmp_path), "--consistency", "16"])
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("error: --consistency: pde poisson has no forward process")


def test_evaluate_refuses_a_folder_that_is_no_run(tmp_path):
    out = run_command([sys.executable, "launch/evaluate.py", "--run", str(tmp_path)])
    assert out.returncode == 2 and "no config.yaml there" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("script", ["train.py", "make_dataset.py", "evaluate.py", "bench.py"])
def test_every_launch_script_has_help(script):
    out = run_command([sys.executable, f"launch/{script}", "--help"])
    assert out.returncode == 0 and out.stdout.startswith("usage:") and len(out.stdout.splitlines()) > 5


def test_bench_original_names_a_missing_checkout(tmp_path):
    out = run_command([sys.executable, "launch/bench.py", "--suite", "original", "--original", str(tmp_path),
                       "--out", str(tmp_path / "x.json")])  # fmt: skip
    assert out.returncode == 2 and "not a checkout of LithiumDA/PINN-without-Stacked-BP" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_bench_peers_reports_speed_memory_and_errors_per_method(tmp_path):
    """--suite peers at a tiny size: one record per method, each with its steps per second,
    peak memory, final errors beside the baselines and the evaluations the time to the
    target error is read from."""
    out_file = tmp_path / "peers.json"
    out = run_command([sys.executable, "launch/bench.py", "--suite", "peers", "--pdes", "sine_gordon", "--dims", "30",
                       "--peer-methods", "config", "hutchinson-16", "--budget-steps", "4", "--target-l2", "10",
                       "--tmp", str(tmp_path / "scratch"), "--out", str(out_file), "--",
                       "model.width=8", "train.domain_points=6", "eval.every=2", "eval.points=16",
                       "eval.samples=8"])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    runs = json.loads(out_file.read_text())["runs"]
    assert set(runs) == {"sine_gordon/d=30/config", "sine_gordon/d=30/hutchinson-16"}
    for key, run in runs.items():
        assert run["method"] == ("hutchinson" if "hutchinson" in key else "stein-subspace")
        assert run["steps"] == 4 and run["steps_per_second"] > 0 and run["peak_memory_mb"] > 50
        assert [e["step"] for e in run["evals"]] == [2, 4]
        assert run["seconds_to_target"] == run["evals"][0]["seconds"]  # target 10: the first evaluation
        assert run["below_constrained_constant"] == (run["l2_rel"] < run["baselines"]["constrained_constant"]["l2_rel"])
        assert "pde.dim=30" in run["command"]


@pytest.mark.slow
def test_bench_times_steps_in_ranks_of_its_own_and_the_loop_of_a_training_run(tmp_path):
    """--suite methods starts a rank (python -m dstein.bench.measure) that times training steps
    and their memory; --suite floor trains through launch/train.py and reads the loop's rate
    from metrics.jsonl, leaving out the start-up and the first logged rows."""
    out_file = tmp_path / "methods.json"
    out = run_command([sys.executable, "launch/bench.py", "--suite", "methods", "--dims", "20", "--methods",
                       "autograd", "--warmup", "1", "--steps", "2", "--tmp", str(tmp_path / "scratch"),
                       "--out", str(out_file)])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (record,) = json.loads(out_file.read_text())["runs"].values()
    assert record["method"] == "autograd" and len(record["step_seconds"]) == 2 and record["world_size"] == 1
    assert record["median_step_seconds"] > 0 and record["peak_rss_mb"] >= record["rss_before_steps_mb"] > 50
    out_file = tmp_path / "floor.json"
    out = run_command([sys.executable, "launch/bench.py", "--suite", "floor", "--floor", "fixed-cost",
                       "--budget-steps", "150", "--rounds", "1", "--tmp", str(tmp_path / "scratch"),
                       "--out", str(out_file), "--", "eval.points=16", "eval.samples=8"])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out_file.read_text())
    (run,) = result["runs"]["fixed-cost"]
    assert (run["from_step"], run["to_step"]) == (50, 150) and run["steps_per_second"] > 1
    assert run["ms_per_step"] == pytest.approx(1000 / run["steps_per_second"])
    assert result["best_ms_per_step"] == {"fixed-cost": run["ms_per_step"]}
    assert run["command_seconds"] > 100 / run["steps_per_second"]
    short = run_command([sys.executable, "launch/bench.py", "--suite", "floor", "--budget-steps", "60",
                         "--out", str(tmp_path / "short.json")])  # fmt: skip
    assert short.returncode != 0 and not (tmp_path / "short.json").exists()
    assert short.stderr.strip().splitlines()[-1] == (
        "error: --budget-steps=60: the floor suite times steps 50 to the last, so it needs at least 100"
    )


#: A stand-in for STDE's sine_gordon.py (its command line, its unseeded coefficient draw, its
#: tqdm training loop and its l2_rel lines), to check the floor suite's STDE column without jax.
FAKE_STDE = """
import argparse
import numpy as np
from tqdm import tqdm
parser = argparse.ArgumentParser()
for name in ("--dim", "--epochs", "--eval_every", "--rand_batch_size"):
    parser.add_argument(name, type=int)
parser.add_argument("--sparse", action="store_true")
args = parser.parse_args()
np.save("coefficients-seen.npy", np.random.randn(1, args.dim))
for step in tqdm(range(args.epochs)):
    if step % args.eval_every == 0:
        print(f"l1_rel=1.00E-01 | l2_rel={0.5 / (step + 1):.2E} | loss=1.00E+00")
"""


@pytest.mark.slow
def test_bench_floor_runs_stde_beside_the_two_body_config_on_the_same_coefficients(tmp_path):
    """--stde: after the two-body config named d = 100 (trained at d = 30 here, to be quick),
    STDE's script (here a stand-in with its interface) runs at d = 100 on dstein's coefficients
    (its first randn of shape (1, d) returns them and a zero); its loop's rate comes from the
    shim's per-step times, its error from its last l2_rel line."""
    import numpy as np

    from dstein.pdes import build_pde

    script = tmp_path / "stde" / "sine_gordon.py"
    script.parent.mkdir()
    script.write_text(FAKE_STDE)
    out_file = tmp_path / "floor.json"
    out = run_command([sys.executable, "launch/bench.py", "--suite", "floor", "--floor", "sine_gordon/d=100",
                       "--budget-steps", "120", "--rounds", "1", "--stde", str(script), "--stde-python", sys.executable,
                       "--tmp", str(tmp_path / "scratch"), "--out", str(out_file), "--", "pde.dim=30",
                       "eval.points=16", "eval.samples=8"])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    runs = json.loads(out_file.read_text())["runs"]
    (peer,) = runs["stde/d=100"]  # named by the config it stands beside
    assert peer["l2_rel"] == pytest.approx(0.5 / 120, rel=1e-2) and (peer["from_step"], peer["to_step"]) == (51, 119)
    assert peer["steps_per_second"] > 100 and "--epochs 120 --eval_every 119 --sparse" in peer["command"]
    seen = np.load(script.parent / "coefficients-seen.npy")
    assert seen.shape == (1, 100) and seen[0, -1] == 0.0
    assert np.array_equal(seen[0, :-1], build_pde("sine_gordon", 100, {"coeff_seed": 0}).coeffs.numpy())


def test_metrics_of_an_earlier_start_are_moved_aside_never_lost(tmp_path):
    """A resumed run's file reads as one uninterrupted run, but nothing an earlier start wrote
    is thrown away: rows past the checkpoint and a line cut by a kill mid-write go to
    metrics.discarded.jsonl; a fresh start over an earlier run keeps that file whole; a resume
    with nothing to move appends to the same file."""
    import json

    from dstein.metrics import MetricsLog, read_metrics

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": float(s)} for s in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "loss": 0.')  # killed mid-write
    log = MetricsLog(path, after=3)
    log.write({"step": 4, "loss": 40.0})
    log.close()
    assert read_metrics(path) == [*rows[:3], {"step": 4, "loss": 40.0}]
    aside = (tmp_path / "metrics.discarded.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in aside[:2]] == rows[3:] and aside[2] == '{"step": 6, "loss": 0.'
    assert log.note == ("note: 2 rows of metrics.jsonl after step 3 (steps the stopped run made past its last "
                        "checkpoint) moved to metrics.discarded.jsonl; 1 unreadable line of metrics.jsonl (cut by a "
                        "stop mid-write) moved to metrics.discarded.jsonl")  # fmt: skip
    inode = path.stat().st_ino
    MetricsLog(path, after=4).close()  # nothing past step 4: the same file, appended to
    assert path.stat().st_ino == inode and read_metrics(path)[-1] == {"step": 4, "loss": 40.0}
    before = path.read_bytes()
    fresh = MetricsLog(path, after=0)
    fresh.close()
    (kept,) = tmp_path.glob("metrics.before-*.jsonl")
    assert kept.read_bytes() == before and path.read_text() == "" and "is kept as metrics.before-" in fresh.note


@pytest.mark.parametrize("feature", ["log", "both"])
def test_a_radial_model_built_to_be_loaded_takes_its_feature_statistics_from_the_state(root, feature):
    """evaluate.py and dstein.load build the model with loaded=True: the radial feature's
    statistics (1.3 s of drawing at d = 10^4) are not drawn but come with the saved state, so
    the loaded model is the trained one; a model built to train draws them, one pair per
    function of |x|^2 (two with ``both``; one function keeps scalar buffers, the layout of
    states saved before ``both``)."""
    import torch

    from dstein.build import build_model, feature_sample
    from dstein.config import load_config
    from dstein.models import RADIAL_KINDS, radial_phi
    from dstein.pdes import build_pde

    overrides = ["model.width=8", "model.depth=2", "pde.dim=30", f"model.radial_feature={feature}"]
    cfg = load_config(root / "configs/hjb_100.yaml", overrides)
    pde = build_pde(cfg.pde.name, cfg.pde.dim, dict(cfg.pde.params))
    trained = build_model(cfg, pde, torch.float64, torch.device("cpu"))
    kinds = RADIAL_KINDS[feature]
    assert trained.radial.weight.shape == (8, len(kinds))
    assert trained.q_shift.shape == (() if len(kinds) == 1 else (len(kinds),))
    for j, kind in enumerate(kinds):
        q = radial_phi(feature_sample(cfg, pde), kind)
        stats = float(q.mean()), float(q.std())  # kept as float32 buffers
        got = trained.q_shift.reshape(-1)[j], trained.q_scale.reshape(-1)[j]
        assert (float(got[0]), float(got[1])) == pytest.approx(stats, rel=1e-7)
    blank = build_model(cfg, pde, torch.float64, torch.device("cpu"), loaded=True)
    assert torch.all(blank.q_shift == 0) and torch.all(blank.q_scale == 1)
    blank.load_state_dict(trained.state_dict())
    X = torch.randn(5, pde.in_dim, dtype=torch.float64)
    assert torch.equal(blank(X), trained(X))


def test_a_trained_solution_loads_as_an_object_from_the_run_or_a_checkpoint(finished_run, tmp_path):
    """dstein.load gives u, grad u and HJB's control at a user's points: what the run
    evaluated (its value at the start state is summary.json's, bit for bit), from model.pt or
    the newest checkpoint alike, without touching the caller's random generators."""
    import numpy as np
    import torch

    import dstein
    from dstein.errors import ConfigError

    run_dir, _ = finished_run
    summary = json.loads((run_dir / "summary.json").read_text())
    before = torch.get_rng_state()
    solution = dstein.load(run_dir)
    assert torch.equal(torch.get_rng_state(), before)
    assert solution.dim == 10 and solution.time_dependent
    x0 = torch.zeros(1, 10, dtype=torch.float64)
    assert float(solution.u(x0, 0.0)[0]) == summary["start_value"]
    x = torch.randn(70, 10, dtype=torch.float64)  # two evaluation blocks
    t = torch.rand(70, dtype=torch.float64)
    u, grad = solution(x, t), solution.grad(x, t)
    assert u.shape == (70,) and grad.shape == (70, 10) and torch.equal(solution.control(x, t), -grad)
    latest = dstein.load(run_dir, checkpoint="latest")  # step 30, the final state
    assert torch.equal(latest.u(x, t), u)
    with pytest.raises(ValueError, match=r"x has shape \(70, 9\), expected \(points, 10\)"):
        solution.u(x[:, :9], t)
    with pytest.raises(ValueError, match="depends on t: pass t"):
        solution.u(x)
    with pytest.raises(ConfigError, match=r"no model\.pt there"):
        dstein.load(tmp_path)
    points = tmp_path / "points.txt"
    np.savetxt(points, np.concatenate([x[:3].numpy(), t[:3, None].numpy()], 1))
    out = run_command([sys.executable, "launch/evaluate.py", "--run", str(run_dir), "--at", str(points)])
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.split()[:1] == ["point"]) :]  # DeepSpeed's notes first
    assert lines[0].split() == ["point", "u", "|grad", "u|"] and len(lines) == 4
    assert [float(line.split()[1]) for line in lines[1:]] == pytest.approx(u[:3].tolist(), abs=1e-6)
    np.savetxt(points, x[:3].numpy())  # without t
    out = run_command([sys.executable, "launch/evaluate.py", "--run", str(run_dir), "--at", str(points)])
    assert out.returncode == 2 and "rows of 10 numbers, expected 11 (x_1 .. x_d, then t)" in out.stderr
