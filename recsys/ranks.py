"""Per-user ranks of the target: ``ranks.csv.gz`` in the run folder, so that two runs on the same
candidates can be compared user by user (``recsys.stats``, ``recsys.report``).

One row a (split, user): ``domain``, ``user`` (external id), ``split`` (``val``, ``test``,
``zero_shot/test``, ``test/full``...), ``target`` (external item id), ``rank`` (1-based: 1 is the
top; empty when the target is not among the candidates, e.g. missed by a retriever) and
``n_candidates``. The file is rewritten after each evaluation; the rows of a split are replaced by
its latest evaluation, except validation during training, whose rows are those of the best epoch so
far (the epoch model selection keeps).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

FILE = "ranks.csv.gz"
COLUMNS = ("domain", "user", "split", "target", "rank", "n_candidates")


class RankLog:
    """0-based ranks (float, ``inf``: target not a candidate) and candidate counts of one evaluation,
    per stage, in the order the (unshuffled) evaluation loader yields the examples."""

    def __init__(self):
        self.buf: dict[str, list[tuple[torch.Tensor, int]]] = {}

    def add(self, stage: str, ranks: torch.Tensor, num_candidates: int) -> None:
        self.buf.setdefault(stage, []).append((ranks.detach().double().cpu(), int(num_candidates)))

    def take(self, stage: str) -> tuple[np.ndarray, np.ndarray]:
        """(ranks, n_candidates) of this process, emptied."""
        parts = self.buf.pop(stage, [])
        if not parts:
            return np.zeros(0), np.zeros(0, dtype=np.int64)
        ranks = torch.cat([r for r, _ in parts]).numpy()
        counts = np.concatenate([np.full(len(r), c, dtype=np.int64) for r, c in parts])
        return ranks, counts


def gather(ranks: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every process's ranks in dataset order (the evaluation sampler gives rank r the indices r::world)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return ranks, counts
    world = torch.distributed.get_world_size()
    if world == 1:
        return ranks, counts
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, (ranks, counts))
    n = sum(len(p[0]) for p in parts)
    out_r, out_c = np.empty(n), np.empty(n, dtype=np.int64)
    for r, (pr, pc) in enumerate(parts):
        out_r[r::world], out_c[r::world] = pr, pc
    return out_r, out_c


def frame(domain, examples, ranks: np.ndarray, counts: np.ndarray, split: str) -> pd.DataFrame:
    """The rows of one evaluation: ``examples`` (``Example``s of ``domain``) with their 0-based ranks."""
    if len(examples) < len(ranks):
        raise ValueError(f"{len(ranks)} ranks for {len(examples)} examples of {split}")
    examples = examples[: len(ranks)]  # trainer.limit_*_batches: the loader's first examples
    rank = np.where(np.isfinite(ranks), ranks + 1, np.nan)
    return pd.DataFrame({
        "domain": domain.name, "user": [domain.user_ids[e.user] for e in examples], "split": split,
        "target": [domain.item_ids[e.target] for e in examples],
        "rank": pd.array([None if math.isnan(r) else int(r) for r in rank], dtype="Int64"), "n_candidates": counts,
    })


def write(folder: str | Path, rows: pd.DataFrame) -> Path:
    """Replace the rows of ``rows``' splits in ``<folder>/ranks.csv.gz`` (created when missing)."""
    path = Path(folder) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        old = read(path)
        rows = pd.concat([old[~old["split"].isin(set(rows["split"]))], rows], ignore_index=True)
    rows.to_csv(path, index=False, compression="gzip")
    return path


def read(path: str | Path) -> pd.DataFrame:
    """A ranks file (or a run folder holding one), ``rank`` as nullable integers."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    df = pd.read_csv(path, dtype={"user": str, "target": str, "domain": str, "split": str})
    df["rank"] = df["rank"].astype("Int64")
    return df


def ndcg(rank, k: int = 10) -> np.ndarray:
    """Per-row NDCG@k of a single relevant item from 1-based ranks (missing: 0)."""
    r = pd.array(rank, dtype="Int64").to_numpy(dtype=float, na_value=np.inf)
    return np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)


def record(module, stage: str) -> None:
    """After an evaluation epoch of ``module`` (a ``RecModule``): write its ranks when it has a
    ``ranks_dir`` (set by the pipeline). Validation during fit writes only an epoch that improves the
    monitored metric (the first best, as model selection)."""
    ranks, counts = gather(*module.rank_log.take(stage))
    folder = getattr(module, "ranks_dir", None)
    trainer = module.trainer
    if folder is None or not trainer.is_global_zero or getattr(trainer, "sanity_checking", False):
        return
    split = module.prefix[stage]
    if stage == "val" and trainer.state.fn == "fit":
        history = module.val_history
        now = history.get(module.current_epoch, {}).get(module.monitor, -math.inf)
        before = [v.get(module.monitor, -math.inf) for e, v in history.items() if e != module.current_epoch]
        if before and now <= max(before):
            return
    dm = trainer.datamodule
    ds = dm.eval_sets["val" if stage == "val" else "test"]
    write(folder, frame(dm.domains[dm.target], ds.examples, ranks, counts, split))
