"""The batch scripts on a real SLURM cluster: a job preempted with SIGUSR1 saves, requeues
itself, resumes and ends exactly where an uninterrupted job ends.

The signal is sent as ``--signal=B:USR1@N`` would send it near the time limit (to the batch
shell only), but by hand (``scancel -b``) once the run is under way, because SLURM checks
the time-limit signal only about every 30 s. Both scripts start two ranks of test_checkpoint's
tiny run, so the uninterrupted run they must end like is the session's two-rank run of that
config (conftest's ``straight``, started without SLURM): the same world size, the same
losses and summary bit for bit whatever started the ranks.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from distributed_utils import ROOT, base_env
from slurm_cluster import job_field, wait_job
from test_checkpoint import CONFIG, STEPS, TINY, last_step, losses, summary

pytestmark = [pytest.mark.ranks, pytest.mark.slow]

OVERRIDES = " ".join([*TINY, f"train.steps={STEPS}"])
#: the run is preempted once this step is logged (the signal lands a few steps later)
PREEMPT_AFTER = 10
SCRIPTS = {
    # one node, the DeepSpeed launcher starting NPROC ranks
    "train.sbatch": (["--cpus-per-task=2"], {"NPROC": "2"}),
    # srun starting one rank per task (here 2 tasks on the one node)
    "multinode.sbatch": (["--nodes=1", "--ntasks-per-node=2"], {}),
}


def submit(script: str, run_root: Path) -> str:
    options, env = SCRIPTS[script]
    env = {**base_env(), **env, "CONFIG": CONFIG, "OVERRIDES": OVERRIDES, "RUN_ROOT": str(run_root)}
    env["DSTEIN"] = str(ROOT)
    out = subprocess.run(
        ["sbatch", "--parsable", *options, f"--output={run_root}/job-%j.out", f"slurm/{script}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_preempted_job_requeues_resumes_and_matches_an_uninterrupted_job(slurm, straight, tmp_path, script):
    job = submit(script, tmp_path)
    run_dir = tmp_path / f"slurm-{job}"  # the run directory is tied to the job id
    deadline = time.time() + 300
    while last_step(run_dir) < PREEMPT_AFTER:
        assert time.time() < deadline and job_field(job, "JobState") in ("PENDING", "RUNNING"), (
            (tmp_path / f"job-{job}.out").read_text() if (tmp_path / f"job-{job}.out").exists() else "no output"
        )
        time.sleep(0.1)
    subprocess.run(["scancel", "-b", "--signal=USR1", job], check=True, timeout=30)
    state = wait_job(job)
    log = (tmp_path / f"job-{job}.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    assert job_field(job, "Restarts") == "1", log[-4000:]
    assert "preempted by SIGUSR1 after step" in log and f"requeueing job {job}" in log
    assert f"resuming from {run_dir}/checkpoints/step-" in log
    stopped = int(log.split("preempted by SIGUSR1 after step ")[1].split(":")[0])
    assert PREEMPT_AFTER <= stopped < STEPS

    reference = straight[2]
    assert summary(run_dir) == summary(reference)
    assert losses(run_dir) == losses(reference)
