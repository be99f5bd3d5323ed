"""The end of a sweep (``train.py -m``, any launcher: basic, submitit local or SLURM, an Optuna search):
one line a failed job and a non-zero exit when any failed.

A failed job never stops the others (``recsys.pipeline.run.guarded`` writes its ``failed.json`` and the
sweep goes on); :class:`FailedJobs`, a Hydra callback (``conf/hydra/default.yaml``), reads the job folders
once every job has returned and says which failed, so a sweep that lost jobs does not look like success.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def failed_jobs(sweep_dir: str | Path) -> list[tuple[Path, str]]:
    """``(job folder, error)`` of each job of the sweep that failed: its ``failed.json``, or no ``metrics.json``
    (a job that died before writing either, e.g. killed, or a DDP rank lost)."""
    out = []
    for hydra_dir in sorted(Path(sweep_dir).glob("**/.hydra")):
        job = hydra_dir.parent
        failed = job / "failed.json"
        if failed.is_file():
            try:
                error = json.loads(failed.read_text()).get("error", "")
            except ValueError:
                error = "failed.json unreadable"
            out.append((job, error.splitlines()[0] if error else "failed"))
        elif not (job / "metrics.json").is_file():
            out.append((job, "no metrics.json: the job ended without finishing (see its log)"))
    return out


class FailedJobs(Callback):
    """After the last job of a multirun: one line a failed job (folder, error) on stderr, then exit 1."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        failed = failed_jobs(sweep_dir)
        if not failed:
            return
        print(f"sweep {sweep_dir}: {len(failed)} job(s) failed", file=sys.stderr)
        for job, error in failed:
            print(f"  {job}: {error}", file=sys.stderr)
        raise SystemExit(1)
