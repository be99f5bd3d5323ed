"""The researcher's journey on a real scheduler: a one-node SLURM (``scripts/local_slurm.sh``), a
sweep of DDP jobs through ``hydra/launcher=slurm``, a requeue on USR1, wandb runs and the report.

Fast: the local cluster runs a 2-task job (``srun`` gives each task its rank) and requeues a job.
Slow: the journey (:func:`test_journey`), the commands of docs/cluster.md.
The cluster tests skip with the reason where no cluster answers (no root to start one), never under CI.
"""

import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def wait_for(job: str, states: tuple[str, ...], timeout: float = 120) -> str:
    """The job's state once it is one of ``states`` (``scontrol show job``)."""
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        state = next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "")
        if state in states:
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job} still {state!r} after {timeout}s")


def start_requeued(job: str, timeout: float = 120) -> None:
    """Start a requeued job now: SLURM holds a requeued job for about two minutes (its begin time) before it
    may run again; a cluster's users wait, a test asks ``scontrol update StartTime=now``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        if "Restarts=0" not in out and "JobState=PENDING" in out:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job} was not requeued within {timeout}s")


def test_local_cluster_runs_a_two_task_job_and_requeues(slurm_cluster, tmp_path):
    """sbatch + srun: two tasks with ranks 0 and 1 (what Lightning's SLURMEnvironment reads); a job
    requeued with ``scontrol requeue`` runs again with SLURM_RESTART_COUNT=1."""
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH -n 2 --requeue\n"
                      f"srun bash -c 'echo rank=$SLURM_PROCID of=$SLURM_NTASKS restart=${{SLURM_RESTART_COUNT:-0}} "
                      f">> {tmp_path}/ranks.txt'\n"
                      f"[ -n \"$SLURM_RESTART_COUNT\" ] || {{ scontrol requeue $SLURM_JOB_ID; sleep 30; }}\n")
    job = subprocess.run(["sbatch", "--parsable", "-o", f"{tmp_path}/%j.out", str(script)], capture_output=True,
                         text=True, check=True).stdout.strip()
    start_requeued(job)
    assert wait_for(job, ("COMPLETED", "FAILED")) == "COMPLETED"
    lines = sorted((tmp_path / "ranks.txt").read_text().split("\n")[:-1])
    assert lines == ["rank=0 of=2 restart=0", "rank=0 of=2 restart=1", "rank=1 of=2 restart=0",
                     "rank=1 of=2 restart=1"], lines
