"""Reliability: every bad input ends in exit status 2 and one line; numerical faults follow
train.nonfinite on every rank alike; the run directory is locked; failed writes leave the
previous complete file or checkpoint usable.

Faults are injected through DSTEIN_FAULT (dstein/faults.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_utils import ROOT, base_env, free_port, run_here, spawn_ranks, wait_all
from test_checkpoint import CONFIG, TINY, finish, last_step, losses, start, train_here, train_to_end

from dstein.checkpoint import MARKER, scan, step_dir

SMALL = ["pde.dim=5", "model.width=16", "model.depth=2", "estimator.samples=64", "estimator.condition_samples=8",
         "train.steps=2", "eval.points=8", "eval.truth_samples=100", "eval.plots=false",
         "eval.control_paths=0"]  # fmt: skip


@pytest.fixture(scope="module")
def hjb5_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "hjb5.h5"
    cmd = [sys.executable, "launch/make_dataset.py", "--config", CONFIG, "--out", str(out), "--steps", "2",
           "--test-points", "8", "--truth-samples", "100", *SMALL]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


#: One rank, and two (kept serial with the other multi-rank tests).
WORLDS = [1, pytest.param(2, marks=pytest.mark.ranks)]

# (case, config, overrides, ranks, what the one error line must contain)
BAD = [
    ("unknown key", CONFIG, ["train.stepz=3"], 1, "train.stepz: Key 'stepz' not in 'TrainConfig'"),
    ("wrong type", CONFIG, ["train.steps=abc"], 1, "train.steps: Value 'abc' of type 'str' could not be converted"),
    ("zero sigma", CONFIG, ["estimator.sigma_x=0"], 1, "estimator.sigma_x=0.0 must be > 0"),
    ("negative sigma", CONFIG, ["estimator.sigma_x=-0.1"], 1, "estimator.sigma_x=-0.1 must be > 0"),
    ("zero time sigma", CONFIG, ["estimator.sigma_t=0"], 1, "estimator.sigma_t=0.0 must be > 0"),
    ("zero samples", CONFIG, ["estimator.samples=0"], 1, "estimator.samples=0 must be >= 2"),
    ("negative samples", CONFIG, ["estimator.samples=-8"], 1, "estimator.samples=-8 must be >= 2"),
    ("partial chunk", CONFIG, ["estimator.samples=100", "estimator.chunk=64"], 1,
     "estimator.samples=100 must be a whole number of chunks of estimator.chunk=64"),
    ("odd antithetic samples", CONFIG, ["estimator.samples=255"], 1,
     "estimator.samples=255 must be even for stein-antithetic"),
    ("odd antithetic condition samples", CONFIG, ["estimator.condition_samples=3"], 1,
     "estimator.condition_samples=3 must be even for stein-antithetic"),
    ("odd antithetic chunk", CONFIG, ["estimator.samples=96", "estimator.chunk=3"], 1,
     "estimator.chunk=3 must be even for stein-antithetic"),
    ("unknown method", CONFIG, ["estimator.method=finite-differences"], 1,
     "estimator.method='finite-differences' must be one of"),
    ("bf16 training", CONFIG, ["run.dtype=bfloat16"], 1, "run.dtype='bfloat16': training supports float32 only"),
    ("bf16 products at small sigma", CONFIG, ["run.matmul_precision=medium"], 1,
     "estimator.sigma_x=0.01 is too small for bf16 matmul perturbed forward passes"),
    ("TF32 products at small sigma", CONFIG, ["run.matmul_precision=high"], 1,
     "estimator.sigma_x=0.01 is too small for TF32 matmul perturbed forward passes"),
    ("unknown precision", CONFIG, ["run.matmul_precision=low"], 1, "run.matmul_precision='low' must be one of"),
    ("unknown device", CONFIG, ["run.device=tpu"], 1, "run.device='tpu' must be auto, cpu or cuda"),
    ("non-smooth activation", CONFIG, ["model.activation=relu"], 1, "model.activation='relu' must be one of"),
    ("zero width", CONFIG, ["model.width=0"], 1, "model.width=0 must be >= 1"),
    ("zero learning rate", CONFIG, ["train.lr=0"], 1, "train.lr=0.0 must be > 0"),
    ("unknown nonfinite policy", CONFIG, ["train.nonfinite=ignore"], 1,
     "train.nonfinite='ignore' must be skip or stop"),
    ("uncatchable signal", CONFIG, ["checkpoint.signal=SIGKILL"], 1, "checkpoint.signal='SIGKILL' cannot be caught"),
    ("unknown signal", CONFIG, ["checkpoint.signal=USR9"], 1, "checkpoint.signal='USR9' must be a signal name"),
    ("keep no checkpoint", CONFIG, ["checkpoint.keep=0"], 1, "checkpoint.keep=0 must be >= 1"),
    ("ZeRO 3", CONFIG, ["deepspeed.zero_stage=3"], 1, "deepspeed.zero_stage=3 must be 0, 1 or 2"),
    ("negative clipping", CONFIG, ["deepspeed.gradient_clipping=-1"], 1,
     "deepspeed.gradient_clipping=-1.0 must be >= 0 (0: no clipping)"),
    ("unknown PDE", CONFIG, ["pde.name=wave"], 1,
     "pde.name='wave' is not one of ['allen_cahn', 'bsde_allen_cahn', 'bsde_default_risk', 'bsde_diff_rate', "
     "'heat', 'hjb', 'hjb_aniso', 'poisson', 'sine_gordon']"),
    ("PDE class not importable", CONFIG, ["pde.target=nomodule:Foo"], 1,
     "pde.target='nomodule:Foo' cannot be imported: no module named 'nomodule' on the Python path"),
    ("PDE module raising at import", CONFIG, ["pde.target=user_pde_import_fails:Foo"], 1,
     "pde.target='user_pde_import_fails:Foo': importing user_pde_import_fails failed: KeyError: "
     "'DSTEIN_TEST_PDE_SCALE' ("),
    ("PDE constructor raising", "configs/poisson_2d.yaml", ["pde.target=user_pde:RaisingInit"], 1,
     "pde.target='user_pde:RaisingInit': RaisingInit(5, **{}) raised KeyError: 'scale' ("),
    ("residual not using the derivatives", "configs/poisson_2d.yaml", ["pde.target=user_pde:Unconnected"], 1,
     "pde unconnected: Unconnected.residual does not depend on the derivatives it is given"),
    ("truth that raises", "configs/poisson_2d.yaml", ["pde.target=user_pde:RaisingTruth"], 1,
     "pde raising-truth: RaisingTruth.test_set (sample_test, then truth) raised FloatingPointError: overflow in the "
     "user's closed form ("),
    ("output transform that raises", "configs/poisson_2d.yaml",
     ["pde.target=user_pde:RaisingTransform", "model.hard_constraint=true"], 1,
     "pde raising-transform: RaisingTransform.output_transform raised IndexError: column 7 ("),
    ("residual of integers", "configs/poisson_2d.yaml", ["pde.target=user_pde:IntegerResidual"], 1,
     "pde integer: IntegerResidual.residual returned a tensor of dtype torch.int32, expected floating point"),
    ("derivative no method gives", "configs/poisson_2d.yaml", ["pde.target=user_pde:NeedsHessian"], 1,
     "pde needs-hessian needs ['hess'], which estimator.method=stein-antithetic cannot give"),
    ("gradient along a direction with the subspace estimator", "configs/poisson_2d.yaml",
     ["pde.target=user_pde:Advection", "estimator.method=stein-subspace"], 1,
     "pde advection needs ['grad'], which estimator.method=stein-subspace cannot give"),
    ("odd adversarial samples", CONFIG, ["train.adversarial.samples=33"], 1,
     "train.adversarial.samples=33 must be even for stein-antithetic"),
    ("unknown recompute policy", CONFIG, ["estimator.recompute=sometimes"], 1,
     "estimator.recompute='sometimes' must be auto, always or never"),
    ("missing config file", "configs/nope.yaml", [], 1, "--config configs/nope.yaml: no such file"),
    ("config not YAML", "README.md", [], 1, "--config README.md: expected a .yaml file"),
    ("unwritable run directory", CONFIG, ["run.dir=/proc/dstein-run"], 1,
     "run.dir=/proc/dstein-run cannot be created or written"),
    ("run directory is a file", CONFIG, ["run.dir=README.md/run"], 1, "run.dir=README.md/run cannot be created"),
    ("sample group not dividing the world", CONFIG, ["parallel.sample_group_size=3"], 1,
     "parallel.sample_group_size=3 does not divide the world size 1"),
    ("world size not the launcher's", CONFIG, ["parallel.world_size=2"], 1,
     "parallel.world_size=2 but the launcher (python) started 1 ranks"),
    ("fewer chunks than sample-group ranks", CONFIG, ["estimator.samples=64", "estimator.chunk=64"], 2,
     "estimator.samples=64 in chunks of 64 gives 1 noise chunks, fewer than the 2 ranks of a sample group"),
    ("fewer points than point groups", CONFIG, ["parallel.sample_group_size=1", "train.domain_points=1"], 2,
     "train.domain_points=1 is fewer than the 2 point groups"),
    ("missing data file", CONFIG, ["data.train_file=/nonexistent/train.h5"], 1, "/nonexistent/train.h5"),
    ("data file of another dimension", CONFIG, ["data.test_file={hjb5}", "pde.dim=6"], 1, "{hjb5}"),
    ("data file of another PDE", "configs/heat_100.yaml", ["data.test_file={hjb5}", "pde.dim=5"], 1, "{hjb5}"),
    ("missing checkpoint", CONFIG, ["checkpoint.resume=/nonexistent/ckpt"], 1,
     "checkpoint.resume=/nonexistent/ckpt: no such directory"),
    ("difference Laplacian without pairs", CONFIG, ["estimator.method=stein"], 1,
     "estimator.laplacian=difference needs antithetic pairs: estimator.method=stein has none"),
    ("unknown residual loss", CONFIG, ["train.residual_loss=l1"], 1, "train.residual_loss='l1' must be one of"),
    ("unknown model family", CONFIG, ["model.family=cnn"], 1, "model.family='cnn' must be one of"),
    ("unknown radial feature", CONFIG, ["model.radial_feature=cube"], 1,
     "model.radial_feature='cube' must be one of ('square', 'log', 'both')"),
    ("unknown Adam implementation", CONFIG, ["train.adam=sparse"], 1, "train.adam='sparse' must be auto or fused"),
    ("unknown output initialization", CONFIG, ["model.output_init=zero"], 1,
     "model.output_init='zero' must be default or fit"),
    ("hard constraint the PDE has none of", "configs/poisson_2d.yaml", ["model.hard_constraint=true"], 1,
     "model.hard_constraint=true: pde poisson has no output transform"),
    ("smoothed constraint without the constraint", "configs/poisson_2d.yaml", ["model.smooth_constraint=true"], 1,
     "model.smooth_constraint=true smooths the hard constraint's A: it needs model.hard_constraint=true"),
    ("smoothed constraint the PDE has none of", "configs/sine_gordon_1k.yaml",
     ["model.smooth_constraint=true", "pde.dim=5"], 1,
     "model.smooth_constraint=true: pde sine_gordon has no smoothed output transform"),
    ("points along a process the PDE has none of", "configs/poisson_2d.yaml", ["pde.process_share=0.5"], 1,
     "pde.process_share=0.5: pde poisson declares no forward process from a start state"),
    ("share of points along the process above 1", CONFIG, ["pde.process_share=1.5"], 1,
     "pde.process_share=1.5 must be a finite number >= 0 and <= 1"),
    ("odd time steps of the closed loop", CONFIG, ["eval.control_steps=7"], 1,
     "eval.control_steps=7 must be even, >= 2 and <= 100000"),
    ("negative points along the process", CONFIG, ["eval.process_points=-1"], 1,
     "eval.process_points=-1 must be >= 0"),
    ("non-radial constraint with the radial subspace", "configs/poisson_2d.yaml",
     ["pde.target=user_pde:NonRadialTransform", "pde.dim=8", "model.width=4", "model.family=radial",
      "estimator.method=stein-subspace", "model.hard_constraint=true"], 1,
     "NonRadialTransform.output_transform().A_grad does not point along x"),
    ("unbiased loss of one chunk", CONFIG, ["estimator.samples=64", "estimator.chunk=64"], 1,
     "train.residual_loss=unbiased needs two independent estimates"),
    # numbers: finite and in a sane range; sizes against the memory a rank has
    ("infinite sigma", CONFIG, ["estimator.sigma_x=inf"], 1, "estimator.sigma_x=inf must be a finite number > 0"),
    ("infinite learning rate", CONFIG, ["train.lr=inf"], 1, "train.lr=inf must be a finite number > 0 and <= 10"),
    ("infinite condition weight", CONFIG, ["train.condition_weight=inf"], 1,
     "train.condition_weight=inf must be a finite number >= 0"),
    ("infinite timeout", CONFIG, ["parallel.timeout_s=inf"], 1, "parallel.timeout_s=inf must be a finite number > 0"),
    ("absurd timeout", CONFIG, ["parallel.timeout_s=1e300"], 1, "parallel.timeout_s=1e+300 must be a finite number"),
    ("absurd width", CONFIG, ["model.width=10000000000"], 1, "model.width=10000000000 must be >= 1 and <= 1048576"),
    ("absurd samples", CONFIG, ["estimator.samples=10000000000"], 1,
     "estimator.samples=10000000000 must be <= 16777216 per point"),
    ("dimension beyond memory", CONFIG, ["pde.dim=100000000"], 1,
     "eval.samples=256, pde.dim=100000000: the evaluation of a block of test points would take about"),
    ("appended unknown key", CONFIG, ["+train.stepz=5"], 1, "train.stepz: Key 'stepz' not in 'TrainConfig'"),
    ("no defaults line, with an override", "tests/bare_config.yaml", ["train.steps=3"], 1,
     "must begin with 'defaults: [dstein, _self_]'"),
    # a user's PDE: refused before training, naming the class and the method
    ("residual that raises", "configs/poisson_2d.yaml", ["pde.target=user_pde:RaisingResidual"], 1,
     "pde raising: RaisingResidual.residual raised ZeroDivisionError: the user's bug"),
    ("residual of the wrong shape", "configs/poisson_2d.yaml", ["pde.target=user_pde:WrongShape"], 1,
     "pde wrong-shape: WrongShape.residual returned (3, 1), expected a tensor of shape (3,)"),
]  # fmt: skip


# Refused while the config is read, before any process group exists: checked in this process
# (launch/train.py's main() returns the exit status), with training patched to fail if reached.
AT_LOAD = {
    "unknown key", "wrong type", "zero sigma", "negative sigma", "zero time sigma", "zero samples",
    "negative samples", "partial chunk", "odd antithetic samples", "odd antithetic condition samples",
    "odd antithetic chunk", "unknown method", "bf16 training", "unknown precision", "unknown device",
    "non-smooth activation", "zero width", "zero learning rate", "unknown nonfinite policy", "uncatchable signal",
    "unknown signal", "keep no checkpoint", "ZeRO 3", "missing config file", "config not YAML",
    "odd adversarial samples", "unknown recompute policy", "difference Laplacian without pairs",
    "unknown residual loss", "unknown model family", "infinite sigma", "infinite learning rate",
    "infinite condition weight", "infinite timeout", "absurd timeout", "absurd width", "absurd samples",
    "appended unknown key", "no defaults line, with an override", "smoothed constraint without the constraint",
}  # fmt: skip


#: The other one-rank cases are refused once training is being built (a process group, DeepSpeed):
#: they run one after another in one process (tests/scripts/bad_inputs.py), each with a new run
#: directory, instead of a process each (about 2 s of start-up apiece).
IN_ONE_PROCESS = [b[0] for b in BAD if b[3] == 1 and b[0] not in AT_LOAD]
BATCH = pytest.mark.xdist_group("bad-inputs")


@pytest.fixture(scope="module")
def refused(tmp_path_factory, hjb5_file) -> dict[str, dict]:
    """Every IN_ONE_PROCESS case's exit status and standard error, from one process; the
    run directory each named (``run_dirs``) is kept to check that nothing was written."""
    root = tmp_path_factory.mktemp("refused")
    cases = {}
    for case, config, overrides, _, _ in (b for b in BAD if b[0] in IN_ONE_PROCESS):
        run_dir = root / f"run-{len(cases)}"
        cases[case] = ["--config", config, *SMALL, f"run.dir={run_dir}",
                       *(o.replace("{hjb5}", str(hjb5_file)) for o in overrides)]  # fmt: skip
    spec, out = root / "cases.json", root / "results.json"
    spec.write_text(json.dumps(cases))
    done = subprocess.run([sys.executable, "tests/scripts/bad_inputs.py", str(spec), str(out)], cwd=ROOT,
                          env=base_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    for i, case in enumerate(cases):
        results[case]["run_dir"] = str(root / f"run-{i}")
    return results


@pytest.mark.parametrize(
    ("case", "config", "overrides", "ranks", "message"),
    [pytest.param(*b, id=b[0], marks=[pytest.mark.ranks] if b[3] > 1 else [BATCH] if b[0] in IN_ONE_PROCESS else [])
     for b in BAD],
)  # fmt: skip
def test_bad_input_exits_2_with_one_line(tmp_path, hjb5_file, monkeypatch, capsys, request, case, config, overrides,
                                         ranks, message):  # fmt: skip
    if case in IN_ONE_PROCESS:
        result = request.getfixturevalue("refused")[case]
        message = message.replace("{hjb5}", str(hjb5_file))
        err = result["stderr"]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert result["status"] == 2 and "Traceback" not in err, (result["status"], err[-3000:])
        assert len(errors) == 1 and message in errors[0], err[-3000:]
        assert not Path(result["run_dir"]).exists()  # refused before anything was written: no trace left
        return
    if case in AT_LOAD:
        import dstein.train
        from launch.train import main

        def reached(*args, **kwargs):
            raise AssertionError("the bad input reached training")

        monkeypatch.setattr(dstein.train, "run", reached)
        monkeypatch.chdir(ROOT)
        assert main(["--config", config, *SMALL, f"run.dir={tmp_path / 'run'}", *overrides]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
        return
    overrides = [o.replace("{hjb5}", str(hjb5_file)) for o in overrides]
    message = message.replace("{hjb5}", str(hjb5_file))
    args = ["launch/train.py", "--config", config, *SMALL, f"run.dir={tmp_path / 'run'}", *overrides]
    if ranks == 1:
        done = subprocess.run([sys.executable, *args], cwd=ROOT, env=base_env(), capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        results = [(done.returncode, done.stdout, done.stderr)]
    else:
        results = wait_all(spawn_ranks(args, ranks, port=free_port()), timeout=300)
    for code, _, err in results:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and "Traceback" not in err, (code, err[-3000:])
        assert len(errors) <= 1 and all(message in line for line in errors), err[-3000:]
    assert any(message in line for _, _, err in results for line in err.splitlines() if line.startswith("error:"))
    assert not (tmp_path / "run").exists()  # refused before anything was written: no trace left


def test_a_user_pde_module_with_a_syntax_error_is_named_with_its_line(tmp_path, monkeypatch):
    from dstein.pdes import build_pde

    (tmp_path / "broken_pde.py").write_text("import torch\n\ndef residual(X, D:\n    return X\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError) as caught:
        build_pde("x", 3, {}, "broken_pde:Broken")
    assert str(caught.value).startswith("pde.target='broken_pde:Broken': importing broken_pde failed: SyntaxError: ")
    assert str(caught.value).endswith(f"({tmp_path / 'broken_pde.py'}:3)") and "\n" not in str(caught.value)


def test_debug_shows_the_traceback(tmp_path):
    args = ["launch/train.py", "--config", CONFIG, "--debug", "estimator.sigma_x=0", f"run.dir={tmp_path}"]
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=base_env(), capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" in done.stderr


# --- numerical faults ----------------------------------------------------------------------


def updates_in(path: Path) -> tuple[int, list[int]]:
    """DeepSpeed's count of optimizer steps in a checkpoint, and Adam's per-parameter counts."""
    state = torch.load(path / "mp_rank_00_model_states.pt", weights_only=False)
    adam = [int(v["step"]) for v in state["optimizer"]["state"].values()]
    return int(state["global_steps"]), adam


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_nonfinite_step_is_skipped_on_every_rank(tmp_path, world):
    """A NaN residual on the last rank only, in step 30 of 40: every rank skips the step alike.
    The skipped step makes no checkpoint, and the model and Adam state skip it (checkpoint 31
    holds 30 updates), and a NaN gradient behind a finite loss (discarded after DeepSpeed
    reduced it) gives the very same run as a NaN loss (discarded before the backward pass)."""
    last = world - 1
    runs = {}
    for kind in ("nan-loss", "nan-grad"):
        run_dir = tmp_path / kind
        finish(start(run_dir, world, "train.steps=40", "checkpoint.every=1", "checkpoint.keep=50",
                     env={"DSTEIN_FAULT": f"{kind}@30@{last}"}))  # fmt: skip
        runs[kind] = run_dir
        rows = [r for r in losses(run_dir) if r["step"] == 30]
        what = "residual" if kind == "nan-loss" else "gradient"
        assert rows == [{"step": 30, "skipped": what, "ranks": [last]}]
    checkpoints = runs["nan-loss"] / "checkpoints"
    assert not step_dir(checkpoints, 30).exists()
    assert updates_in(step_dir(checkpoints, 29)) == (29, [29] * 6)
    assert updates_in(step_dir(checkpoints, 31)) == (30, [30] * 6)

    def applied(run_dir: Path) -> list[dict]:
        return [r for r in losses(run_dir) if "skipped" not in r]

    assert applied(runs["nan-loss"]) == applied(runs["nan-grad"])


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_nonfinite_stop_names_step_term_rank_and_keeps_the_checkpoint(tmp_path, world):
    last = world - 1
    procs = start(tmp_path, world, "train.nonfinite=stop", env={"DSTEIN_FAULT": f"nan-loss@25@{last}"})
    results = wait_all(procs, timeout=300)
    assert all(code == 5 for code, _, _ in results), results[0][2][-3000:]
    expected = (f"error: non-finite residual in step 25 on rank {last}: stopped (train.nonfinite=stop); the step "
                f"was not applied and the last complete checkpoint, {step_dir(tmp_path / 'checkpoints', 20)}, "
                "is untouched")  # fmt: skip
    assert expected in results[0][2]
    complete, incomplete = scan(tmp_path / "checkpoints")
    assert complete[-1] == step_dir(tmp_path / "checkpoints", 20) and not incomplete
    out = train_to_end(tmp_path, world)  # the fault is gone: the run resumes and completes
    assert "resuming from" in out and "step 20 of" in out


def test_too_many_skips_in_a_row_stop(tmp_path):
    faults = ",".join(f"nan-grad@{s}" for s in range(11, 15))
    procs = start(tmp_path, 1, "train.max_skips=3", env={"DSTEIN_FAULT": faults})
    ((code, _, err),) = wait_all(procs)
    assert code == 5 and "non-finite gradient in step 14 on rank 0: stopped (4 in a row)" in err
    assert err.count("step skipped") == 3


# --- the run-directory lock -----------------------------------------------------------------


@pytest.mark.slow
def test_second_run_on_a_directory_in_use_refuses_and_a_killed_one_is_taken_over(tmp_path):
    first = start(tmp_path, 1, "train.steps=100000")
    deadline = time.time() + 240
    while last_step(tmp_path) < 12:
        assert first[0].poll() is None and time.time() < deadline
        time.sleep(0.05)
    second = run_here("train.py", "--config", CONFIG, *TINY, "train.steps=100000", f"run.dir={tmp_path}")
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"error: run.dir={tmp_path} is in use by pid {first[0].pid} on " in second.stderr
    first[0].send_signal(signal.SIGKILL)
    first[0].communicate()
    saved = int(scan(tmp_path / "checkpoints")[0][-1].name.removeprefix("step-"))
    out = train_here(tmp_path, f"train.steps={saved + 10}")
    assert f"taking over the lock of run.dir={tmp_path} left by pid {first[0].pid}" in out
    assert f"resuming from {step_dir(tmp_path / 'checkpoints', saved)}" in out and last_step(tmp_path) == saved + 10
    assert (tmp_path / ".lock").read_text() == ""  # released at the end


# --- failed writes --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, world):
    procs = start(tmp_path, world, env={"DSTEIN_FAULT": f"fail-save@30@{world - 1}"})
    results = wait_all(procs, timeout=300)
    assert all(code == 5 for code, _, _ in results), results[0][2][-3000:]
    ckpt = tmp_path / "checkpoints"
    assert f"error: could not write checkpoint {step_dir(ckpt, 30)} (rank {world - 1}: [Errno 28]" in results[0][2]
    assert f"the previous complete checkpoint {step_dir(ckpt, 20)} is intact" in results[0][2]
    complete, incomplete = scan(ckpt)
    assert complete[-1] == step_dir(ckpt, 20) and not incomplete and not step_dir(ckpt, 30).exists()
    out = train_to_end(tmp_path, world)
    assert f"resuming from {step_dir(ckpt, 20)}" in out and (step_dir(ckpt, 80) / MARKER).exists()


def dataset_over_a_copy(hjb5_file: Path, tmp_path: Path, steps: int) -> tuple[Path, bytes, list[str]]:
    """A copy of the module's data file, its bytes, and the make_dataset command that rewrites it."""
    out = tmp_path / "data.h5"
    out.write_bytes(hjb5_file.read_bytes())
    cmd = [sys.executable, "launch/make_dataset.py", "--config", CONFIG, "--out", str(out), "--steps", str(steps),
           "--test-points", "8", "--truth-samples", "100", *SMALL]  # fmt: skip
    return out, out.read_bytes(), cmd


def test_failed_dataset_write_keeps_the_previous_file(tmp_path, hjb5_file):
    out, before, cmd = dataset_over_a_copy(hjb5_file, tmp_path, 3)
    env = {**base_env(), "DSTEIN_FAULT": "fail-dataset@0"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 5 and f"error: could not write {out} (" in done.stderr
    assert f"{out} is unchanged" in done.stderr
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["data.h5"]  # no temporary left


def interruptible() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_while_a_dataset_is_written_leaves_the_file_as_it_was(tmp_path, hjb5_file):
    out, before, cmd = dataset_over_a_copy(hjb5_file, tmp_path, 100000)
    # as from a terminal: SIGINT unblocked and not ignored (a child inherits both from the worker,
    # and a clean-clone run once saw this child finish all its steps, exit 0, as if it never came)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)  # fmt: skip
    deadline = time.time() + 120
    while not list(tmp_path.glob(".data.h5.part*")):  # its part is being written
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip() == f"interrupted: {out} is unchanged", err[-2000:]
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["data.h5"]  # no part left
