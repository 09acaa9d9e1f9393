"""What a user looks at after a run: the final model, the figures, and re-evaluation.

``finish_run`` (rank 0, end of training) saves ``model.pt`` and draws ``plots/``;
``evaluate_run`` (launch/evaluate.py) reloads a run directory, recomputes the test errors
exactly as training did, writes ``eval.json`` and redraws the figures.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dstein import plots
from dstein.build import build_estimator, build_model, build_pde, load_process_test_set, load_test_set, output_transform
from dstein.config import Config, ConfigError, load_resolved
from dstein.consistency import model_consistency
from dstein.consistency import supported as consistency_supported
from dstein.control import closed_loop
from dstein.evaluation import baselines, evaluate_all, predict, start_baselines
from dstein.files import atomic_path, write_json_atomic
from dstein.metrics import read_metrics
from dstein.noise import Streams
from dstein.pdes import PDE, TestSet

MODEL_FILE = "model.pt"


def save_model(model: torch.nn.Module, run_dir: Path) -> None:
    with atomic_path(run_dir / MODEL_FILE) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)


def residuals(
    model: torch.nn.Module, pde: PDE, points: torch.Tensor, config: Config, device, dtype, block: int = 64
) -> np.ndarray:
    """The PDE residual at ``points``, estimated as in training (one process)."""
    estimator = build_estimator(config, pde)
    out = []
    for b, lo in enumerate(range(0, points.shape[0], block)):
        X = points[lo : lo + block].to(device=device, dtype=dtype)
        D = estimator(model, X, pde.needs, step=b, stream=Streams.RESIDUAL)
        out.append(pde.residual(X, D).detach().double().cpu())
    return torch.cat(out).numpy()


#: Points along the plot's slice: 200, fewer above d = 10^5 (each point costs eval.samples
#: forward passes of a d-wide input: 200 points at d = 10^6 took 21 s of a 3-step test run).
SLICE_POINTS, SLICE_MIN_POINTS, SLICE_NUMBERS = 200, 50, 20_000_000


def slice_points(dim: int) -> int:
    return max(SLICE_MIN_POINTS, min(SLICE_POINTS, SLICE_NUMBERS // dim))


def draw_plots(
    run_dir: Path, model: torch.nn.Module, pde: PDE, test: TestSet | None, config: Config, device, dtype,
    out: Path | None = None, process_baselines: dict[str, dict[str, float]] | None = None,
) -> list[Path]:  # fmt: skip
    """All four figures (in ``out``, by default ``RUN_DIR/plots``) from the run's metrics and model;
    ``process_baselines``: those of the set along the process (errors.png's second panel).
    Without a test set (``PDE.truth_known`` false) errors.png holds the start state's error,
    and the slice and residual figures show the trained solution and its residual at points
    of the forward process (no exact curve)."""
    out = out or run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    title = f"{pde.name} d={pde.dim}, {config.estimator.method}"
    metrics = run_dir / "metrics.jsonl"
    rows = read_metrics(metrics) if metrics.exists() else []
    plots.plot_history(rows, out, title, baselines(pde, test) if test is not None else None, process_baselines)
    X, coord, label = pde.slice(slice_points(pde.dim))
    exact = pde.truth_values(X, config.eval.truth_samples, config.eval.seed).numpy() if pde.truth_known else None
    transform = output_transform(config, pde)
    u, _ = predict(model, X.to(device=device, dtype=dtype), config, transform=transform, gradient=False)
    plots.plot_slice(coord.numpy(), u.double().cpu().numpy(), exact, label, out, title)
    if test is not None:
        at = test.X
    elif "domain" in pde.process_kinds:  # no test set: points along the forward process
        at = pde.test_points(0, config.eval.process_count, config.eval.seed, along_process=True)
    else:
        at = pde.test_points(0, config.eval.points, config.eval.seed)
    plots.plot_residuals(residuals(model, pde, at, config, device, dtype), out, title)
    return [out / name for name in plots.PLOTS]


def finish_run(
    run_dir: Path, model: torch.nn.Module, pde: PDE, test: TestSet | None, config: Config, device, dtype,
    process_baselines: dict[str, dict[str, float]] | None = None,
) -> None:  # fmt: skip
    save_model(model, run_dir)
    if config.eval.plots:
        draw_plots(run_dir, model, pde, test, config, device, dtype, process_baselines=process_baselines)


def writable(folder: Path, option: str) -> None:
    """Refuse, before any work, a folder this process cannot write in (read-only, full, not a
    folder); root passes permission bits, so this tries a file rather than asking."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dstein-probe-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"{option} {folder}: cannot write there ({err.strerror or err}): pass --out DIR to write eval.json and "
            "the plots elsewhere"
        ) from err


def evaluate_run(
    run_dir: str | Path,
    test_file: str | None = None,
    samples: int | None = None,
    out: str | Path | None = None,
    control: bool = False,
    paths: int | None = None,
    steps: int | None = None,
    consistency: int = 0,
) -> dict[str, Any]:
    """Re-evaluate a finished run's final model; write ``eval.json`` and the plots into ``out``
    (by default the run directory: ``RUN_DIR/eval.json``, ``RUN_DIR/plots``). ``control``: also
    the closed-loop cost of its feedback (``paths`` and ``steps``, by default eval.control_paths
    or 1000 and eval.control_steps), under ``control`` in eval.json; ``consistency``: the
    Feynman-Kac consistency from that many states along the process, under ``consistency``."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--run {run_dir}: no config.yaml there (not a dstein run directory)")
    if not (run_dir / MODEL_FILE).is_file():
        raise ConfigError(f"--run {run_dir}: no {MODEL_FILE} there (the run has not finished)")
    target = Path(out) if out is not None else run_dir
    writable(target, "--out" if out is not None else "--run")
    config = load_resolved(run_dir / "config.yaml")
    if samples is not None:
        config.eval.samples = samples
    pde = build_pde(config)
    device, dtype = torch.device("cpu"), getattr(torch, config.run.dtype)
    test_file = test_file or config.data.test_file
    test = load_test_set(config, pde, test_file)
    model = build_model(config, pde, dtype, device, loaded=True)
    try:
        model.load_state_dict(torch.load(run_dir / MODEL_FILE, map_location=device, weights_only=True))
    except Exception as err:  # truncated, overwritten, or of another model: never a traceback
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(
            f"--run {run_dir}: {MODEL_FILE} cannot be loaded ({type(err).__name__}{': ' + first if first else ''}): "
            "it is damaged or belongs to another config; train again, or evaluate another run"
        ) from err
    if consistency and not consistency_supported(pde):
        raise ConfigError(f"--consistency: pde {pde.name} has no forward process with terminal points and a "
                          "start state (PDE.process_kinds, sample_process, start: hjb, bsde_*)")  # fmt: skip
    if control and pde.control_problem() is None:
        raise ConfigError(f"--control: pde {pde.name} is not a stochastic control problem (PDE.control_problem; "
                          "hjb is one)")  # fmt: skip
    transform = output_transform(config, pde)
    process_test = load_process_test_set(config, pde)
    errors: dict[str, Any] = evaluate_all(model, pde, test, process_test, config, device, dtype, transform)
    declared = pde.start()
    if declared is not None:
        errors["start_name"], errors["start_source"] = declared[0], declared[3]
    result = {**errors, "model": MODEL_FILE, "eval_samples": config.eval.samples, "test_file": test_file}
    if test is not None:
        result.update(baselines=baselines(pde, test), test_points=int(test.X.shape[0]))
    at_start = start_baselines(pde)
    if at_start:
        result["start_baselines"] = at_start
    if process_test is not None:
        result["process_baselines"] = baselines(pde, process_test)
        result["process_points"] = int(process_test.X.shape[0])
    if control:
        result["control"] = closed_loop(model, pde, config, device, dtype, transform,
                                        paths or config.eval.control_paths or 1000, steps)  # fmt: skip
    if consistency:
        result["consistency"] = model_consistency(model, pde, config, device, dtype, transform, consistency)
    write_json_atomic(target / "eval.json", result)
    draw_plots(run_dir, model, pde, test, config, device, dtype, out=target / "plots",
               process_baselines=result.get("process_baselines"))  # fmt: skip
    return result
