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


REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def compose_config(name: str = "train", *overrides: str, hydra_cfg: bool = False):
    """The real config ``conf/<name>.yaml`` composed with ``overrides`` (Hydra's global state cleared first),
    as ``train.py``/``evaluate.py`` would see it; ``hydra_cfg``: with the ``hydra`` node."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=hydra_cfg)


def paths_under(out, store=None, cache=None) -> list[str]:
    """Overrides that keep a test run's outputs in ``out``, its adapter store in ``store`` (default
    ``<out>/store``) and its caches in ``cache`` (default ``<out>/cache``)."""
    out = Path(out)
    return [f"paths.output_dir={out}", f"paths.adapter_store={store or out / 'store'}",
            f"paths.cache_dir={cache or out / 'cache'}"]


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
