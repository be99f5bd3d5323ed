"""Shared test set-up: tiny models, one thread (tiny tensors are slower with more), offline hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

LOCAL_SLURM = Path(os.environ.get("LOCAL_SLURM_DIR", "/tmp/recsys-slurm")) / "slurm.conf"


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """A SLURM cluster that answers ``sinfo`` with a node up (``scripts/local_slurm.sh start`` writes
    ``$LOCAL_SLURM_DIR/slurm.conf``; ``SLURM_CONF`` is set to it when unset). Without one the test skips
    with the reason, except under CI (``CI=true``), where it fails: CI starts the cluster (.ci/run)."""
    if not os.environ.get("SLURM_CONF") and LOCAL_SLURM.is_file():
        os.environ["SLURM_CONF"] = str(LOCAL_SLURM)
    why = ""
    if not shutil.which("sinfo"):
        why = "no SLURM here (sinfo not found): scripts/local_slurm.sh start installs one (root, apt)"
    else:
        try:
            p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            p = subprocess.CompletedProcess([], 1, "", "no answer within 10 s")
        states = p.stdout.split()
        if p.returncode or not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
            why = f"no SLURM node up (sinfo: {(p.stdout + p.stderr).strip()[:120]!r}): scripts/local_slurm.sh start"
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {why}")
        pytest.skip(why)
    return os.environ.get("SLURM_CONF", "")
