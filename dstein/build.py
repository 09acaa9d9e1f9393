"""The composition root: a config becomes a PDE, a model, the sharded estimator, a DeepSpeed
engine and the data (training points and test set). Everything a run holds is a ``Trainer``.

Checks that need more than one section of the config (a method against the PDE's needs, a
precision against sigma, ranks against noise chunks, data files against the PDE) happen
here, once, before any work: a bad combination ends with one ``ConfigError`` line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dstein.average import WeightAverage
from dstein.checkpoint.state import make_loading_safe
from dstein.config import Config, ConfigError
from dstein.data import H5Collocation, read_test_set, validate
from dstein.data.points import PointStream, point_counts
from dstein.distributed import DistInfo, from_rank0, init_distributed, this_rank
from dstein.errors import DistributedError
from dstein.estimators import PAIRED_METHODS, STEIN_METHODS, Derivatives, provides
from dstein.estimators.constraint import OutputTransform
from dstein.estimators.sharded import Estimator, Shard, rank_memory_bytes
from dstein.estimators.stein import precision_problem
from dstein.evaluation import baselines, start_baselines
from dstein.models import MLP, RADIAL_KINDS, QuadraticMLP, RadialMLP, radial_phi
from dstein.noise import Streams, counter_seed, default_chunk
from dstein.nonfinite import GradientWatch
from dstein.output_init import fit_output_bias
from dstein.pdes import PDE, TestSet, user_error
from dstein.pdes import build_pde as _build_pde


def build_pde(config: Config) -> PDE:
    """The configured PDE (``pde.name`` or a user's ``pde.target``)."""
    p = config.pde
    pde = _build_pde(p.name, p.dim, dict(p.params), p.target, p.process_share, p.process_time_power)
    if config.model.smooth_constraint:
        if not pde.smooths_constraint:
            raise ConfigError(
                f"model.smooth_constraint=true: pde {pde.name} has no smoothed output transform (hjb has one); "
                "set model.smooth_constraint=false"
            )
        if config.estimator.method in STEIN_METHODS:  # other methods differentiate the network itself
            pde.smoothing = config.estimator.sigma_x
    return pde


def check_pde(pde: PDE, config: Config) -> None:
    """A dry run of what training will ask of the PDE, on three points of each kind, before
    any work: a method that raises, or returns the wrong shape or type, is refused in one
    line naming the class and the method (a user's PDE would otherwise fail mid-run, or a
    residual of shape (B, 1) would train silently)."""
    gen = torch.Generator().manual_seed(0)
    n = 3
    counts = point_counts(pde, config)
    points = {}
    for kind in counts:
        method = "sample_domain" if kind == "domain" else f"sample_condition({kind!r})"
        points[kind] = _checked(pde, method, (n, pde.in_dim), pde.training_points, kind, n, gen, torch.float32)
    X = points["domain"]
    D = Derivatives(**{k: torch.zeros(n, requires_grad=True) for k in pde.needs - {"grad", "along"}})
    if "grad" in pde.needs:
        D.grad = torch.zeros(n, pde.dim, requires_grad=True)
    directions, _ = _checked_coefficients(pde, X)
    if "along" in pde.needs:
        D.along = torch.zeros(n, directions.shape[1], requires_grad=True)
    residual = _checked(pde, "residual", (n,), pde.residual, X, D)
    if not residual.requires_grad:  # e.g. torch.zeros(B), or a detached value: the PDE term would be ignored
        raise ConfigError(
            f"pde {pde.name}: {type(pde).__name__}.residual does not depend on the derivatives it is given "
            f"({', '.join(sorted(pde.needs))}): its loss term would train nothing; compute it from them "
            "(D.require('lap'), ...) without detaching"
        )
    for kind in counts:
        if kind != "domain":
            _checked(pde, f"condition_target({kind!r})", (n,), pde.condition_target, kind, points[kind])
    _checked(pde, "project", (n, pde.in_dim), pde.project, X)
    try:
        transform = output_transform(config, pde)
        T = transform(X) if transform is not None else None
    except ConfigError:
        raise
    except Exception as err:  # the user's code: reported, not a traceback
        raise ConfigError(f"pde {pde.name}: {type(pde).__name__}.output_transform raised {user_error(err)}") from err
    if transform is not None:
        if T is None:
            raise ConfigError(f"pde {pde.name}: {type(pde).__name__}.output_transform returned None at training points")
        for name in ("A", "B", "A_t", "A_lap", "B_t", "B_lap", "A_grad", "B_grad", "A_hess_diag", "B_hess_diag"):
            value = getattr(T, name)
            if value is not None:
                shape = (n, pde.dim) if name.endswith(("_grad", "_diag")) else (n,)
                _checked(pde, f"output_transform().{name}", shape, lambda value=value: value)
        if config.estimator.method == "stein-subspace" and config.model.family == "radial":
            _check_radial_directions(pde, T, X[:, : pde.dim])


def _checked_coefficients(pde: PDE, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The PDE's directions (``along``) and weights (``trace``) at points X, where it needs them,
    checked: one ConfigError naming the method for a wrong shape or a weight that is not finite."""
    cls, n, d = type(pde).__name__, X.shape[0], pde.dim
    try:
        directions, weights = pde.coefficients(X)
    except Exception as err:
        raise ConfigError(f"pde {pde.name}: {cls}.coefficients (diffusion, drift, extra_directions) raised "
                          f"{user_error(err)}") from err  # fmt: skip
    if "along" in pde.needs and (not isinstance(directions, torch.Tensor) or directions.dim() != 3
                                 or directions.shape[0] != n or directions.shape[2] != d):  # fmt: skip
        raise ConfigError(
            f"pde {pde.name} needs 'along' but {cls}.drift / extra_directions give "
            f"{None if directions is None else tuple(directions.shape)}, not directions of shape ({n}, m, {d})"
        )
    if "trace" in pde.needs:
        if not isinstance(weights, torch.Tensor) or weights.shape not in ((n, d), (n, 1)):
            raise ConfigError(
                f"pde {pde.name} needs 'trace' but {cls}.diffusion gives "
                f"{None if weights is None else tuple(weights.shape)}, not sigma_i(x) of shape ({n}, {d}) or ({n}, 1)"
            )
        if not bool(torch.isfinite(weights).all()):
            raise ConfigError(f"pde {pde.name}: {cls}.diffusion is not finite at training points")
    return directions, weights


def _check_radial_directions(pde: PDE, T: OutputTransform, x: torch.Tensor) -> None:
    """stein-subspace with the radial family estimates grad f only along its basis and x: the
    transform's grad A and grad B must point along x (those of hjb, heat and the unit ball do)."""
    for name in ("A_grad", "B_grad"):
        w = getattr(T, name)
        if w is None:
            continue
        w, x64 = w.double(), x.double()
        along = (w * x64).sum(1, keepdim=True) / (x64 * x64).sum(1, keepdim=True).clamp_min(1e-300)
        off = (w - along * x64).norm(dim=1) / w.norm(dim=1).clamp_min(1e-300)
        if float(off.max()) > 1e-4:
            raise ConfigError(
                f"pde {pde.name}: {type(pde).__name__}.output_transform().{name} does not point along x, which "
                "estimator.method=stein-subspace with model.family=radial needs (its gradient lies in the span of "
                "the first layer's rows and x): use stein-antithetic, or model.family=mlp"
            )


def _checked(pde: PDE, method: str, shape: tuple[int, ...], fn: Callable[..., Any], *args: Any) -> torch.Tensor:
    """``fn(*args)`` of the PDE, which must return a tensor of ``shape``; else one ConfigError."""
    cls = type(pde).__name__
    try:
        out = fn(*args)
    except Exception as err:  # the user's code: any error is reported, not a traceback
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        detail = f": {first}" if first else ""
        raise ConfigError(f"pde {pde.name}: {cls}.{method} raised {type(err).__name__}{detail}") from err
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"pde {pde.name}: {cls}.{method} returned {got}, expected a tensor of shape {shape}")
    if not out.is_floating_point():
        raise ConfigError(
            f"pde {pde.name}: {cls}.{method} returned a tensor of dtype {out.dtype}, expected floating point"
        )
    return out


def memory_plan(config: Config, pde: PDE) -> dict[str, tuple[float, str]]:
    """The largest allocations of a run (bytes) and the options that set them: an estimate,
    from the sizes alone, made before anything is allocated."""
    m, est, train = config.model, config.estimator, config.train
    params = (pde.in_dim + 1) * m.width + (m.depth - 1) * (m.width + 1) * m.width + m.width + 1
    widths = m.depth * m.width + 1
    conditions = len(point_counts(pde, config)) - 1
    points = train.domain_points + conditions * train.condition_points
    plan = {
        "the model with gradients and Adam state": (16.0 * params, f"model.width={m.width}, pde.dim={pde.dim}"),
        "the training points of a step": (
            4.0 * points * pde.in_dim,
            f"train.domain_points={train.domain_points}, pde.dim={pde.dim}",
        ),
        "the test set": (  # its points and gradients, and the draw of one block of points (twice)
            8.0 * config.eval.points * (pde.in_dim + pde.dim + 2) + 16.0 * pde.test_block * pde.in_dim,
            f"eval.points={config.eval.points}, pde.dim={pde.dim}",
        ),
        "the evaluation of a block of test points": (
            4.0 * 64 * config.eval.samples * (pde.in_dim + 3 * widths),
            f"eval.samples={config.eval.samples}, pde.dim={pde.dim}",
        ),
    }
    if est.method in STEIN_METHODS:
        chunk = est.chunk or default_chunk(est.samples, paired=est.method in PAIRED_METHODS)
        noise = m.width + 1 if est.method == "stein-subspace" else pde.in_dim
        pairs = 2 if est.method != "stein" else 1
        plan["one noise chunk and its activations"] = (
            4.0 * train.domain_points * chunk * (noise + pairs * 3 * widths),
            f"estimator.chunk={chunk}, train.domain_points={train.domain_points}, pde.dim={pde.dim}",
        )
    elif est.method == "hutchinson":
        plan["the probes' tangents"] = (4.0 * train.domain_points * est.samples * pde.in_dim,
                                        f"estimator.samples={est.samples}")  # fmt: skip
    else:
        plan["the Hessian-vector products"] = (4.0 * train.domain_points * min(pde.dim, 1 << 16) * pde.in_dim,
                                               f"pde.dim={pde.dim}")  # fmt: skip
    return plan


def check_memory(config: Config, pde: PDE, device: torch.device) -> None:
    """Refuse, before allocating, sizes that cannot fit the memory this rank has."""
    plan = memory_plan(config, pde)
    have = rank_memory_bytes(device)
    total = sum(size for size, _ in plan.values())
    if total <= have:
        return
    what, (size, options) = max(plan.items(), key=lambda item: item[1][0])
    raise ConfigError(
        f"{options}: {what} would take about {size / 2**30:.3g} GiB ({total / 2**30:.3g} GiB in all), more than "
        f"the {have / 2**30:.3g} GiB this rank has: lower them"
    )


#: Training points that standardize the radial feature, drawn at most this many bytes at a time.
FEATURE_POINTS, FEATURE_DRAW_BYTES = 4096, 1 << 29


def feature_sample(config: Config, pde: PDE) -> torch.Tensor:
    """|x|^2 of FEATURE_POINTS training points of a fixed draw (float64): in one draw where
    it fits in FEATURE_DRAW_BYTES, else in blocks of fresh generators (at d = 100,000 one
    draw held 3.3 GB, at d = 10^6 it would not fit)."""
    rows = min(FEATURE_POINTS, max(1, FEATURE_DRAW_BYTES // (8 * pde.in_dim)))
    out = []
    for block in range(-(-FEATURE_POINTS // rows)):
        keys = (config.seed, Streams.FEATURE_STATS) if rows == FEATURE_POINTS else (
            config.seed, Streams.FEATURE_STATS, block)  # fmt: skip
        gen = torch.Generator().manual_seed(counter_seed(*keys))
        n = min(rows, FEATURE_POINTS - block * rows)
        x = pde.training_points("domain", n, gen, torch.float64)[:, : pde.dim]
        out.append((x * x).sum(1))
    return torch.cat(out)


def feature_stats(config: Config, pde: PDE) -> tuple[list[float], list[float]]:
    """The mean and standard deviation of each phi(|x|^2) of the radial feature over
    ``feature_sample``'s points, drawn on rank 0 alone and sent to the others (the same
    numbers; at d = 10^4 the draw takes 1.3 s of a core, at d = 10^6 minutes, which every rank
    of a node would otherwise pay at once)."""
    stats = None
    if this_rank() == 0:
        r2 = feature_sample(config, pde)
        qs = [radial_phi(r2, kind) for kind in RADIAL_KINDS[config.model.radial_feature]]
        stats = [float(q.mean()) for q in qs], [max(float(q.std()), 1e-12) for q in qs]
    return from_rank0(stats)


def build_model(
    config: Config, pde: PDE, dtype: torch.dtype, device: torch.device, loaded: bool = False
) -> torch.nn.Module:
    """The configured model family with its initial weights (the same on every rank).

    ``loaded``: a saved state replaces the weights and buffers next (evaluate.py, Solution), so
    the radial feature's statistics, buffers of that state, are not drawn.
    """
    m = config.model
    if m.family == "radial":  # phi(|x|^2) standardized over training points of a fixed draw
        shift, scale = ([0.0], [1.0]) if loaded else feature_stats(config, pde)
    torch.manual_seed(counter_seed(config.seed, Streams.MODEL_INIT))
    if m.family == "radial":
        model: MLP = RadialMLP(pde.in_dim, pde.dim, m.width, m.depth, m.activation, shift, scale, m.input_scale,
                               m.radial_feature, m.output_scale)  # fmt: skip
    elif m.family == "quadratic":
        model = QuadraticMLP(pde.in_dim, pde.dim, m.width, m.depth, m.activation, m.input_scale, m.output_scale)
    else:
        model = MLP(pde.in_dim, m.width, m.depth, m.activation, m.input_scale, pde.dim, m.output_scale)
    return model.to(device=device, dtype=dtype)


def output_transform(config: Config, pde: PDE) -> Callable[[torch.Tensor], OutputTransform | None] | None:
    """The PDE's hard constraint when model.hard_constraint is set (refused if it has none)."""
    if not config.model.hard_constraint:
        return None
    probe = pde.sample_domain(2, torch.Generator().manual_seed(0))
    if pde.output_transform(probe) is None:
        raise ConfigError(
            f"model.hard_constraint=true: pde {pde.name} has no output transform u = A + B f (hjb and heat have "
            "one; a user's PDE defines output_transform); set model.hard_constraint=false"
        )
    return pde.output_transform


def check_estimator_fits(config: Config, pde: PDE, dtype: torch.dtype) -> None:
    """Refuse a method that cannot give what the PDE needs, and a precision too coarse for
    sigma_x (judged as on a GPU, so that a config behaves alike on every device)."""
    method = config.estimator.method
    missing = pde.needs - provides(method)
    if missing:
        raise ConfigError(
            f"pde {pde.name} needs {sorted(missing)}, which estimator.method={method} cannot give "
            f"(it gives {sorted(provides(method))})"
        )
    if method in STEIN_METHODS:
        problem = precision_problem(config.estimator.sigma_x, dtype, config.run.matmul_precision, True, pde.needs)
        if problem:
            raise ConfigError(f"run.matmul_precision={config.run.matmul_precision}: {problem}")


def build_estimator(config: Config, pde: PDE, info: DistInfo | None = None) -> Estimator:
    """The configured estimator; with ``info``, sharded over this rank's sample group. Every
    estimate a run makes (domain, conditions, attack steps) is checked here, before any work."""
    est = config.estimator
    shard = Shard()
    if info is not None and info.sample_group_size > 1 and est.method in STEIN_METHODS:
        shard = Shard(info.sample_rank, info.sample_group_size, info.sample_group)
    estimator = Estimator(
        method=est.method, samples=est.samples, sigma_x=est.sigma_x,
        sigma_t=est.time_sigma if pde.time_dependent else None, seed=config.seed,
        chunk=est.chunk, condition_samples=est.condition_samples, recompute=est.recompute, shard=shard,
        laplacian=est.laplacian, transform=output_transform(config, pde),
        coefficients=pde.coefficients if {"along", "trace"} & pde.needs else None,
    )  # fmt: skip
    if est.method in STEIN_METHODS:
        attack = config.train.adversarial.samples if config.train.adversarial.steps else None
        for samples in (est.samples, attack or est.samples):
            spec = estimator.spec(pde.needs, samples)
            if config.train.residual_loss != "squared" and spec.num_chunks < 2:
                raise ConfigError(
                    f"train.residual_loss={config.train.residual_loss} needs two independent estimates, from two "
                    f"halves of the noise chunks, but estimator.samples={samples} in chunks of {spec.chunk} is one "
                    "chunk: lower estimator.chunk or raise the samples"
                )
        estimator.spec({"u"}, est.condition_samples or est.samples)
    return estimator


def deepspeed_config(config: Config, world_size: int) -> dict[str, Any]:
    ds = config.deepspeed
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "zero_optimization": {"stage": ds.stage_on(world_size)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "gradient_clipping": 0.0 if clips_itself(config, world_size) else ds.gradient_clipping,
    }
    if ds.optimizer == "deepspeed":
        out["optimizer"] = {"type": "Adam", "params": {"lr": config.train.lr, "torch_adam": True}}
    out.update(dict(ds.extra))
    return out


def clips_itself(config: Config, world_size: int) -> bool:
    """Whether the step clips the gradient norm itself instead of DeepSpeed's engine: under ZeRO
    stage 0 in the model's own precision (no fp16/bf16 in deepspeed.extra), where the
    gradients are whole on every rank after the backward pass. The norm is then formed once,
    as DeepSpeed forms it, and is also the step's finite check (dstein/nonfinite.py); DeepSpeed
    would form it again and all-reduce it even over one rank."""
    ds = config.deepspeed
    reduced = any(isinstance(ds.extra.get(k), dict) and ds.extra[k].get("enabled") for k in ("fp16", "bf16"))
    own = ds.gradient_clipping > 0 and ds.stage_on(world_size) == 0
    return own and not reduced and "gradient_clipping" not in ds.extra


def open_data(config: Config, pde: PDE, info: DistInfo) -> tuple[H5Collocation | None, TestSet]:
    """The training-point reader (None: online sampler) and the test set, files validated first."""
    reader = None
    if config.data.train_file:
        kinds = point_counts(pde, config)
        validate(
            config.data.train_file,
            pde_name=pde.name,
            dim=pde.dim,
            pde_params=pde.params(),
            groups={"train": list(kinds)},
            in_dim=pde.in_dim,
        )
        reader = H5Collocation(
            config.data.train_file, kinds, config.seed, config.data.shuffle, info.point_group, info.num_point_groups
        )
    return reader, load_test_set(config, pde, config.data.test_file)


def load_test_set(config: Config, pde: PDE, test_file: str | None) -> TestSet | None:
    """The test set from ``test_file`` (validated; its first eval.points rows) or drawn from
    eval.seed; None where the PDE knows no solution away from its reference points
    (``PDE.truth_known``) and no file is given."""
    if not test_file and not pde.truth_known:
        return None
    if not test_file:
        if not config.pde.target:
            return pde.test_set(config.eval.points, config.eval.seed, config.eval.truth_samples)
        try:  # a user's sampler and truth: any error is reported, not a traceback
            return pde.test_set(config.eval.points, config.eval.seed, config.eval.truth_samples)
        except Exception as err:
            raise ConfigError(
                f"pde {pde.name}: {type(pde).__name__}.test_set (sample_test, then truth) raised {user_error(err)}"
            ) from err
    validate(test_file, pde_name=pde.name, dim=pde.dim, pde_params=pde.params(), groups={"test": ["X", "u", "grad"]},
             in_dim=pde.in_dim)  # fmt: skip
    return read_test_set(test_file, config.eval.points)


def load_process_test_set(config: Config, pde: PDE) -> TestSet | None:
    """The test set along the forward process from the start state (eval.process_points of
    eval.seed), drawn online (a data.test_file holds the first set only); None where the PDE
    declares no process or eval.process_points=0, or knows no solution (``PDE.truth_known``)."""
    if not pde.truth_known:
        return None
    try:  # a user's sampler and truth: any error is reported, not a traceback
        return pde.process_test_set(config.eval.process_count, config.eval.seed, config.eval.truth_samples)
    except Exception as err:
        if not config.pde.target:
            raise
        raise ConfigError(f"pde {pde.name}: {type(pde).__name__}.process_test_set (sample_process, then truth) "
                          f"raised {user_error(err)}") from err  # fmt: skip


@dataclass
class Trainer:
    """Everything a run holds; built once by ``build_trainer``."""

    config: Config
    info: DistInfo
    pde: PDE
    engine: Any  # deepspeed.DeepSpeedEngine: owns the model and optimizer state
    estimator: Estimator
    points: PointStream  # this point group's training points of a step
    test: TestSet | None  # None: the PDE knows no solution away from its reference values
    dtype: torch.dtype
    run_dir: Path
    watch: GradientWatch | None  # the local gradients' finite check (several ranks, or ZeRO's buffers)
    baselines: dict[str, dict[str, float]]  # errors of predictors that ignore x (evaluation.baselines)
    process_test: TestSet | None = None  # the test set along the forward process from the start state
    process_baselines: dict[str, dict[str, float]] | None = None  # the baselines on it
    start_baselines: dict[str, dict[str, float | str]] = field(default_factory=dict)  # at the start state
    average: WeightAverage | None = None  # train.average: the weights evaluations and model.pt use
    notes: list[str] = field(default_factory=list)  # what building did, for a fresh run's first lines
    clip: float = 0.0  # the gradient norm the step clips to itself (clips_itself); 0: the engine's own setting

    @property
    def grads(self) -> list[torch.Tensor]:
        """The gradients the backward pass left (DeepSpeed sets them to None after every step)."""
        return [p.grad for p in self.engine.module.parameters() if p.grad is not None]

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def reader(self) -> H5Collocation | None:
        return self.points.reader

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer


#: train.adam: "auto" steps all parameters in a few multi-tensor operations (torch's default on
#: CUDA; on a CPU it would loop over them, about 0.1 ms a step more for the same numbers: bit for
#: bit, checked in tests/test_train.py); "fused" in one kernel per parameter group (another rounding).
ADAM_KERNELS: dict[str, dict[str, bool | None]] = {"auto": {"foreach": True}, "fused": {"fused": True}}


def build_trainer(config: Config, info: DistInfo | None = None) -> Trainer:
    """Join the ranks, build PDE, model, DeepSpeed engine, estimator and data."""
    import deepspeed  # slow to import: only where an engine is built

    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    if info is None:
        par = config.parallel
        info = init_distributed(par.sample_group_size, par.world_size, par.timeout_s, config.run.device)
    if info.world_size % info.sample_group_size:
        raise DistributedError("sample group size does not divide the world size")
    if config.train.domain_points < info.num_point_groups:
        raise DistributedError(
            f"train.domain_points={config.train.domain_points} is fewer than the "
            f"{info.num_point_groups} point groups: every point group needs points"
        )
    device, dtype = info.device, getattr(torch, config.run.dtype)
    pde = build_pde(config)
    check_memory(config, pde, device)  # before anything of the PDE's size is allocated
    check_estimator_fits(config, pde, dtype)
    check_pde(pde, config)
    if device.type == "cuda":  # TF32/bf16 products only where sigma allows (checked above)
        torch.set_float32_matmul_precision(config.run.matmul_precision)
        torch.backends.cudnn.allow_tf32 = config.run.matmul_precision != "highest"
    estimator = build_estimator(config, pde, info)
    model = build_model(config, pde, dtype, device)
    reader, test = open_data(config, pde, info)
    process_test = load_process_test_set(config, pde)
    points = PointStream(pde, config, dtype, device, info.point_group, info.num_point_groups, reader)
    notes = []
    if config.model.output_init == "fit":  # before the engine copies the weights
        t, before, after = fit_output_bias(model, pde, estimator, points(0), config.train.condition_weight)
        notes.append(f"model.output_init=fit: output bias moved by {t:.6g} (first step's loss {before:.4g} -> "
                     f"{after:.4g})")  # fmt: skip
    optimizer = (
        None
        if config.deepspeed.optimizer == "deepspeed"
        else torch.optim.Adam(model.parameters(), lr=config.train.lr, **ADAM_KERNELS[config.train.adam])
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=model.parameters(),
        config=deepspeed_config(config, info.world_size), dist_init_required=False,
    )  # fmt: skip
    make_loading_safe(engine)  # DeepSpeed would unpickle its checkpoint files with weights_only=False
    if info.world_size == 1 and not engine.zero_optimization():  # (ZeRO's optimizer reduces into its own buffers)
        engine.enable_backward_allreduce = False  # an all-reduce of every gradient over one rank: 0.5 ms a step
    # the local gradients' hooks name the ranks of a non-finite one; on one rank without ZeRO's
    # buffers the step reads the gradient norm instead (train_step)
    watch = GradientWatch(engine.module) if info.world_size > 1 or engine.zero_optimization() else None
    return Trainer(
        config, info, pde, engine, estimator, points, test, dtype, Path(config.run.dir), watch,
        baselines(pde, test) if test is not None else {},
        process_test, baselines(pde, process_test) if process_test is not None else None,
        start_baselines=start_baselines(pde), notes=notes,
        average=WeightAverage(engine.module, config.train.average) if config.train.average else None,
        clip=config.deepspeed.gradient_clipping if clips_itself(config, info.world_size) else 0.0,
    )  # fmt: skip
