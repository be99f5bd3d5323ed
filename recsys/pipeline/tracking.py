"""What a run tells its loggers (wandb, CSV) besides the metrics Lightning logs while training.

- :func:`hyperparameters`: the resolved config (without Hydra's own node) and the parameter counts,
  logged on every logger, so runs can be filtered and grouped by method, target, lr, r, seed; with the
  command line's overrides, the run folder and the sweep folder (``hydra/...``, :func:`hydra_record`);
- :func:`define_summary` / :func:`log_best`: the run's summary holds the best validation value of the
  optimised metric (``<metric>.max``), its epoch (``best/epoch``) and the test metrics of that checkpoint;
- :func:`log_adapter`: an exported adapter as a ``wandb.Artifact`` of type ``model`` (its manifest as
  the metadata);
- :func:`use_adapters`: the store adapters a run read (X-Cross and merge sources, WeaveRec's reused
  hybrids, ``evaluate.py adapter=``) as the run's inputs, so the dashboard shows the lineage;
- :func:`log_results`: the results table (model and reference rows) as a ``wandb.Table``;
- :class:`RankWriter`: the callback that writes every evaluation's per-user ranks into the run folder.

wandb cannot record an input artifact offline (``use_artifact`` refuses), so the names of the inputs
are always kept in the config under ``lineage/inputs``; online they are also ``use_artifact``-ed by
name (``<name>:latest``, logged by the run that trained them).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from recsys.evaluation import ranks

log = logging.getLogger("recsys")

ROWS = ("model", "zero_shot", "random", "popularity")


def wandb_runs(loggers) -> list:
    """The wandb runs behind ``loggers`` (rank 0 only: other ranks get none)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from lightning.pytorch.loggers import WandbLogger

    if getattr(rank_zero_only, "rank", 0):
        return []
    return [lg.experiment for lg in loggers if isinstance(lg, WandbLogger)]


def finish_run() -> None:
    """End this process's wandb run, if one is open: the next training (a source adapter's, then the
    method's) starts a run of its own instead of writing into this one."""
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return
    if wandb.run is not None:
        wandb.finish()


def hydra_record() -> dict:
    """Where the run comes from: ``hydra/overrides`` (the command line's), ``hydra/run_dir``, and in a sweep
    ``hydra/sweep_dir`` and ``hydra/job_num`` ({} outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hc = HydraConfig.get()
    except ValueError:
        return {}
    out = {"hydra/overrides": list(hc.overrides.task), "hydra/run_dir": str(hc.runtime.output_dir)}
    if hc.mode == RunMode.MULTIRUN or "hydra.mode=RUN" in hc.overrides.hydra:  # a sweep's job (or its DDP rank)
        out["hydra/sweep_dir"] = str(Path(hc.runtime.output_dir).parent)
        out["hydra/job_num"] = hc.job.get("num")
    return out


def hyperparameters(cfg: DictConfig, params: dict) -> dict:
    """The resolved config without ``hydra``, the Hydra record (:func:`hydra_record`) and ``params``
    (``params/trainable``, ...)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    return {**config, **hydra_record(), **params}


def define_summary(loggers, monitor: str, mode: str = "max") -> None:
    """The summary of ``monitor`` (the optimised validation metric) is its best value (``<monitor>.max``), not
    the last epoch's; the test metrics, logged once, are those of the selected checkpoint."""
    for run in wandb_runs(loggers):
        run.define_metric(monitor, summary=mode)


def log_best(loggers, metrics: dict, monitor: str, epoch: int | None) -> None:
    """The summary's ``best/epoch``, ``best/<monitor>`` and ``best/test/...``: the selected epoch, its validation
    value and the test metrics of its checkpoint, side by side for the dashboard's runs table."""
    best = {f"best/{k}": v for k, v in metrics.items() if k == monitor or k.startswith("test/")}
    for run in wandb_runs(loggers):
        run.summary.update({"best/epoch": epoch, **best})


def log_hyperparameters(loggers, cfg: DictConfig, params: dict) -> None:
    """Every logger gets the config and parameter counts (wandb: the run's config; CSV: hparams.yaml)."""
    if not loggers:
        return
    hp = hyperparameters(cfg, params)
    for lg in loggers:
        lg.log_hyperparams(hp)


def artifact_name(manifest: dict) -> str:
    """A store adapter's artifact name: ``<collection>-<backbone>-<name>`` in wandb's alphabet."""
    collection = (manifest.get("data") or {}).get("collection") or "custom"
    raw = f"{collection}-{manifest.get('backbone', 'backbone')}-{manifest.get('name', 'adapter')}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", raw)


def log_adapter(loggers, folder: str | Path) -> list[str]:
    """Log the adapter folder (peft files, head, manifest) as a model artifact; returns the names."""
    import json

    import wandb

    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    names = []
    for run in wandb_runs(loggers):
        art = wandb.Artifact(artifact_name(manifest), type="model", metadata=manifest,
                             description=f"{manifest.get('method', '')} adapter {manifest.get('name', '')}")
        art.add_dir(str(folder))
        run.log_artifact(art, aliases=["latest", f"seed{manifest.get('seed', 0)}"])
        names.append(art.name)
    return names


def use_adapters(loggers, folders: list[str | Path]) -> list[str]:
    """Declare the store adapters a run read as its inputs; returns their artifact names."""
    import json

    names = []
    for f in dict.fromkeys(Path(f) for f in folders):
        manifest_file = f / "manifest.json"
        if manifest_file.is_file():
            names.append(artifact_name(json.loads(manifest_file.read_text())))
    if not names:
        return names
    for run in wandb_runs(loggers):
        run.config.update({"lineage/inputs": names}, allow_val_change=True)
        if run.settings._offline:
            log.info("wandb offline: inputs %s kept in the config (use_artifact needs a server)", names)
            continue
        for name in names:
            try:
                run.use_artifact(f"{name}:latest", type="model")
            except Exception as e:  # noqa: BLE001 - an adapter trained without wandb has no artifact
                log.warning("wandb: could not use artifact %s (%s): was its run logged to wandb?", name, e)
    return names


def log_results(loggers, metrics: dict, split: str = "test", keys: tuple[str, ...] = ()) -> None:
    """The results table (one row a model/reference ranker, one column a metric) as a ``wandb.Table``."""
    import wandb

    rows = []
    for row in ROWS:
        prefix = f"{split}/" if row == "model" else f"{row}/{split}/"
        if f"{prefix}hr@1" in metrics:
            rows.append([row, *[metrics.get(prefix + k) for k in keys]])
    for run in wandb_runs(loggers):
        run.log({"results": wandb.Table(columns=["row", *keys], data=rows)})


class RankWriter(Callback):
    """Writes each evaluation's per-user ranks into ``<folder>/ranks.csv.gz`` (``recsys.evaluation.ranks.record``);
    a trainer without it writes none, and so does ``folder=None``."""

    def __init__(self, folder: str | Path | None):
        self.folder = None if folder is None else Path(folder)

    def on_validation_end(self, trainer, pl_module) -> None:
        ranks.record(pl_module, "val", self.folder)

    def on_test_end(self, trainer, pl_module) -> None:
        ranks.record(pl_module, "test", self.folder)
