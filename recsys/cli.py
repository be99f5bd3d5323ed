"""The installed commands (``pip install .``), each a Hydra app on the configs shipped in the package
(``conf/``), usable from any folder:

    recsys-train [group=option ...] [key=value ...]      # = python train.py
    recsys-evaluate run_dir=<run folder>                 # = python evaluate.py
    recsys-report <sweep folders> --out <folder>         # = python report.py
    recsys-download --category Beauty --year 2014        # = python -m recsys.data.download

A folder of your own configs adds or overrides groups: ``--config-dir <folder>`` (Hydra's flag) or
``RECSYS_CONFIG_DIR=<folder>``; e.g. ``<folder>/backbone/mine.yaml`` is ``backbone=mine``, and
``<folder>/local/slurm.yaml`` holds a cluster's settings for ``hydra/launcher=slurm``.
"""

import hydra
from omegaconf import DictConfig

from recsys import CONFIG_DIR
from recsys.pipeline.run import evaluate as _evaluate
from recsys.pipeline.run import guarded
from recsys.pipeline.run import train as _train


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def train(cfg: DictConfig) -> float:
    """Train one method on one target domain; writes metrics.json and prints the results table."""
    metric, _ = guarded(_train, cfg)
    return metric


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def evaluate(cfg: DictConfig) -> float:
    """Score a trained run, checkpoint or stored adapter on the validation or test split."""
    metric, _ = guarded(_evaluate, cfg)
    return metric


def report() -> None:
    """Results tables and plots from run and sweep folders, or the results page (``--page``), as report.py
    (``report_main`` returns its result: a console script would take it for an exit status)."""
    from recsys.evaluation.studies import report_main

    report_main()
