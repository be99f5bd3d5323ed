"""Sweeps (``train.py -m``, any launcher: basic, submitit local or SLURM) and searches (Optuna).

- :class:`FailedJobs`, a Hydra callback (``conf/hydra/default.yaml``): a failed job never stops the others
  (``recsys.pipeline.run.guarded`` writes its ``failed.json`` and the sweep goes on); once every job has
  returned it prints one line a failed job (folder, error) and exits 1, so a sweep that lost jobs does not
  look like success.
- A search's trials export their adapters into their own folder (``<trial>/trial_store``, :func:`trial_store`),
  not the store: the last trial would otherwise overwrite the better ones. At the end of the search
  (:func:`keep_best_trial`) the store gets the adapters of the best trial by the optimised (validation)
  metric, with ``trial``, ``trial_metric`` and ``trial_value`` in their manifests.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from recsys.core.files import write_json
from recsys.models.adapter_store import AdapterStore

log = logging.getLogger("recsys")

TRIAL_STORE = "trial_store"  # <trial folder>/trial_store: the adapters a search trial exported
TRIAL = "trial.json"  # <trial folder>/trial.json: the store it stands for, the metric and its value


def in_search() -> bool:
    """Whether this job is a trial of a search (a multirun whose sweeper is not Hydra's basic one, e.g. Optuna)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hc = HydraConfig.get()
    except ValueError:
        return False
    return hc.mode == RunMode.MULTIRUN and not str(hc.sweeper.get("_target_", "")).endswith("BasicSweeper")


def trial_store(out_dir: Path, store: AdapterStore, metric: str, value: float) -> AdapterStore:
    """The store a search trial exports into (``<out_dir>/trial_store``); ``trial.json`` records the real store
    and the trial's value of the optimised metric, for :func:`keep_best_trial`."""
    write_json(out_dir / TRIAL, {"store": str(store.root), "metric": metric, "value": value})
    return AdapterStore(out_dir / TRIAL_STORE, seed=store.seed, data=store.data, settings=store.settings,
                        monitor=store.monitor, force=True)  # the trial's own folder: its one export always lands


def keep_best_trial(sweep_dir: Path, direction: str) -> Path | None:
    """Copy the adapters of the best trial (``direction``: maximize | minimize its ``trial.json`` value) into
    the store it stands for, with the trial and value in each manifest; returns the trial folder (None: no
    trial exported)."""
    trials = []
    for info in sorted(Path(sweep_dir).glob(f"**/{TRIAL}")):
        record = json.loads(info.read_text())
        if isinstance(record.get("value"), (int, float)) and not math.isnan(record["value"]):
            trials.append((info.parent, record))
    if not trials:
        return None
    sign = -1.0 if direction == "minimize" else 1.0
    job, record = max(trials, key=lambda t: sign * t[1]["value"])
    for link in sorted((job / TRIAL_STORE).glob("*/*/seed-*")):
        folder = AdapterStore(record["store"], seed=int(link.name.split("-", 1)[1])).adopt(
            link.resolve(), trial=job.name, trial_metric=record["metric"], trial_value=record["value"])
        log.info("search %s: the store keeps trial %s's adapter (%s = %.4f): %s", sweep_dir, job.name,
                 record["metric"], record["value"], folder)
    return job


def failed_jobs(sweep_dir: str | Path) -> list[tuple[Path, str]]:
    """``(job folder, error)`` of each job of the sweep that failed: its ``failed.json`` (unless a later start of
    the job, the same sweep command again, finished: a newer ``metrics.json``), or no ``metrics.json`` (a job
    that died before writing either, e.g. killed, or a DDP rank lost)."""
    out = []
    for hydra_dir in sorted(Path(sweep_dir).glob("**/.hydra")):
        job = hydra_dir.parent
        failed, metrics = job / "failed.json", job / "metrics.json"
        if failed.is_file() and not (metrics.is_file() and metrics.stat().st_mtime > failed.stat().st_mtime):
            try:
                error = json.loads(failed.read_text()).get("error", "")
            except ValueError:
                error = "failed.json unreadable"
            out.append((job, error.splitlines()[0] if error else "failed"))
        elif not metrics.is_file():
            out.append((job, "no metrics.json: the job ended without finishing (see its log)"))
    return out


class FailedJobs(Callback):
    """After the last job of a multirun: a search's best trial's adapters into the store
    (:func:`keep_best_trial`), then one line a failed job (folder, error) on stderr and exit 1 if any."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        direction = config.hydra.sweeper.get("direction")
        if isinstance(direction, str):  # a search of one objective: the store gets its best trial's adapters
            keep_best_trial(sweep_dir, direction)
        failed = failed_jobs(sweep_dir)
        if not failed:
            return
        print(f"sweep {sweep_dir}: {len(failed)} job(s) failed", file=sys.stderr)
        for job, error in failed:
            print(f"  {job}: {error}", file=sys.stderr)
        raise SystemExit(1)
