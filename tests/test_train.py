"""The trainer and the command line: every config runs, the run directory is complete,
runs are deterministic, errors are one clear line with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dstein.build import build_pde, build_trainer
from dstein.config import load_config
from dstein.data.points import collocation
from dstein.metrics import read_metrics, relative_errors
from dstein.train import adversarial_points, lr_factor, run, train_step

CONFIGS = sorted(p.name for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
#: Configs whose three steps take long (d = 10^5 and 10^6): left out of the fast tier.
LARGE = ("100k", "1m")

# Small overrides that keep each config's PDE, dimension and method but make 3 steps quick.
SMALL = [
    "train.steps=3",
    "train.log_every=1",
    "eval.every=2",
    "eval.points=8",
    "eval.samples=8",
    "eval.truth_samples=2000",
    "estimator.samples=16",
    "estimator.chunk=8",
    "train.domain_points=6",
    "train.condition_points=6",
    "train.adversarial.steps=1",
    "eval.control_paths=16",  # the HJB configs' closed loop at the end: 1000 paths took 131 s at d = 10^4
    "eval.control_steps=2",
    "eval.consistency_points=64",  # the bsde configs' check at the end: 4096 states as configured
]
SMALL_NET = ["model.width=32", "model.depth=2"]


def small_config(name: str, run_dir: Path, *extra: str):
    return load_config(Path("configs") / name, [*SMALL, f"run.dir={run_dir}", *extra])


@pytest.fixture(autouse=True)
def _in_root(root, monkeypatch):
    monkeypatch.chdir(root)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if any(s in n for s in LARGE) else []) for n in CONFIGS]
)
def test_every_config_runs_three_steps(name, tmp_path, monkeypatch):
    # the bsde configs' start baselines: 2^12 Monte Carlo draws, not 2^18 (16 s of 21 at d = 1000;
    # their values are tested in test_bsde.py), the same code path
    monkeypatch.setattr("dstein.pdes.bsde.BASELINE_SAMPLES", 1 << 12)
    monkeypatch.setattr("dstein.pdes.bsde.BASELINE_BLOCK", 1 << 12)
    extra = SMALL_NET if any(size in name for size in ("10k", "100k", "1m")) else []
    if any(size in name for size in LARGE):  # as configured (no attack): at d = 10^6 one attack step is 6 s;
        extra = [*extra, "train.adversarial.steps=0"]  # its combination with stein-subspace runs at d = 10^4
    summary = run(small_config(name, tmp_path, *extra))
    config = load_config(Path("configs") / name)
    # Deep BSDE's problems are known at their start state only: no test set, its value instead
    pde = build_pde(config)
    if pde.truth_known:
        errors: tuple[str, ...] = ("l1_rel", "l2_rel", "grad_l2_rel")
    else:  # at d = 1000 no published value: the model's alone
        errors = ("start_value", "start_rel_error") if pde.start()[2] is not None else ("start_value",)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if errors[0] in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert [r["step"] for r in eval_rows] == [2, 3]
    for row in train_rows:
        assert {"step", "loss", "residual", "lr", "seconds"} <= set(row)
    for row in eval_rows:
        assert {"step", *errors} <= set(row)
    stored = json.loads((tmp_path / "summary.json").read_text())
    assert stored == json.loads(json.dumps(summary))
    for key in (*errors, "steps", "wall_seconds", "world_size", "method", "dim"):
        assert key in stored
    assert stored["dim"] == config.pde.dim and stored["method"] == config.estimator.method
    if config.eval.consistency_points:  # the bsde configs: u(0, x0) by Feynman-Kac at the end
        assert stored["consistency"]["points"] == 64 and stored["consistency"]["se"] > 0
    assert (tmp_path / "config.yaml").read_text().count(f"dim: {config.pde.dim}") == 1


@pytest.mark.parametrize("method", ["autograd", "stein", "stein-antithetic"])
def test_runs_are_deterministic_and_condition_terms_are_logged(method, tmp_path):
    # the terminal condition as a loss (not the quickstart's hard constraint); vanilla Stein
    # has no pairs for the difference Laplacian
    extra = [f"estimator.method={method}", "model.hard_constraint=false", "estimator.laplacian=stein", *SMALL_NET]
    a = run(small_config("quickstart.yaml", tmp_path / "a", *extra))
    b = run(small_config("quickstart.yaml", tmp_path / "b", *extra))
    rows_a = [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(tmp_path / "a/metrics.jsonl")]
    rows_b = [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(tmp_path / "b/metrics.jsonl")]
    assert rows_a == rows_b and a["l2_rel"] == b["l2_rel"]
    assert all("terminal" in r for r in rows_a if "loss" in r)


ZERO1_ON_ONE_RANK = ["deepspeed=zero1", "+deepspeed.extra.zero_optimization.stage=1"]  # one rank runs 0 otherwise


@pytest.mark.parametrize("zero", [["deepspeed=zero0"], ZERO1_ON_ONE_RANK])
def test_fused_adam_is_used_and_trains_alike(zero, tmp_path):
    """train.adam=fused reaches torch's fused Adam (through ZeRO 1's wrapper too: forced, one
    rank otherwise runs stage 0) and trains
    alike: the first loss equal, the weights after 3 steps equal to 1e-3 of their norm (a
    step moves a weight by about lr = 1e-3 either way; where a gradient is near 0 the two
    implementations' roundings give different Adam steps, so not closer than that)."""
    weights, kinds, first = {}, {}, {}
    for adam in ("auto", "fused"):
        cfg = small_config("quickstart.yaml", tmp_path / adam, f"train.adam={adam}", *zero, *SMALL_NET)
        run(cfg)
        state = torch.load(next((tmp_path / adam).glob("**/model.pt")), weights_only=True)
        weights[adam] = state.get("model", state)
        first[adam] = next(r["loss"] for r in read_metrics(tmp_path / adam / "metrics.jsonl") if "loss" in r)
        outer = build_trainer(cfg).optimizer  # ZeRO 1 wraps torch's optimizer
        assert (type(outer).__name__ == "DeepSpeedZeroOptimizer") == (len(zero) > 1)
        inner = getattr(outer, "optimizer", outer)
        kinds[adam] = bool(inner.defaults.get("fused"))
    assert kinds == {"auto": False, "fused": True}
    assert first["auto"] == first["fused"]
    for name, value in weights["auto"].items():
        assert (weights["fused"][name] - value).norm() <= 1e-3 * value.norm(), name


def test_deepspeed_clips_the_gradient_norm_as_configured(tmp_path):
    """deepspeed.gradient_clipping: 1.0 by default (DeepSpeed's own default, which runs used
    before the setting existed), 0 turns clipping off, and the optimizer steps with the
    gradient clipped to that norm (seen from inside its step). Under ZeRO stage 0 the step
    clips itself (its norm is also the finite check) and the engine does not clip again."""
    norms = {}
    for clip in (None, 0.0, 1e-3):
        extra = [] if clip is None else [f"deepspeed.gradient_clipping={clip}"]
        tr = build_trainer(small_config("quickstart.yaml", tmp_path / str(clip), *extra, *SMALL_NET))
        assert tr.clip == (1.0 if clip is None else clip) and tr.engine.gradient_clipping() == 0
        optimizer, step = tr.engine.optimizer, tr.engine.optimizer.step

        def recorded(*args, clip=clip, optimizer=optimizer, step=step, **kwargs):
            grads = [p.grad.norm() for group in optimizer.param_groups for p in group["params"]]
            norms[clip] = float(torch.linalg.vector_norm(torch.stack(grads)))
            return step(*args, **kwargs)

        optimizer.step = recorded
        assert train_step(tr, 0).fault is None
    # this first gradient's norm is about 5: the default clips it to 1
    assert norms[0.0] > 1 and norms[None] == pytest.approx(1.0, rel=1e-3)
    assert norms[1e-3] == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])
def test_the_steps_clipping_is_deepspeeds_bit_for_bit(tmp_path, max_norm):
    """The norm the step forms (and checks for finiteness) and its scaling of the gradients are
    DeepSpeed's clip_grad_norm_ to the last bit, clipping (1e-3) or not (1e3), so that runs
    clip as they did when DeepSpeed's engine clipped; a NaN or an infinity anywhere makes the
    norm non-finite."""
    from deepspeed.runtime.utils import clip_grad_norm_

    from dstein.nonfinite import clip_to, gradient_norm

    build_trainer(small_config("quickstart.yaml", tmp_path, *SMALL_NET))  # joins the one-rank group
    gen = torch.Generator().manual_seed(5)
    shapes = ((32, 11), (32,), (32, 32), (1, 32), (1,))
    for _ in range(50):  # roundings differ in a few draws only: many draws, every one equal
        params = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
        scales = torch.exp(4 * torch.randn(len(shapes), generator=gen))
        grads = [torch.randn(shape, generator=gen) * scale for shape, scale in zip(shapes, scales, strict=True)]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        theirs = clip_grad_norm_(params, max_norm)
        ours = [g.clone() for g in grads]
        norm = gradient_norm(ours)
        clip_to(ours, norm, max_norm)
        assert torch.equal(norm.reshape(()), theirs.reshape(()))
        for p, g in zip(params, ours, strict=True):
            assert torch.equal(p.grad, g)
    for bad in (float("nan"), float("inf")):
        spoiled = [g.clone() for g in grads]
        spoiled[2][7, 3] = bad
        assert not torch.isfinite(gradient_norm(spoiled))


def test_adam_auto_is_the_per_tensor_loop_bit_for_bit():
    """train.adam=auto's multi-tensor update (build.ADAM_KERNELS) gives the very numbers of
    torch's per-tensor loop, its default on a CPU, over 30 steps of random gradients."""
    from dstein.build import ADAM_KERNELS

    shapes = ((32, 11), (32,), (32, 32), (1, 32), (1,))
    runs = []
    for kernels in (ADAM_KERNELS["auto"], {"foreach": False}):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
        opt = torch.optim.Adam(params, lr=1e-3, **kernels)
        gen = torch.Generator().manual_seed(1)
        for _ in range(30):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 10
            opt.step()
        runs.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_learning_rate_decays_linearly_to_zero():
    assert [lr_factor(s, 4) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_collocation_depends_on_seed_and_step_only(tmp_path):
    cfg = small_config("heat_100.yaml", tmp_path)
    tr = build_trainer(cfg)
    a = collocation(tr.pde, cfg, 5, torch.float64, torch.device("cpu"))
    b = collocation(tr.pde, cfg, 5, torch.float64, torch.device("cpu"))
    c = collocation(tr.pde, cfg, 6, torch.float64, torch.device("cpu"))
    assert set(a) == {"domain", "initial", "boundary"}
    assert all(torch.equal(a[k].X, b[k].X) for k in a) and not torch.equal(a["domain"].X, c["domain"].X)
    # point groups split each set into contiguous, disjoint, covering slices
    parts = [collocation(tr.pde, cfg, 5, torch.float64, torch.device("cpu"), p, 4) for p in range(4)]
    for kind in a:
        assert torch.equal(torch.cat([part[kind].X for part in parts]), a[kind].X)
        assert [part[kind].start for part in parts] == [0, 2, 4, 5]  # 6 points: sizes 2, 2, 1, 1


def test_adversarial_steps_move_points_and_respect_the_sets(tmp_path):
    terminal_loss = "model.hard_constraint=false"  # the terminal set must exist to move
    cfg = small_config("hjb_250.yaml", tmp_path, "pde.dim=5", "train.adversarial.steps=3", terminal_loss, *SMALL_NET)
    tr = build_trainer(cfg)
    points = collocation(tr.pde, cfg, 0, torch.float32, torch.device("cpu"))
    moved = adversarial_points(tr.model, tr.pde, tr.estimator, points, cfg, 0)
    step = cfg.train.adversarial.step_size
    for kind in points:
        shift = (moved[kind].X - points[kind].X)[:, :-1].abs()
        assert shift.max() <= 3 * step + 1e-6 and shift.max() > 0.5 * step
    assert (moved["domain"].X[:, -1] >= 0).all() and (moved["domain"].X[:, -1] <= 1).all()
    assert (moved["terminal"].X[:, -1] == 1.0).all()


def test_solution_error_alone_rewards_a_model_that_ignores_x():
    """REFERENCE.md: u = t + 1/(2(d+2)) has a small L2 error on heat at d = 10, but the
    gradient error exposes it; this is why grad_l2_rel is always reported."""
    from dstein.pdes import build_pde

    heat = build_pde("heat", 10)
    test = heat.test_set(2000, seed=0, truth_samples=2)
    t = test.X[:, -1]
    errors = relative_errors(t + 1 / (2 * 12), torch.zeros_like(test.grad), test.u, test.grad)
    assert 0.005 < errors["l2_rel"] < 0.02 and errors["grad_l2_rel"] == 1.0


def launch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)}
    return subprocess.run(
        [sys.executable, "launch/train.py", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_command_line_trains_and_reports(root, tmp_path):
    out = launch("--config", "configs/quickstart.yaml", *SMALL, *SMALL_NET, f"run.dir={tmp_path}", cwd=root)
    assert out.returncode == 0, out.stderr
    assert "L2 rel" in out.stdout and str(tmp_path) in out.stdout
    assert (tmp_path / "summary.json").is_file()


def test_print_config(root):
    out = launch("--config", "configs/quickstart.yaml", "--print-config", "pde.dim=3", cwd=root)
    assert out.returncode == 0 and "dim: 3" in out.stdout and "width: 96" in out.stdout


def test_user_pde_from_config(root, tmp_path):
    out = launch(
        "--config",
        "configs/poisson_2d.yaml",
        *SMALL,
        *SMALL_NET,
        "pde.target=user_pde:Reaction",
        f"run.dir={tmp_path}",
        cwd=root,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["pde"] == "reaction"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "configs/nope.yaml"], "--config configs/nope.yaml: no such file"),
        (["--config", "configs/quickstart.yaml", "train.stepz=3"], "train.stepz"),
        (["--config", "configs/quickstart.yaml", "train.steps=many"], "train.steps"),
        (["--config", "configs/quickstart.yaml", "train.steps=0"], "train.steps=0 must be >= 1"),
        (["--config", "configs/quickstart.yaml", "estimator.method=magic"], "estimator.method='magic'"),
        (
            ["--config", "configs/quickstart.yaml", "estimator.samples=100", "estimator.chunk=16"],
            "whole number of chunks",
        ),
        (["--config", "configs/quickstart.yaml", "pde.name=wave"], "pde.name='wave'"),
        (["--config", "configs/quickstart.yaml", "estimator.sigma_x=0"], "estimator.sigma_x=0.0 must be > 0"),
    ],
)
def test_user_errors_exit_2_with_one_line(root, args, message):
    out = launch(*args, cwd=root)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in out.stderr, out.stderr


def test_config_without_schema_header_is_refused(tmp_path):
    bad = tmp_path / "bare.yaml"
    bad.write_text("seed: 1\n")
    from dstein.config import ConfigError

    with pytest.raises(ConfigError, match="defaults: \\[dstein, _self_\\]"):
        load_config(bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_gradient_watch_flags_any_non_finite_entry(bad):
    """The watch reads each local gradient once (min and max): one bad entry among many is seen."""
    from dstein.nonfinite import GradientWatch

    model = torch.nn.Linear(300, 7)
    watch = GradientWatch(model)
    weights = torch.randn(7, 300)
    if bad is not None:
        weights[3, 171] = bad
    (model.weight * weights).sum().backward()
    assert watch.bad == (bad is not None)
    watch.reset()
    model.zero_grad()
    model.bias.sum().backward()  # a finite gradient after reset
    assert not watch.bad


def test_recompute_auto_follows_the_memory_a_rank_has(monkeypatch):
    """estimator.recompute=auto recomputes chunks only when an estimate's kept activations
    exceed RECOMPUTE_MEMORY_SHARE of the rank's memory; always/never are not affected by it."""
    import dstein.estimators.sharded as sharded

    est = sharded.Estimator(method="stein-antithetic", samples=256, sigma_x=0.1, sigma_t=0.1, seed=0, recompute="auto")
    model = torch.nn.Sequential(torch.nn.Linear(11, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    X = torch.zeros(50, 11)
    kept = 50 * 256 * (3 * 33 + 11) * 4  # the estimate of Estimator.recomputes
    share = sharded.RECOMPUTE_MEMORY_SHARE
    for memory, expected in ((int(kept / share) + 16, False), (int(kept / share) - 16, True)):
        monkeypatch.setattr(sharded, "rank_memory_bytes", lambda device, m=memory: m)
        assert est.recomputes(model, X, 256) is expected
        for policy in ("always", "never"):
            assert sharded.Estimator(**{**est.__dict__, "recompute": policy}).recomputes(model, X, 256) is (
                policy == "always"
            )


@pytest.mark.parametrize(
    "env, ranks",
    [({}, 1), ({"LOCAL_WORLD_SIZE": "4"}, 4), ({"OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, 3),
     ({"SLURM_STEP_TASKS_PER_NODE": "8(x2)"}, 8), ({"SLURM_STEP_TASKS_PER_NODE": "2,1"}, 2)],
)  # fmt: skip
def test_ranks_on_this_node_from_each_launcher(env, ranks):
    from dstein.distributed import ranks_on_this_node

    assert ranks_on_this_node(env) == ranks


def test_the_anisotropic_hjb_trains_with_its_quadrature_truth_and_radial_baseline(tmp_path):
    """pde.name=hjb_aniso through the quickstart's settings: the test sets' truth from the
    quadrature (no standard error), the best radial predictor among the baselines (200 points
    suffice for its fit), and the start state's reference from the quadrature too."""
    cfg = small_config("quickstart.yaml", tmp_path, "pde.name=hjb_aniso", "eval.points=200", *SMALL_NET)
    summary = run(cfg)
    assert {"radial", "t_only", "constrained_constant"} <= set(summary["baselines"])
    assert summary["baselines"]["radial"]["grad_l2_rel"] > 0.05  # its gradients do not point along x
    assert "quadrature" in summary["start_source"] and "truth_max_se" not in summary
    assert summary["consistency"]["points"] == 64
