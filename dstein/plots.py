"""End-of-run figures in ``RUN_DIR/plots`` (matplotlib, Agg backend: no display needed).

- ``losses.png``: every loss term against the step (log scale);
- ``errors.png``: solution L1/L2 and gradient L2 relative errors against the step;
- ``slice.png``: predicted and exact solution along a 1-D slice through the domain;
- ``residual_hist.png``: histogram of the PDE residual on the test set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dstein.files import atomic_path

PLOTS = ("losses.png", "errors.png", "slice.png", "residual_hist.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


#: How the baselines are drawn on errors.png (reference lines of the solution's L2 error).
BASELINE_STYLES = {"constant": ("best constant", ":"), "t_only": ("best function of t", "--"),
                   "condition_value": ("condition value", "-."), "radial": ("best function of |x|^2, t", (0, (5, 1))),
                   "constrained_constant": ("constant under the hard constraint", (0, (1, 3)))}  # fmt: skip


def plot_history(
    rows: list[dict], out: Path, title: str, baselines: dict[str, dict[str, float]] | None = None,
    process_baselines: dict[str, dict[str, float]] | None = None,
) -> None:  # fmt: skip
    """Loss terms and errors from metrics.jsonl rows; the baselines' solution L2 errors and
    the gradient floor as horizontal reference lines. Where the rows hold errors along the
    process from the start state (``process_*``), errors.png has a second panel of those, with
    their own baselines."""
    plt = _pyplot()
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "l2_rel" in r or "start_rel_error" in r]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    terms = [k for k in train[0] if k not in ("step", "lr", "seconds")] if train else []
    for key in terms:  # the unbiased residual loss can be negative: its magnitude is drawn
        ax.plot([r["step"] for r in train], [max(abs(r[key]), 1e-30) for r in train], label=key, lw=1.2)
    ax.set(yscale="log", xlabel="step", ylabel="loss term", title=f"{title}: losses")
    ax.legend(), ax.grid(alpha=0.3)
    _save(fig, out / "losses.png")
    plt.close(fig)
    along = any("process_l2_rel" in r for r in evals)
    fig, axes = plt.subplots(1, 2 if along else 1, figsize=(12.8 if along else 6.4, 4.0), squeeze=False)
    _error_panel(axes[0, 0], evals, "", baselines, f"{title}: test errors")
    if along:
        _error_panel(axes[0, 1], evals, "process_", process_baselines, "along the process from the start state")
    _save(fig, out / "errors.png")
    plt.close(fig)


def _error_panel(ax, evals: list[dict], prefix: str, baselines: dict[str, dict[str, float]] | None,
                 title: str) -> None:  # fmt: skip
    """One set's error curves (keys ``prefix + l2_rel`` ...) beside its baselines and gradient floor."""
    labels = {"l1_rel": "solution L1 rel.", "l2_rel": "solution L2 rel.", "grad_l2_rel": "gradient L2 rel."}
    if not prefix:
        labels["start_rel_error"] = "solution at the start state, rel."
    drawn: list[float] = []
    for key, label in labels.items():
        points = [(r["step"], r[prefix + key]) for r in evals if r.get(prefix + key) is not None]
        if points:
            marker = "s" if key == "start_rel_error" else "o"
            ax.plot(*zip(*points, strict=True), marker=marker, ms=3, label=label)
            drawn += [v for _, v in points if v > 0]
    lines = []
    for name, errors in (baselines or {}).items():
        label, style = BASELINE_STYLES.get(name, (name, ":"))
        lines.append((f"L2 of {label}", errors["l2_rel"], style, "0.35"))
    floors = [r[prefix + "gradient_floor"] for r in evals if prefix + "gradient_floor" in r]
    if floors and floors[-1] > 0:
        lines.append(("gradient floor (last)", floors[-1], ":", "C2"))
    if not drawn and not lines:  # no test set, no reference value (a PDE known only elsewhere)
        ax.text(0.5, 0.5, "no test set and no reference value:\nthe start state's value is in metrics.jsonl",
                ha="center", va="center", transform=ax.transAxes)  # fmt: skip
        ax.set(xlabel="step", title=title)
        return
    _reference_lines(ax, lines, drawn)
    ax.set(yscale="log", xlabel="step", ylabel="relative error", title=title)
    ax.legend(fontsize="small"), ax.grid(alpha=0.3, which="both")


#: A reference line further than this factor from the curves' range is named in the legend
#: but not drawn: a gradient floor of 1e-15 would pull the log axis down and squeeze every
#: curve into the top of the figure.
OFF_AXIS = 30.0


def _reference_lines(ax, lines: list[tuple[str, float, Any, str]], drawn: list[float]) -> None:
    """Horizontal reference lines near the curves; the others in the legend only, with their
    value; the axis spans the curves and the lines drawn."""
    shown = list(drawn)
    for label, value, style, color in lines:
        if value > 0 and (not drawn or min(drawn) / OFF_AXIS <= value <= max(drawn) * OFF_AXIS):
            ax.axhline(value, color=color, ls=style, lw=1, label=label)
            shown.append(value)
        else:
            ax.plot([], [], color=color, ls=style, lw=1, label=f"{label}: {value:.2g}, off the axis")
    if shown:
        ax.set_ylim(min(shown) / 2, max(shown) * 2)


def plot_slice(
    coord: np.ndarray, predicted: np.ndarray, exact: np.ndarray | None, label: str, out: Path, title: str
) -> None:
    """The trained solution along a line, beside the exact one (None: not known there)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if exact is not None:
        ax.plot(coord, exact, "k-", lw=2, label="exact")
    ax.plot(coord, predicted, "C1--", lw=2, label="trained")
    ax.set(xlabel=label, ylabel="u", title=f"{title}: 1-D slice")
    ax.legend(), ax.grid(alpha=0.3)
    _save(fig, out / "slice.png")
    plt.close(fig)


def plot_residuals(residual: np.ndarray, out: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.hist(residual, bins=50, color="C0", alpha=0.8)
    rms = float(np.sqrt(np.mean(residual**2)))
    # for Stein methods these are estimates: their Monte Carlo noise widens the histogram
    ax.set(xlabel="estimated PDE residual at test points", ylabel="points", title=f"{title}: residual (RMS {rms:.3g})")
    ax.grid(alpha=0.3)
    _save(fig, out / "residual_hist.png")
    plt.close(fig)
