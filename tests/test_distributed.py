"""Sample sharding across real CPU ranks (gloo): gradients, launchers, failures (MATH.md section 4)."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_utils import VENV_BIN, free_port, run_command, run_here, spawn_ranks, wait_all

from dstein.distributed import Launch, check_layout, detect_launch
from dstein.metrics import read_metrics
from dstein.op_build import own_op_build

SMALL_64 = [
    "pde.dim=5", "model.width=16", "model.depth=2", "estimator.samples=48", "estimator.chunk=8",
    "train.domain_points=6", "train.condition_points=6", "estimator.condition_samples=null",
]  # fmt: skip
CASES = {
    "heat": ["configs/heat_100.yaml", *SMALL_64],
    "hjb": ["configs/quickstart.yaml", *SMALL_64],
    "hjb-adversarial": ["configs/quickstart.yaml", *SMALL_64, "train.adversarial.steps=2"],
    "hjb-unbiased": ["configs/quickstart.yaml", *SMALL_64, "train.residual_loss=unbiased"],
    "hjb-hard": ["configs/quickstart.yaml", *SMALL_64, "model.hard_constraint=true", "train.residual_loss=unbiased"],
    "hjb-hard-subspace": [
        "configs/quickstart.yaml",
        *SMALL_64,
        "pde.dim=40",
        "estimator.method=stein-subspace",
        "model.hard_constraint=true",
        "train.adversarial.steps=1",
    ],
    "hjb-radial-subspace": [
        "configs/quickstart.yaml",
        *SMALL_64,
        "pde.dim=40",
        "estimator.method=stein-subspace",
        "model.family=radial",
        "model.hard_constraint=true",
        "train.residual_loss=unbiased",
        "train.adversarial.steps=1",
    ],
    "sine-gordon-fit": [
        "configs/sine_gordon_1k.yaml",
        *SMALL_64,
        "pde.dim=40",
        "model.output_init=fit",
        "pde.params.coeff_seed=2",
    ],
    "hjb-fit": ["configs/quickstart.yaml", *SMALL_64, "model.output_init=fit"],
}


#: Every (world size, sample_group_size) layout tested, with the cases run in it.
LAYOUTS = [
    ("heat", 2, 0),
    ("heat", 3, 0),
    ("hjb", 2, 0),
    ("hjb", 3, 0),
    ("hjb", 2, 1),  # two point groups, no sample sharding
    ("heat", 3, 1),  # three point groups
    ("hjb", 4, 2),  # two point groups x two sample ranks
    ("hjb-adversarial", 3, 0),
    ("hjb-adversarial", 4, 2),
    ("hjb-unbiased", 2, 0),
    ("hjb-unbiased", 3, 0),
    ("hjb-hard", 2, 0),
    ("hjb-hard", 4, 2),
    ("hjb-hard-subspace", 3, 0),
    ("hjb-radial-subspace", 2, 0),
    ("hjb-radial-subspace", 4, 2),
    ("sine-gordon-fit", 2, 0),
    ("sine-gordon-fit", 4, 2),
    ("hjb-fit", 3, 1),
]


def gradients(out_dir: Path, cases: list[str], world: int, sample_group_size: int = 0) -> dict[str, dict]:
    """The gradients of ``cases`` computed by ``world`` ranks of one launch (grad_check.py runs
    them one after another in the same process group: one start for all of them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    listed = {case: [*CASES[case], f"parallel.sample_group_size={sample_group_size}"] for case in cases}
    (out_dir / "cases.json").write_text(json.dumps(listed))
    for rc, _, err in wait_all(spawn_ranks(["tests/scripts/grad_check.py", str(out_dir / "cases.json"),
                                            str(out_dir)], world)):  # fmt: skip
        assert rc == 0, err[-3000:]
    return {case: torch.load(out_dir / f"{case}.pt") for case in cases}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """``get(world, sample_group_size)``: every case of that layout, from one launch; (1, 0) is
    the single-process reference of every case."""
    cache: dict[tuple[int, int], dict[str, dict]] = {}

    def get(world: int, sample_group_size: int) -> dict[str, dict]:
        layout = (world, sample_group_size)
        if layout not in cache:
            cases = sorted(CASES) if layout == (1, 0) else sorted({c for c, w, g in LAYOUTS if (w, g) == layout})
            cache[layout] = gradients(tmp_path_factory.mktemp(f"grad-{world}-{sample_group_size}"), cases, *layout)
        return cache[layout]

    return get


@pytest.mark.ranks
@pytest.mark.parametrize("case, world, sample_group_size", LAYOUTS)
def test_gradient_equals_single_process_gradient(sharded, case, world, sample_group_size):
    ref = sharded(1, 0)[case]
    got = sharded(world, sample_group_size)[case]
    assert got["world"] == world and ref["world"] == 1
    rel = float((got["grad"] - ref["grad"]).norm() / ref["grad"].norm())
    assert rel <= 1e-10, rel
    assert abs(float(got["loss"] - ref["loss"])) <= 1e-10 * abs(float(ref["loss"]))
    # the gradient with respect to the points (adversarial steps take its sign): the direct
    # dependence of residual and targets on the points counts once, not once per rank
    for kind, (g, start) in got["point_grad"].items():
        want = ref["point_grad"][kind][0][start : start + g.shape[0]]
        assert float((g - want).norm() / want.norm()) <= 1e-10, kind


# --- launchers: the same config gives the same losses under every launcher ---------------
# No adversarial steps here: they move points by step_size * sign(gradient), and in float32
# a gradient component near zero can change sign with the order of summation across ranks.
# Their sharding is checked exactly in float64 above.

TINY_10K = [
    "train.steps=3", "estimator.samples=384", "model.width=32", "model.depth=2", "train.domain_points=8",
    "train.condition_points=8", "train.adversarial.steps=0", "eval.every=3", "eval.points=16",
    "eval.samples=8", "eval.truth_samples=2000", "train.log_every=1", "eval.plots=false",
    "eval.control_paths=300", "eval.control_steps=2",  # 2 chunks of paths, dealt to the ranks
]  # fmt: skip


def losses(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in ("seconds",)}
        for r in read_metrics(run_dir / "metrics.jsonl")
        if "loss" in r
    ]


def assert_same_losses(a: list[dict], b: list[dict], rtol: float = 1e-5, later_rtol: float = 1e-3) -> None:
    """Every term of the first step agrees to ``rtol``; the loss and lr of later steps to
    ``later_rtol``.

    After the first update the parameters differ in the last float32 bits (gradient sums in
    another order), and at d = 10,000 with sigma_x = 0.01 the residual amplifies such
    differences: the Laplacian divides g+ + g- - 2 g0, whose float32 rounding is 1e-7, by
    sigma_x^2 = 1e-4 (by 1e-4 / 141 with Stein's weights |z|^2 - d). configs/hjb_10k.yaml's
    loss is that residual alone (hard constraint): its second step differs by about 1e-4
    between world sizes. The exact equality of the sharded gradient is the float64 test above.
    """
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for i, (ra, rb) in enumerate(zip(a, b, strict=True)):
        for key in ra if i == 0 else ["loss", "lr"]:
            tol = rtol if i == 0 or key == "lr" else later_rtol
            assert abs(ra[key] - rb[key]) <= tol * max(abs(rb[key]), 1e-12), (key, ra, rb)


@pytest.fixture(scope="module")
def plain_hjb_10k(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plain")
    out = run_here("train.py", "--config", "configs/hjb_10k.yaml", *TINY_10K, f"run.dir={run_dir}")  # in this process
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 1
    return run_dir


def launcher_command(name: str, run_dir: Path, *extra: str) -> list[str]:
    script = ["launch/train.py", "--config", "configs/hjb_10k.yaml", *TINY_10K, f"run.dir={run_dir}", *extra]
    port = str(free_port())
    if name == "deepspeed":
        return [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port, *script]
    if name == "torchrun":
        return [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, *script]
    if name == "torchrun-3":
        return [str(VENV_BIN / "torchrun"), "--nproc_per_node", "3", "--master_port", port, *script]
    if name == "mpirun":
        mpirun = shutil.which("mpirun", path=str(VENV_BIN)) or "mpirun"
        return [mpirun, "-np", "2", "--oversubscribe", sys.executable, *script]
    raise ValueError(name)


@pytest.mark.ranks
@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher, world, extra",
    [
        ("deepspeed", 2, []),
        ("torchrun", 2, []),
        ("mpirun", 2, []),
        ("torchrun-3", 3, []),
        ("torchrun", 2, ["parallel.sample_group_size=1"]),
        ("torchrun", 2, ["deepspeed=zero1"]),
        ("torchrun", 2, ["deepspeed=zero2", "deepspeed.optimizer=deepspeed"]),
    ],
)
def test_launchers_reproduce_the_single_process_losses(plain_hjb_10k, tmp_path, launcher, world, extra):
    out = run_command(launcher_command(launcher, tmp_path, *extra))
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == world
    assert_same_losses(losses(tmp_path), losses(plain_hjb_10k))
    # the closed loop's chunks of paths dealt to the ranks: the one-rank figures, up to the
    # model's float32 differences after 3 steps
    one = json.loads((plain_hjb_10k / "summary.json").read_text())["control"]
    assert summary["control"]["paths"] == one["paths"] == 300
    for key in ("cost", "uncontrolled", "cost_se"):
        assert summary["control"][key] == pytest.approx(one[key], rel=1e-4), key


@pytest.mark.ranks
@pytest.mark.slow
def test_srun_reproduces_the_single_process_losses(slurm, plain_hjb_10k, tmp_path):
    script = ["launch/train.py", "--config", "configs/hjb_10k.yaml", *TINY_10K, f"run.dir={tmp_path}"]
    out = run_command(["srun", "-n", "2", "--cpus-per-task=1", sys.executable, *script])
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == 2
    assert_same_losses(losses(tmp_path), losses(plain_hjb_10k))


@pytest.mark.ranks
def test_killed_rank_makes_the_others_exit_with_a_message(tmp_path):
    args = [
        "launch/train.py", "--config", "configs/quickstart.yaml", "train.steps=100000", "model.width=16",
        "estimator.samples=32", "eval.every=100000", "eval.points=8", "eval.truth_samples=100",
        "parallel.timeout_s=20", "train.log_every=1", f"run.dir={tmp_path}",
    ]  # fmt: skip
    procs = spawn_ranks(args, 2)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    assert metrics.exists(), wait_all(procs, timeout=5)
    procs[1].send_signal(signal.SIGKILL)
    start = time.time()
    rc, _, err = wait_all(procs[:1], timeout=60)[0]
    elapsed = time.time() - start
    procs[1].wait()
    assert rc == 3, err[-2000:]
    assert elapsed < 30, elapsed
    assert "rank 1 is gone" in err and "parallel.timeout_s" in err, err[-2000:]


@pytest.mark.ranks
def test_world_size_disagreement_is_a_clear_error(tmp_path):
    args = ["launch/train.py", "--config", "configs/quickstart.yaml", "parallel.world_size=3", f"run.dir={tmp_path}"]
    for rc, _, err in wait_all(spawn_ranks(args, 2)):
        assert rc == 2 and "parallel.world_size=3 but the launcher" in err, err[-2000:]


def test_layout_rules():
    two = Launch("torchrun", 0, 2, 0)
    assert check_layout(two, 0, 0) == 2 and check_layout(two, 2, 1) == 1
    with pytest.raises(RuntimeError, match=r"parallel.sample_group_size=3 does not divide"):
        check_layout(Launch("torchrun", 0, 4, 0), 0, 3)
    with pytest.raises(RuntimeError, match=r"parallel.world_size=4 but the launcher \(torchrun\) started 2"):
        check_layout(two, 4, 0)


def test_launcher_detection():
    assert detect_launch({}).launcher == "python"
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    launch = detect_launch({**env, "TORCHELASTIC_RUN_ID": "x"})
    assert (launch.launcher, launch.rank, launch.world_size, launch.master_port) == ("torchrun", 1, 2, 1234)
    slurm = detect_launch({"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "3", "SLURM_LOCALID": "2",
                           "SLURM_JOB_ID": "17", "MASTER_ADDR": "127.0.0.1"})  # fmt: skip
    assert (slurm.launcher, slurm.rank, slurm.world_size, slurm.local_rank) == ("srun", 2, 3, 2)
    # a batch script's own shell is not a job step: plain python there is one process
    assert detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}).launcher == "python"


@pytest.mark.ranks
def test_too_many_ranks_for_the_chunks_is_refused(tmp_path):
    args = ["launch/train.py", "--config", "configs/quickstart.yaml", "estimator.samples=16", "estimator.chunk=16",
            "estimator.condition_samples=null", f"run.dir={tmp_path}"]  # fmt: skip
    for rc, _, err in wait_all(spawn_ranks(args, 2)):
        assert rc == 2 and "gives 1 noise chunks, fewer than the 2 ranks of a sample group" in err, err[-2000:]


def test_only_a_failed_collective_counts_as_a_lost_peer():
    """Exit status 3 is chosen by where the error was raised, not by its text: a
    RuntimeError from this rank's own computation, or memory exhaustion, is not a lost peer,
    whatever its message says; torch.distributed's own errors are."""
    import torch.distributed as dist

    from dstein.distributed import collective_failure

    def raised(error: BaseException) -> BaseException:
        try:
            raise error
        except BaseException as caught:
            return caught

    assert not collective_failure(raised(RuntimeError("a collective failed: Connection closed by peer")))
    assert not collective_failure(raised(torch.OutOfMemoryError("CUDA out of memory")))
    assert not collective_failure(raised(ValueError("bad value")))
    assert collective_failure(raised(dist.DistError("NCCL communicator was aborted")))
    # gloo's plain RuntimeError from inside torch.distributed: test_killed_rank_makes_the_others_exit...


def test_a_lost_peer_on_another_host_is_named_by_the_address_in_the_error():
    from dstein.distributed import DistInfo, Launch, ranks_at

    info = DistInfo(Launch("srun", 0, 4, 0), "gloo", torch.device("cpu"), 4,
                    peers=[("here", 11), ("here", 12), ("localhost", 13), ("localhost", 14)])  # fmt: skip
    cause = "[../pair.cc:553] Connection closed by peer [127.0.0.1]:24481. This is typically caused by..."
    assert ranks_at(info, cause) == ("localhost", [2, 3])
    assert ranks_at(info, "Connection reset by peer") is None  # no address: nothing to name


def test_the_op_is_built_by_this_environments_ninja_in_a_directory_of_its_own(monkeypatch, tmp_path):
    """Another ninja first on PATH, or another environment's build in the same directory, would
    rebuild DeepSpeed's CPU op at every alternation (about 30 s): each start puts the ninja
    beside its interpreter first and builds under a directory named for its environment,
    unless TORCH_EXTENSIONS_DIR says where."""
    import os

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    where = own_op_build()
    assert os.environ["PATH"].split(os.pathsep) == [str(VENV_BIN), "/usr/bin", "/bin"]
    assert where.parent == tmp_path / "torch_extensions" and where.name.startswith(f"dstein-{Path(sys.prefix).name}-")
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(where) and own_op_build() == where  # the same on every start
    assert os.environ["PATH"].split(os.pathsep)[0] == str(VENV_BIN) and os.environ["PATH"].count(str(VENV_BIN)) == 1
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "chosen"))
    assert own_op_build() == tmp_path / "chosen"
