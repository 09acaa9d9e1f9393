"""Typed configuration: dataclasses registered in Hydra's ConfigStore, loaded from a YAML path.

A config file starts with ``defaults: [dstein, _self_]`` so that Hydra merges it onto the
schema below: unknown keys and wrong types are refused by name, every key can be overridden
from the command line (``train.steps=3``), and ``__post_init__`` checks values. Errors
reach the user as ``ConfigError`` with one line naming the option, the value and what is
accepted.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from omegaconf import OmegaConf

from dstein.errors import ConfigError
from dstein.estimators import LAPLACIANS, METHODS, PAIRED_METHODS
from dstein.models import FAMILIES, RADIAL_FEATURES

SCHEMA_NAME = "dstein"


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


#: Upper bounds on sizes (far beyond any run; what a typo or a unit slip exceeds). Whether a
#: size fits the memory a rank has is checked when the run is built (dstein/build.py).
MAX_COUNT = 1 << 24  # samples, points, probes per point
MAX_DIM = (1 << 31) - 1


def _number(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    """``value`` is a finite number in [low, high] ((low, high] with ``low_open``)."""
    finite = isinstance(value, int | float) and math.isfinite(value)
    inside = finite and (value > low if low_open else value >= low) and value <= high
    bound = f"{'>' if low_open else '>='} {low:g} and <= {high:g}"
    _check(inside, f"{name}={value} must be a finite number {bound}")


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, summary.json, checkpoints/. Tie it to
    the job (a SLURM job id), never to the clock: a requeued job must find it again."""
    device: str = "auto"
    """'auto' (CUDA if available, else CPU), 'cpu' or 'cuda'."""
    dtype: str = "float32"
    """Precision of the model and of the perturbed forward passes (float32: DeepSpeed
    communicates gradients in fp32, fp16 or bf16, and half precision cannot resolve the
    Stein differences at small sigma, MATH.md)."""
    threads: int = 0
    """torch intra-op threads per process; 0 keeps torch's default."""
    matmul_precision: str = "highest"
    """float32 matrix products on GPUs: highest (true float32, TF32 off), high (TF32) or
    medium (bf16). Anything below highest is refused unless estimator.sigma_x is large enough
    for the Stein differences to survive it (MATH.md, precision)."""

    def __post_init__(self) -> None:
        ok = ("highest", "high", "medium")
        _check(
            self.matmul_precision in ok,
            f"run.matmul_precision={self.matmul_precision!r} must be one of {ok}",
        )
        _check(bool(self.dir), "run.dir must be a non-empty path")
        _check(self.device in ("auto", "cpu", "cuda"), f"run.device={self.device!r} must be auto, cpu or cuda")
        _check(
            self.dtype == "float32",
            f"run.dtype={self.dtype!r}: training supports float32 only (bf16/fp16 cannot resolve the "
            "Stein differences at small sigma; DeepSpeed cannot reduce float64 gradients)",
        )
        _check(0 <= self.threads <= 4096, f"run.threads={self.threads} must be >= 0 and <= 4096")


@dataclass
class PDEConfig:
    name: str = "hjb"
    """Registered PDE: poisson, heat or hjb (ignored when target is set)."""
    dim: int = 10
    """Spatial dimension d."""
    params: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the PDE class (hjb: mu, T; heat: T)."""
    target: str | None = None
    """A user's PDE class as 'package.module:ClassName' (a dstein.pdes.PDE subclass)."""
    process_share: float = 0.0
    """Share of the training points (domain, and conditions at the process's end such as hjb's
    terminal set) drawn along the PDE's forward process from its start state instead of from its
    own sampler (``PDE.sample_process``; hjb: x = x0 + sqrt(2 t) Z, t ~ U(0, T)): the states a
    control or pricing user asks about, which x ~ N(0, I) never visits at high d. 0: none;
    refused for a PDE that declares no process."""
    process_time_power: float = 1.0
    """The times of those process points: t = T v^p, v ~ U(0, 1), so P(t < s) = (s / T)^(1/p).
    1: t ~ U(0, T). p > 1 draws more of them early, near the start state: at d = 10,000 the
    process leaves the start state's neighbourhood (|x - x0|^2 of a few) by t ~ 1e-4, which
    uniform times reach once in 10,000 points (hjb_10k); the along-the-process test set keeps
    t ~ U(0, T)."""

    def __post_init__(self) -> None:
        _check(1 <= self.dim <= MAX_DIM, f"pde.dim={self.dim} must be >= 1 and <= {MAX_DIM}")
        _number("pde.process_share", self.process_share, 0, 1)
        _number("pde.process_time_power", self.process_time_power, 0, 16, low_open=True)
        _check(self.process_time_power == 1 or self.process_share > 0,
               f"pde.process_time_power={self.process_time_power} draws the times of the process points: "
               "it needs pde.process_share > 0")  # fmt: skip


@dataclass
class ModelConfig:
    width: int = 128
    """Hidden units per layer."""
    depth: int = 4
    """Number of hidden layers."""
    activation: str = "tanh"
    """tanh, sin, gelu, silu or softplus (smooth: the PDE needs second derivatives)."""
    family: str = "mlp"
    """mlp: the plain MLP (its input gradient lies in the row space of its first layer: at most
    model.width directions); radial: the MLP whose first layer also sees |x|^2 (standardized),
    so that its gradient may point along x in any d (dstein/models.py, README's model families);
    quadratic: the MLP whose first layer also sees x's squared coordinates through weights of
    its own, Q (x * x), so that its gradient may turn with x in directions of its own (a * x)
    in any d. mlp and radial take every method; quadratic every method but stein-subspace
    (estimator.method=auto picks stein-antithetic for it)."""
    radial_feature: str = "square"
    """What of |x|^2 the radial family's first layer sees (standardized over the training
    points): square, |x|^2 itself; log, log(1 + |x|^2), which resolves small |x| where |x|^2
    spans orders of magnitude (HJB's points near the origin and at |x|^2 ~ d); both, the two
    side by side (two columns: the log near the origin, the square on a shell |x|^2 ~ d +-
    sqrt(2 d), which the log's standardized range squeezes into a few thousandths)."""
    input_scale: float = 1.0
    """x enters the first layer as input_scale * x (time and |x|^2 unscaled). Adam moves each
    of that layer's d weights on x by about train.lr per step whatever its gradient, so where
    d >> width their random drift gives the model an input gradient that does not shrink with
    d (HJB's true gradient does, like 1/sqrt(d)); 1/d keeps a coherent change of W x at the
    learning rate's size and the drift negligible (muP's input-layer scaling). 1: plain."""
    output_scale: float = 1.0
    """The network's output is multiplied by this constant. Adam moves the last layer's
    weights by about train.lr per step whatever their gradient, so a solution that varies by
    tens (Deep BSDE's prices: u from 20 to 100) takes about (its spread / output_scale) / lr
    steps to take shape; a scale of its spread's order makes that a few hundred. 1: plain."""
    output_init: str = "default"
    """default: torch's initialization of the output layer (its output about 0); fit: before
    the first step, move the output bias by the constant that minimizes the first step's loss
    (dstein/output_init.py). Adam moves that bias by about train.lr per step, so a solution
    whose level is far from 0 (the two-body problems' f ~ sin(1) sum_i c_i, of order sqrt(d))
    takes level / lr steps to reach without it."""
    hard_constraint: bool = False
    """Represent the solution as u = A + B f (the PDE's output transform: hjb u = g(x) +
    (T - t) f, heat u = |x|^2/(2d) + t f), f the smoothed network: the terminal (hjb) or
    initial (heat) condition then holds exactly and needs no loss."""
    smooth_constraint: bool = False
    """With model.hard_constraint and a Stein method: smooth the constraint's A like the
    network, u = A_sigma + B f~ with A_sigma(x) = E[A(x + sigma_x eps)] (in closed form, where
    the PDE gives one: hjb), so that u is the smoothed A + B f as a whole. The condition then
    holds up to the smoothing's own bias (hjb: ln(1 + sigma_x^2 d / (1 + |x|^2))). It matters
    where sigma_x^2 d is of order 1 and A bends on that scale: hjb at d = 10,000 with
    sigma_x = 0.01 moves |x|^2 by 1, where g = ln((1 + |x|^2) / 2) bends, and f~ would have
    to undo that shift at the origin, a region no training point reaches (docs/MATH.md
    section 6). false: A exact."""

    def __post_init__(self) -> None:
        _check(1 <= self.width <= 1 << 20, f"model.width={self.width} must be >= 1 and <= {1 << 20}")
        _check(1 <= self.depth <= 1000, f"model.depth={self.depth} must be >= 1 and <= 1000")
        ok = ("tanh", "sin", "gelu", "silu", "softplus")
        _check(self.activation in ok, f"model.activation={self.activation!r} must be one of {ok}")
        _check(self.family in FAMILIES, f"model.family={self.family!r} must be one of {FAMILIES}")
        _number("model.input_scale", self.input_scale, 0, 1e3, low_open=True)
        _number("model.output_scale", self.output_scale, 0, 1e6, low_open=True)
        _check(self.output_init in ("default", "fit"), f"model.output_init={self.output_init!r} must be default or fit")
        _check(self.radial_feature in RADIAL_FEATURES,
               f"model.radial_feature={self.radial_feature!r} must be one of {RADIAL_FEATURES}")  # fmt: skip


@dataclass
class EstimatorConfig:
    method: str = "auto"
    """autograd (exact stacked back-propagation), hutchinson, stein, stein-antithetic,
    stein-subspace (in the row space of the first layer: cost and variance independent of d),
    or auto: stein-subspace when pde.dim > model.width, else stein-antithetic (resolved on load)."""
    samples: int = 2048
    """Gaussian perturbations per collocation point (antithetic: 2 per pair)."""
    chunk: int | None = None
    """Samples per noise chunk (the unit dealt to ranks); None: largest divisor <= 256."""
    sigma_x: float = 0.01
    """Standard deviation of the spatial smoothing."""
    sigma_t: float | None = None
    """Standard deviation of the time smoothing; None: same as sigma_x."""
    condition_samples: int | None = None
    """Samples for condition points (which need only the value); None: same as samples."""
    laplacian: str = "stein"
    """stein: the Laplacian of the smoothed model by Stein's identity, mean((|z|^2 - d) e) /
    sigma_x^2 (the paper's; its variance grows like d); difference: from the second
    differences of the antithetic pairs, mean((3 - z_t^2) e) / sigma_x^2, the network's
    Laplacian up to O(sigma_x^2), with about (d/2)^2 times less variance (stein-antithetic
    and stein-subspace only; docs/MATH.md section 9)."""
    recompute: str = "auto"
    """always: keep no chunk's activations for the backward pass but evaluate the chunk again
    there (its noise regenerated from its seed): peak memory set by estimator.chunk, not by
    estimator.samples, for 1.5x to 4x the step time; never: keep them; auto: always when
    the kept activations of an estimate would exceed 15% of the rank's memory (the
    CUDA device's, or the node's available memory shared by its ranks; estimated from the
    batch, the samples and the model's layer widths)."""

    def __post_init__(self) -> None:
        _check(
            self.recompute in ("auto", "always", "never"),
            f"estimator.recompute={self.recompute!r} must be auto, always or never",
        )
        methods = (*METHODS, "auto")
        _check(self.method in methods, f"estimator.method={self.method!r} must be one of {methods}")
        _check(self.laplacian in LAPLACIANS, f"estimator.laplacian={self.laplacian!r} must be one of {LAPLACIANS}")
        paired = self.method in PAIRED_METHODS or self.method == "auto"
        for name in ("samples", "condition_samples"):
            value = getattr(self, name)
            if value is not None:
                _check(value >= 2, f"estimator.{name}={value} must be >= 2")
                _check(value <= MAX_COUNT, f"estimator.{name}={value} must be <= {MAX_COUNT} per point")
                if paired:
                    _check(value % 2 == 0, f"estimator.{name}={value} must be even for {self.method} (pairs)")
        _check(self.sigma_x > 0, f"estimator.sigma_x={self.sigma_x} must be > 0")
        _number("estimator.sigma_x", self.sigma_x, 0, 1e3, low_open=True)
        _check(self.sigma_t is None or self.sigma_t > 0, f"estimator.sigma_t={self.sigma_t} must be > 0")
        if self.sigma_t is not None:
            _number("estimator.sigma_t", self.sigma_t, 0, 1e3, low_open=True)
        if self.chunk is not None:
            _check(self.chunk >= 1, f"estimator.chunk={self.chunk} must be >= 1")
            _check(
                self.samples % self.chunk == 0,
                f"estimator.samples={self.samples} must be a whole number of chunks of estimator.chunk={self.chunk}",
            )
            if paired:
                _check(self.chunk % 2 == 0, f"estimator.chunk={self.chunk} must be even for {self.method} (pairs)")

    @property
    def time_sigma(self) -> float:
        return self.sigma_x if self.sigma_t is None else self.sigma_t


@dataclass
class AdversarialConfig:
    steps: int = 0
    """Signed-gradient steps moving collocation points towards larger loss (0: off)."""
    step_size: float = 0.05
    """Size of each signed-gradient step."""
    samples: int | None = None
    """Samples per domain point for the attack steps (the points only move by the sign of
    the loss gradient, so fewer may do); None: estimator.samples."""

    def __post_init__(self) -> None:
        _check(0 <= self.steps <= 10_000, f"train.adversarial.steps={self.steps} must be >= 0 and <= 10000")
        _check(
            self.samples is None or 2 <= self.samples <= MAX_COUNT,
            f"train.adversarial.samples={self.samples} must be >= 2 and <= {MAX_COUNT} (or null: estimator.samples)",
        )
        _check(self.step_size > 0, f"train.adversarial.step_size={self.step_size} must be > 0")
        _number("train.adversarial.step_size", self.step_size, 0, 1e6, low_open=True)


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps."""
    lr: float = 1e-3
    """Adam learning rate at step 0; decays linearly to zero at the last step."""
    adam: str = "auto"
    """How torch's Adam runs its arithmetic (deepspeed.optimizer=torch): auto (multi-tensor
    foreach operations for all weights, CPU and GPU alike: on a CPU the same numbers as torch's
    default loop over the tensors, in fewer operations) or fused (one kernel for
    the whole update: at d = 100,000 the first layer's 12.8 million weights step in about a
    tenth of the time on a CPU; results differ from auto's in the last bits)."""
    domain_points: int = 50
    """Interior collocation points per step."""
    condition_points: int = 50
    """Points per condition set (boundary, initial, terminal) per step."""
    condition_weight: float = 20.0
    """Weight of each condition loss relative to the residual loss."""
    average: float = 0.0
    """Decay of an exponential moving average of the weights that evaluations, the saved model
    (model.pt, dstein.load), the closed loop and summary.json use; training steps the raw
    weights (dstein/average.py). 0.995 spans about the last 200 steps: the noise the last
    steps leave in a value at one point (u(0, x0)) is averaged out. 0: none."""
    log_every: int = 10
    """Write a training row to metrics.jsonl (and TensorBoard) every this many steps."""
    print_every: int = 100
    """When output is not a terminal, print a progress line every this many steps."""
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    nonfinite: str = "skip"
    """A step whose loss or gradient is NaN/Inf on any rank is never applied; then skip: go on
    with the next step (at most max_skips in a row), or stop: end the run (exit status 5),
    leaving the last complete checkpoint as it is."""
    max_skips: int = 5
    """Consecutive non-finite steps tolerated under nonfinite=skip before the run stops."""
    residual_loss: str = "squared"
    """squared: the mean of r^2 for an estimate r of the residual (the paper's; its
    expectation is r^2 + Var(r), so the estimator's variance is minimized too); unbiased:
    the mean of r1 r2 for two independent estimates from the two halves of the samples
    (whole noise chunks), whose expectation is r^2; hybrid: squared before step
    train.unbiased_from, unbiased from there on (Hu et al., arXiv 2311.15283)."""
    unbiased_from: int = 0
    """train.residual_loss=hybrid: the first step of the unbiased loss."""

    def __post_init__(self) -> None:
        _check(self.steps >= 1, f"train.steps={self.steps} must be >= 1")
        _check(self.steps <= 10**9, f"train.steps={self.steps} must be <= {10**9}")
        _check(self.nonfinite in ("skip", "stop"), f"train.nonfinite={self.nonfinite!r} must be skip or stop")
        _check(0 <= self.max_skips <= 10**6, f"train.max_skips={self.max_skips} must be >= 0 and <= {10**6}")
        _check(self.lr > 0, f"train.lr={self.lr} must be > 0")
        _number("train.lr", self.lr, 0, 10, low_open=True)
        _check(self.adam in ("auto", "fused"), f"train.adam={self.adam!r} must be auto or fused")
        for name in ("domain_points", "condition_points"):
            value = getattr(self, name)
            _check(1 <= value <= MAX_COUNT, f"train.{name}={value} must be >= 1 and <= {MAX_COUNT}")
        _check(self.condition_weight >= 0, f"train.condition_weight={self.condition_weight} must be >= 0")
        _number("train.average", self.average, 0, 1)
        _check(self.average < 1, f"train.average={self.average} must be below 1 (0: no average)")
        _number("train.condition_weight", self.condition_weight, 0, 1e12)
        _check(self.log_every >= 1, f"train.log_every={self.log_every} must be >= 1")
        _check(self.print_every >= 1, f"train.print_every={self.print_every} must be >= 1")
        losses = ("squared", "unbiased", "hybrid")
        _check(self.residual_loss in losses, f"train.residual_loss={self.residual_loss!r} must be one of {losses}")
        _check(
            0 <= self.unbiased_from <= self.steps,
            f"train.unbiased_from={self.unbiased_from} must be >= 0 and <= train.steps={self.steps}",
        )

    def unbiased_at(self, step: int) -> bool:
        """Whether the residual loss of ``step`` is the unbiased product of two estimates."""
        if self.residual_loss == "hybrid":
            return step >= self.unbiased_from
        return self.residual_loss == "unbiased"


@dataclass
class EvalConfig:
    every: int = 100
    """Evaluate on the test set every this many steps (and at the end)."""
    points: int = 1000
    """Test points (with data.test_file: the file's first eval.points rows)."""
    samples: int = 1024
    """Samples per test point for the smoothed model's value and gradient (Stein methods)."""
    truth_samples: int = 20000
    """Monte Carlo samples per point for ground truths that are estimated (HJB)."""
    seed: int = 12345
    """Seed of the test set (independent of the training seed)."""
    plots: bool = True
    """Draw RUN_DIR/plots at the end of the run."""
    process_points: int | None = None
    """Points of the second test set, drawn along the PDE's forward process from its start state
    (``PDE.sample_process``; t ~ U(0, T)), evaluated beside the first with the same baselines
    (null: eval.points; 0: none). PDEs without a process have none."""
    control_paths: int = 0
    """Paths of the closed-loop simulation at the end of the run (PDEs that define a control
    problem, hjb): the cost of the learned feedback control, its gap to u(0, x0), the uncontrolled
    cost (dstein/control.py). 0: not simulated."""
    control_steps: int = 100
    """Euler-Maruyama time steps of the closed-loop simulation (even: the time-step bias is
    estimated from the same paths at half as many steps)."""
    consistency_points: int = 0
    """States along the forward process for the Feynman-Kac consistency check at the end of the
    run (PDEs with a process, a terminal condition and a start state): E[g(X_T)] + T E[f(S, X_S,
    u, grad u)] with the model's u frozen in the nonlinearity f, which is u(0, x0) when the model
    solves the PDE; reported beside the model's u(0, x0) with its standard error
    (dstein/consistency.py). 0: not computed."""

    def __post_init__(self) -> None:
        _check(self.every >= 1, f"eval.every={self.every} must be >= 1")
        _check(1 <= self.points <= MAX_COUNT, f"eval.points={self.points} must be >= 1 and <= {MAX_COUNT}")
        _check(1 <= self.samples <= MAX_COUNT, f"eval.samples={self.samples} must be >= 1 and <= {MAX_COUNT}")
        _check(
            2 <= self.truth_samples <= 1 << 28, f"eval.truth_samples={self.truth_samples} must be >= 2 and <= {1 << 28}"
        )
        _check(
            self.process_points is None or 0 <= self.process_points <= MAX_COUNT,
            f"eval.process_points={self.process_points} must be >= 0 and <= {MAX_COUNT} (or null: eval.points)",
        )
        _check(self.control_paths == 0 or 2 <= self.control_paths <= MAX_COUNT,
               f"eval.control_paths={self.control_paths} must be 0 (none) or >= 2 and <= {MAX_COUNT}")  # fmt: skip
        _check(
            0 <= self.consistency_points <= MAX_COUNT and self.consistency_points != 1,
            f"eval.consistency_points={self.consistency_points} must be 0 (none) or >= 2 and <= {MAX_COUNT}",
        )
        _check(2 <= self.control_steps <= 100_000 and self.control_steps % 2 == 0,
               f"eval.control_steps={self.control_steps} must be even, >= 2 and <= 100000")  # fmt: skip

    @property
    def process_count(self) -> int:
        """Points of the along-the-process test set (``process_points``, null: ``points``)."""
        return self.points if self.process_points is None else self.process_points


@dataclass
class DataConfig:
    train_file: str | None = None
    """HDF5 file of training points (launch/make_dataset.py); None: the online sampler."""
    test_file: str | None = None
    """HDF5 file holding the test set and its truth; None: drawn from eval.seed."""
    shuffle: bool = True
    """Shuffle the file's training rows each epoch (from seed and epoch); false reads them in
    file order, which reproduces the online run for a file written from the same config."""


@dataclass
class ParallelConfig:
    world_size: int = 0
    """Ranks the launcher must start (0: whatever it starts)."""
    sample_group_size: int = 0
    """Ranks sharing the samples of one point group (0: all ranks); must divide the world size."""
    timeout_s: float = 300.0
    """Collective timeout: a rank waiting longer for a lost peer exits with an error."""

    def __post_init__(self) -> None:
        _check(self.world_size >= 0, f"parallel.world_size={self.world_size} must be >= 0")
        _check(self.sample_group_size >= 0, f"parallel.sample_group_size={self.sample_group_size} must be >= 0")
        _check(self.timeout_s > 0, f"parallel.timeout_s={self.timeout_s} must be > 0")
        _number("parallel.timeout_s", self.timeout_s, 0, 7 * 86400, low_open=True)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer state sharded) or 2 (and gradients)."""
    optimizer: str = "torch"
    """torch: dstein builds torch.optim.Adam and hands it to DeepSpeed; deepspeed: DeepSpeed
    builds its Adam from its own config (torch implementation, so it runs on CPUs too)."""
    gradient_clipping: float = 1.0
    """The global norm of the gradient that DeepSpeed clips to before each step: DeepSpeed's
    own default, which every run has used (0: no clipping). On one rank its clip costs about
    0.5 ms a step (a norm per parameter and an all-reduce)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further DeepSpeed config keys, merged as given (for example communication settings)."""

    def stage_on(self, world_size: int) -> int:
        """The ZeRO stage the engine runs on ``world_size`` ranks: ``zero_stage``, but 0 on one
        rank, where there is nothing to partition (ZeRO 1's copies of the gradients into its
        flat buffer and back cost about 60 ms a step at d = 100,000 there, for nothing);
        ``extra.zero_optimization.stage``, where given, always."""
        given = self.extra.get("zero_optimization")
        if isinstance(given, dict) and "stage" in given:
            return int(given["stage"])
        return self.zero_stage if world_size > 1 else 0

    def __post_init__(self) -> None:
        _check(self.zero_stage in (0, 1, 2), f"deepspeed.zero_stage={self.zero_stage} must be 0, 1 or 2")
        _check(
            self.optimizer in ("torch", "deepspeed"),
            f"deepspeed.optimizer={self.optimizer!r} must be torch or deepspeed",
        )
        _check(
            self.gradient_clipping >= 0,
            f"deepspeed.gradient_clipping={self.gradient_clipping} must be >= 0 (0: no clipping)",
        )


@dataclass
class CheckpointConfig:
    every: int = 1000
    """Save every this many steps (0: only at the end and when preempted)."""
    keep: int = 2
    """Complete checkpoints to keep (the newest); older ones are deleted after a save."""
    resume: str = "auto"
    """auto: resume from the newest complete checkpoint if there is one, else start fresh;
    never: start fresh (refused if checkpoint.dir holds checkpoints of an earlier run);
    or a path: a step-NNNNNNNN folder, or a checkpoint directory (its newest complete one)."""
    dir: str | None = None
    """Where step-NNNNNNNN folders go; None: RUN_DIR/checkpoints. Must be shared by all nodes."""
    deadline_s: float = 0.0
    """A step longer than the scheduler's grace period (SLURM's KillWait, 30 s by default)
    is killed before it ends: this many seconds after SIGTERM or checkpoint.signal (0: never)
    the run stops in the middle of the step, as it does on a second signal: in one process
    it saves the state before that step, with several ranks it exits at once (a step cannot
    be cut safely across ranks) and resumes from the last complete checkpoint."""
    fallback: bool = True
    """When the newest checkpoint fails verification (its manifest of file sizes and hashes)
    or loading: true says so in one line, sets it aside (step-NNNNNNNN.damaged) and resumes
    from the newest one that passes; false refuses (exit status 2)."""
    require_manifest: bool = True
    """A checkpoint folder without its MANIFEST.json (sizes and SHA-256 of its files) counts as
    damaged (set aside, or refused with fallback=false); false resumes such a folder unverified
    (folders written before manifests existed, or edited by hand on purpose)."""
    signal: str = "SIGUSR1"
    """Preemption signal besides SIGTERM: a SIG* name (SIGUSR1, SIGUSR2, ...) or none. Either
    only sets a flag; the ranks agree on it once per step, save, and exit with status 4."""

    def __post_init__(self) -> None:
        import signal as _signal

        _check(self.every >= 0, f"checkpoint.every={self.every} must be >= 0")
        _check(self.keep >= 1, f"checkpoint.keep={self.keep} must be >= 1")
        _check(self.keep <= 10_000, f"checkpoint.keep={self.keep} must be <= 10000")
        _number("checkpoint.deadline_s", self.deadline_s, 0, 86400)
        _check(bool(self.resume), "checkpoint.resume must be auto, never or a path")
        ok = self.signal == "none" or (
            self.signal.startswith("SIG") and isinstance(getattr(_signal, self.signal, None), _signal.Signals)
        )
        _check(ok, f"checkpoint.signal={self.signal!r} must be a signal name such as SIGUSR1, SIGUSR2, or none")
        _check(
            self.signal not in ("SIGKILL", "SIGSTOP", "SIGINT"),
            f"checkpoint.signal={self.signal!r} cannot be caught or is Ctrl-C: use SIGUSR1, SIGUSR2 or SIGHUP",
        )


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 0
    """Seed of the model initialization, collocation points and noise."""
    pde: PDEConfig = field(default_factory=PDEConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        _check(self.seed >= 0, f"seed={self.seed} must be >= 0")
        if self.estimator.method == "auto":  # the subspace pays where the row space is smaller than R^d
            subspace = self.pde.dim > self.model.width and self.model.family != "quadratic"
            self.estimator.method = "stein-subspace" if subspace else "stein-antithetic"
        _check(
            self.model.family != "quadratic" or self.estimator.method != "stein-subspace",
            "estimator.method=stein-subspace cannot follow a perturbation through model.family=quadratic (its "
            "first layer's Q (delta * delta) depends on every coordinate of the perturbation): use stein-antithetic, "
            "or model.family=radial or mlp",
        )
        _check(
            self.estimator.laplacian == "stein" or self.estimator.method in (*PAIRED_METHODS, "autograd", "hutchinson"),
            f"estimator.laplacian=difference needs antithetic pairs: estimator.method={self.estimator.method} has none "
            "(use stein-antithetic or stein-subspace)",
        )
        _check(
            self.model.hard_constraint or not self.model.smooth_constraint,
            "model.smooth_constraint=true smooths the hard constraint's A: it needs model.hard_constraint=true",
        )
        samples = self.train.adversarial.samples
        if samples is not None and self.estimator.method in PAIRED_METHODS:
            _check(samples % 2 == 0, f"train.adversarial.samples={samples} must be even for {self.estimator.method}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def digest(self) -> str:
        """A hash of every setting that can change the results (not where they are written)."""
        tree = self.to_dict()
        tree["run"].pop("dir")
        tree.pop("checkpoint")
        return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


def _one_line(err: BaseException) -> str:
    """The first informative line of an OmegaConf/Hydra error, with its full key if any."""
    cause = err
    while cause.__cause__ is not None and not getattr(cause, "full_key", None):
        cause = cause.__cause__
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    key = getattr(cause, "full_key", None)
    return f"{key}: {text}" if key and key not in text else text


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Compose ``path`` (YAML) with Hydra overrides, check it against the schema, validate."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"--config {path}: expected a .yaml file")
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    _check_defaults_line(path)
    for override in overrides:
        _check_appended_key(override, path)
    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(path.resolve().parent), version_base="1.3"):
            cfg = compose(config_name=path.stem, overrides=list(overrides))
    except Exception as err:  # Hydra and OmegaConf raise many types; all are user errors here
        raise ConfigError(f"config {path}: {_one_line(err)}") from err
    finally:
        GlobalHydra.instance().clear()
    if OmegaConf.get_type(cfg) is not Config:
        raise ConfigError(f"config {path}: must begin with 'defaults: [{SCHEMA_NAME}, _self_]' so its keys are checked")
    try:
        config = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as err:
        inner = err.__cause__ if isinstance(err.__cause__, ConfigError) else None
        if inner is not None:
            raise inner from err
        raise ConfigError(f"config {path}: {_one_line(err)}") from err
    assert isinstance(config, Config)
    return config


def _check_defaults_line(path: Path) -> None:
    """The file names the schema in its defaults list (before any override is applied, so
    that the error says so whatever the overrides)."""
    try:
        raw = OmegaConf.load(path)
    except Exception as err:  # a YAML syntax error, an unreadable file
        raise ConfigError(f"config {path}: {_one_line(err)}") from err
    tree = OmegaConf.to_container(raw) if OmegaConf.is_dict(raw) else {}
    defaults = tree.get("defaults") if isinstance(tree, dict) else None
    names = [str(d) for d in defaults] if isinstance(defaults, list) else []
    if SCHEMA_NAME not in names:
        raise ConfigError(f"config {path}: must begin with 'defaults: [{SCHEMA_NAME}, _self_]' so its keys are checked")


def _check_appended_key(override: str, path: Path) -> None:
    """Hydra's ``+key=value`` (and ``++``) adds keys the schema does not know without a word:
    refuse them as unknown keys are refused (free-form dicts such as pde.params excepted)."""
    if not override.startswith("+"):
        return
    key = override.lstrip("+").split("=", 1)[0].strip()
    node: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        known = {f.name: f for f in fields(node)} if is_dataclass(node) else {}
        if part not in known:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(
                f"config {path}: {key}: Key '{part}' not in '{getattr(node, '__name__', where)}' "
                f"(+{key} adds keys the schema does not have)"
            )
        hint = get_type_hints(node)[part]
        if get_origin(hint) is dict or hint is dict:
            return  # pde.params, deepspeed.extra: any keys
        node = hint
        if not is_dataclass(node):
            return


#: The first and last lines of every config.yaml dstein writes (run directories, checkpoints):
#: a file that begins with the first but lacks the last was cut short, and is refused instead
#: of read with defaults for whatever was cut. Files without the first line (written before
#: it existed, or by hand) are read as they are.
CONFIG_HEADER = "# dstein: the resolved config of a run, every setting; its last line marks its end\n"
CONFIG_END = "# end of config\n"


def config_file_text(config: Config) -> str:
    """What a run's ``config.yaml`` holds: the resolved config between its two marker lines."""
    return CONFIG_HEADER + to_yaml(config) + CONFIG_END


def load_resolved(path: str | Path) -> Config:
    """A run directory's resolved ``config.yaml`` (no defaults list), checked against the schema."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config {path} cannot be read ({_one_line(err)})") from err
    if text.startswith(CONFIG_HEADER) and not text.endswith(CONFIG_END):
        raise ConfigError(
            f"config {path} is cut short: it lacks its last line {CONFIG_END.strip()!r} (truncated by a full disk or "
            "an interrupted copy?), and what was cut would be read as defaults; restore it (each checkpoint holds "
            "a copy: RUN_DIR/checkpoints/step-*/config.yaml)"
        )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
        config = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"config {path}: {_one_line(err)}") from err
    assert isinstance(config, Config)
    return config


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
