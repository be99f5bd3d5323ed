"""Ranking against the whole catalogue (``eval.candidates=full``), and the retriever's stored top K.

For methods that score every item cheaply (``score_all``: SASRec) and the popularity and random
rankers: each val/test target is ranked against every item of the target domain's catalogue except
the user's history items, those before the target in the sequence (the target itself is kept; a
later item is not excluded: a val ranking may hold the test target, unknown at that point), ties
against the model (``recsys.core.metrics.target_rank``). Metrics go to metrics.json as
``<split>/full/<metric>`` (the method) and ``<ranker>/<split>/full/<metric>`` (popularity, random),
beside the sampled ``<split>/<metric>``; the method's ranks go to ranks.csv.gz (split ``<split>/full``).

A method that scores the catalogue also stores its top K a user and split (``retrieved.npz`` in the
run folder: external user and item ids, best first, history items excluded, ties broken by item
index): the candidates of a two-stage run (``data.candidates=retrieved``, ``recsys.data.retrieval``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from recsys.evaluation import ranks as rank_files
from recsys.data.candidates import stable_seed
from recsys.data.ids import IdCollator
from recsys.core.files import write_with
from recsys.core.metrics import KS, target_rank

log = logging.getLogger("recsys")

RETRIEVED = "retrieved.npz"
LATER = {"val": 2, "test": 1}  # a split's target sits this many items from the end of the sequence
EXCLUDES = "history"  # retrieved.npz's "excludes": the ranking excluded only the items before the target


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    """``RankingMetrics`` of (N,) 0-based float ranks (``inf``: never ranked)."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        return {}
    gain = 1.0 / np.log2(r + 2.0)
    out = {}
    for k in KS:
        out[f"hr@{k}"], out[f"ndcg@{k}"] = float(np.mean(r < k)), float(np.mean(np.where(r < k, gain, 0.0)))
    out["mrr"] = float(np.mean(1.0 / (r + 1.0)))
    return out


def rank_catalogue(score_fn, domain, examples, max_len: int, batch_size: int = 256, k: int = 0,
                   split: str = "test"):
    """Rank each example's target against the catalogue, the user's history items excluded: every item
    before the target in the sequence (not only the ``max_len`` shown), never the target itself, and never
    a later item (a val ranking may hold the test target: it is not known yet).

    Args:
        score_fn: ``(history (B, L) long, ids layout of recsys.data.ids, rows: slice) -> (B, N)`` scores.
        domain: the target ``Domain``; ``examples``: its ``split`` (val or test) ``Example``s.
        k: also return each user's top ``k`` item indices (0: none).
    Returns:
        (N,) float 0-based ranks and (N, k) long top-k item indices (or None).
    """
    collate = IdCollator(max_len)
    later = LATER[split]
    out_ranks, out_top = [], []
    for s in range(0, len(examples), batch_size):
        exs = examples[s : s + batch_size]
        hist = collate([(domain.name, e.history, [e.target], 0) for e in exs])["history"]
        with torch.no_grad():
            scores = score_fn(hist, slice(s, s + len(exs))).detach().float().cpu().clone()
        for b, e in enumerate(exs):
            seq = domain.sequences[e.user]
            excl = [i for i in set(seq[: len(seq) - later]) if i != e.target]
            scores[b, excl] = -torch.inf
        target = torch.tensor([e.target for e in exs])
        out_ranks.append(target_rank(scores, target).double().numpy())
        if k:
            nan = torch.isnan(scores)
            order = torch.sort(torch.where(nan, -torch.inf, scores), dim=1, descending=True, stable=True).indices
            out_top.append(order[:, :k].numpy())
    n = len(examples)
    ranks = np.concatenate(out_ranks) if out_ranks else np.zeros(0)
    top = (np.concatenate(out_top) if out_top else np.zeros((0, k), dtype=np.int64)) if k else None
    assert len(ranks) == n
    return ranks, top


def reference_scorers(dm, split: str, seed: int) -> dict:
    """The popularity (training counts) and random (seeded a split and batch) catalogue scorers."""
    counts = torch.as_tensor(np.asarray(dm.domains[dm.target].train_item_counts(), dtype=np.float64))

    def popularity(hist, rows):
        return counts.expand(hist.size(0), -1)

    def random(hist, rows):
        rng = np.random.default_rng(stable_seed("full_random", dm.target, split, seed, rows.start))
        return torch.as_tensor(rng.random((hist.size(0), len(counts))))

    return {"popularity": popularity, "random": random}


def model_scorer(module):
    """The method's catalogue scorer (``module.score_all``), or None when it has none."""
    if not callable(getattr(module, "score_all", None)):
        return None
    device = next(module.parameters()).device

    def score(hist, rows):
        return module.score_all(hist.to(device))

    return score


def evaluate(module, dm, out_dir: str | Path | None, seed: int, k: int = 20,
             splits: tuple[str, ...] = ("val", "test")) -> dict[str, float]:
    """Full-catalogue metrics of the method (when it can score the catalogue) and of popularity and
    random on ``splits``; writes the method's ranks and its top ``k`` (``retrieved.npz``) to ``out_dir``."""
    domain = dm.domains[dm.target]
    model = model_scorer(module)
    if model is None:
        log.warning("eval.candidates=full: %s cannot score the whole catalogue (no score_all): only the popularity "
                    "and random rows are ranked against it", type(module).__name__)
    metrics: dict[str, float] = {}
    stored: dict[str, np.ndarray] = {}
    was_training = module.training
    module.eval()
    try:
        for split in splits:
            examples = dm.eval_sets[split].examples
            if model is not None:
                ranks, top = rank_catalogue(model, domain, examples, dm.max_history, k=k, split=split)
                metrics.update({f"{split}/full/{m}": v for m, v in metrics_from_ranks(ranks).items()})
                metrics[f"{split}/full/recall@{k}"] = float(np.mean(ranks < k)) if len(ranks) else float("nan")
                if out_dir is not None:
                    rank_files.write(out_dir, rank_files.frame(domain, examples, ranks,
                                                               np.full(len(ranks), domain.num_items), f"{split}/full"))
                item_ids = np.asarray(domain.item_ids)
                stored[f"{split}/users"] = np.asarray([domain.user_ids[e.user] for e in examples])
                stored[f"{split}/items"] = item_ids[top]
            for name, fn in reference_scorers(dm, split, seed).items():
                ranks, _ = rank_catalogue(fn, domain, examples, dm.max_history, split=split)
                metrics.update({f"{name}/{split}/full/{m}": v for m, v in metrics_from_ranks(ranks).items()})
                if out_dir is not None and split == "test":
                    rank_files.write(out_dir, rank_files.frame(domain, examples, ranks,
                                                               np.full(len(ranks), domain.num_items),
                                                               f"{name}/{split}/full"))
    finally:
        module.train(was_training)
    if stored and out_dir is not None:
        def save(tmp: Path) -> None:  # a file object: savez would add ".npz" to the temp name
            with open(tmp, "wb") as f:
                np.savez_compressed(f, domain=np.asarray(domain.name), k=np.asarray(k), excludes=np.asarray(EXCLUDES), **stored)

        write_with(Path(out_dir) / RETRIEVED, save)  # atomically: two-stage runs read it
    return metrics
