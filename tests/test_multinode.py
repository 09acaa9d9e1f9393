"""Many nodes for real: two SLURM nodes, each in its own network namespace with its own address
and host name (slurm/local/multinode-up.sh), run slurm/multinode.sbatch as a two-node cluster
would: ranks on different hosts reach each other over the bridge, find the first node's
address from SLURM, write checkpoints into one shared run directory (every namespace sees
the same files, as nodes see a cluster file system), survive preemption and requeue, and
stop together when a rank on the second node is lost.

Root only (the harness creates namespaces, links and daemons); .ci/run runs it as root.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from distributed_utils import ROOT, base_env, run_here
from slurm_cluster import job_field, wait_job
from test_checkpoint import last_step
from test_distributed import TINY_10K, assert_same_losses, losses

pytestmark = [pytest.mark.ranks, pytest.mark.slow]

# 4 ranks on 2 nodes x 2 tasks; the tiny hjb_10k run of the launcher tests
NODES = ["--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1"]
#: seconds srun gives the other tasks once one has ended, in the jobs that lose a rank (default 20)
SRUN_WAIT = 5
LONG = [
    "estimator.samples=384", "model.width=32", "model.depth=2", "train.domain_points=8",
    "train.condition_points=8", "train.adversarial.steps=0", "eval.every=100000", "eval.points=16",
    "eval.samples=8", "eval.truth_samples=2000", "train.log_every=1", "checkpoint.every=10", "run.threads=1",
    "eval.plots=false", "eval.control_paths=300", "eval.control_steps=2",
]  # fmt: skip


def submit(
    env: dict[str, str], run_root: Path, overrides: list[str], run_dir: Path | None = None, srun_wait: int = 20
) -> str:
    """sbatch slurm/multinode.sbatch on two nodes; its job id."""
    job_env = {**base_env(), **env, "CONFIG": "configs/hjb_10k.yaml", "OVERRIDES": " ".join(overrides),
               "RUN_ROOT": str(run_root), "DSTEIN": str(ROOT), "SRUN_WAIT": str(srun_wait)}  # fmt: skip
    if run_dir is not None:
        job_env["RUN_DIR"] = str(run_dir)
    out = subprocess.run(
        ["sbatch", "--parsable", *NODES, f"--output={run_root}/job-%j.out", "slurm/multinode.sbatch"],
        cwd=ROOT, env=job_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def log_of(run_root: Path, job: str) -> str:
    path = run_root / f"job-{job}.out"
    return path.read_text() if path.exists() else "(no output yet)"


def wait_for_step(env: dict[str, str], run_root: Path, job: str, run_dir: Path, step: int) -> None:
    deadline = time.time() + 300
    while last_step(run_dir) < step:
        state = job_field(job, "JobState", env)
        assert time.time() < deadline and state in ("PENDING", "RUNNING", "CONFIGURING"), log_of(run_root, job)
        time.sleep(0.2)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("one")
    out = run_here("train.py", "--config", "configs/hjb_10k.yaml", *TINY_10K, f"run.dir={run_dir}")  # in this process
    assert out.returncode == 0, out.stderr[-3000:]
    return losses(run_dir)


@pytest.mark.parametrize("group", [2, 4], ids=["point-groups-across-nodes", "one-sample-group-on-both-nodes"])
def test_two_nodes_reproduce_the_single_process_losses(multinode, one_process, tmp_path, group):
    """sample_group_size=2: each node is a point group sharing its samples; 4: the four ranks
    on both nodes share the samples of every point."""
    job = submit(multinode, tmp_path, [*TINY_10K, f"parallel.sample_group_size={group}"])
    state = wait_job(job, env=multinode)
    log = log_of(tmp_path, job)
    assert state == "COMPLETED", log[-4000:]
    run_dir = tmp_path / f"slurm-{job}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["sample_group_size"]) == (4, group)
    assert "on dnode1 at" in log  # the batch shell runs on the first node
    assert_same_losses(losses(run_dir), one_process)


def test_a_preempted_two_node_job_requeues_and_ends_as_an_uninterrupted_one(multinode, tmp_path):
    """scancel -b --signal=USR1 reaches the batch shell on the first node, srun passes it to
    the ranks on both nodes, they save into the shared run directory and the job requeues;
    the resumed job loads what ranks on two hosts wrote and ends bit for bit like a job that
    was never stopped."""
    overrides = [*LONG, "train.steps=60"]
    job = submit(multinode, tmp_path, overrides)
    run_dir = tmp_path / f"slurm-{job}"
    wait_for_step(multinode, tmp_path, job, run_dir, 15)
    subprocess.run(["scancel", "-b", "--signal=USR1", job], check=True, timeout=30, env={**base_env(), **multinode})
    straight = submit(multinode, tmp_path, overrides)  # runs while the preempted job waits out its requeue delay
    state = wait_job(job, env=multinode)
    log = log_of(tmp_path, job)
    assert state == "COMPLETED" and job_field(job, "Restarts", multinode) == "1", log[-4000:]
    assert "preempted by SIGUSR1 after step" in log and f"resuming from {run_dir}/checkpoints/step-" in log
    rng = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*/rng/rank-*.pt"))
    assert {"rank-00000.pt", "rank-00002.pt", "rank-00003.pt"} <= set(rng)  # written on both hosts
    assert wait_job(straight, env=multinode) == "COMPLETED", log_of(tmp_path, straight)[-4000:]
    reference = tmp_path / f"slurm-{straight}"
    assert [r for r in losses(run_dir)] == [r for r in losses(reference)]


def train_processes(node: str) -> dict[int, int]:
    """SLURM_PROCID -> pid of the training processes in a node's network namespace."""
    pids = subprocess.run(["ip", "netns", "pids", f"dstein-{node.removeprefix('d')}"], capture_output=True,
                          text=True, timeout=30).stdout.split()  # fmt: skip
    found = {}
    for pid in map(int, pids):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"launch/train.py" in cmdline:
            procid = [e for e in environ if e.startswith(b"SLURM_PROCID=")]
            if procid:
                found[int(procid[0].split(b"=")[1])] = pid
    return found


def job_with_rank_3_hit(multinode, tmp_path: Path, timeout: float, signal_name: str) -> tuple[str, Path, int, float]:
    """A long two-node job; once it logged step 15, ``kill -SIGNAL`` rank 3 (on dnode2).
    Returns the job, its run directory, rank 3's pid and when it was signalled. srun ends the
    step SRUN_WAIT seconds after its first task ended: 5 s here."""
    overrides = [*LONG, "train.steps=100000", f"parallel.timeout_s={timeout}"]
    job = submit(multinode, tmp_path, overrides, srun_wait=SRUN_WAIT)
    run_dir = tmp_path / f"slurm-{job}"
    wait_for_step(multinode, tmp_path, job, run_dir, 15)
    second = train_processes("dnode2")
    assert sorted(second) == [2, 3], second
    subprocess.run(["kill", f"-{signal_name}", str(second[3])], check=True)
    return job, run_dir, second[3], time.time()


def test_a_rank_lost_on_the_second_node_stops_every_rank_and_the_run_resumes(multinode, tmp_path):
    timeout = 10
    job, run_dir, _, killed = job_with_rank_3_hit(multinode, tmp_path, timeout, "KILL")
    state = wait_job(job, timeout=timeout + 120, env=multinode)
    stopped = time.time() - killed
    log = log_of(tmp_path, job)
    assert state == "FAILED" and stopped < timeout + SRUN_WAIT + 15, (state, stopped, log[-4000:])
    errors = {int(m.group(1)): m.group(0) for m in re.finditer(r"error: rank (\d+): a collective failed: .*", log)}
    assert sorted(errors) == [0, 1, 2], log[-4000:]  # every other rank said why it stopped
    assert "rank 3 is gone" in errors[2]  # its neighbour on dnode2 sees the process gone
    assert any("host dnode2" in line for line in errors.values()), errors  # and dnode1's ranks name the node
    assert (
        re.search(r"dnode1: tasks 0-1: Exited with exit code 3", log)
        and "dnode2: task 2: Exited with exit code 3" in log
    )
    assert "Traceback" not in log
    # the last complete checkpoint is intact: the same run continues from it on both nodes
    done = max(
        int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*") if (p / "COMMITTED").exists()
    )
    resumed = submit(multinode, tmp_path, [*LONG, f"train.steps={done + 5}"], run_dir=run_dir)
    assert wait_job(resumed, env=multinode) == "COMPLETED", log_of(tmp_path, resumed)[-4000:]
    assert f"resuming from {run_dir}/checkpoints/step-{done:08d}" in log_of(tmp_path, resumed)
    assert last_step(run_dir) == done + 5


def test_a_rank_stopped_on_the_second_node_ends_every_rank_within_the_timeout(multinode, tmp_path):
    """SIGSTOP keeps the stopped rank's connections open, so no collective fails: the
    watchdog of its neighbour (rank 2, on the same node) finds it, the ranks on the first
    node read the verdict from the store, every rank exits 3 naming it, and srun ends the
    step SRUN_WAIT (5 s) after the first task ended, the stopped one included, instead of
    waiting for it."""
    timeout = 10
    job, _, pid, stopped = job_with_rank_3_hit(multinode, tmp_path, timeout, "STOP")
    state = wait_job(job, timeout=timeout + 120, env=multinode)
    ended = time.time() - stopped
    log = log_of(tmp_path, job)
    assert state == "FAILED" and ended < timeout + SRUN_WAIT + 15, (state, ended, log[-4000:])
    verdicts = dict(re.findall(r"error: rank (\d+): (rank 3 \(host dnode2, pid \d+\) stopped answering.*)", log))
    verdicts.pop("3", None)  # continued by srun to be killed, the stopped rank may say it too
    assert sorted(verdicts) == ["0", "1", "2"], log[-4000:]  # every other rank, on both nodes, says why
    assert f"pid {pid}" in verdicts["0"] and "found by rank 2" in verdicts["0"]
    assert "Traceback" not in log
