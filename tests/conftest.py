"""Shared test set-up: tiny models, one thread (tiny tensors are slower with more), offline hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

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
