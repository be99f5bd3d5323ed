"""Ranking metrics over candidate lists, as torchmetrics ``Metric``s, and the two reference rankers.

Ties count against the model: the target's rank is the number of *other* candidates whose score is
greater than or equal to the target's, so a constant scorer gets HR@1 = 0 (never 1), and a NaN
target score ranks last.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric

KS = (1, 3, 5, 10)
REPORT_KEYS = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr")  # the results tables' metrics (every report)
PAPER_KEYS = ("ndcg@1", "ndcg@3", "ndcg@5", "mrr")  # the paper protocol's table (WeaveRec's metrics)


def target_rank(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based pessimistic rank of the target.

    Args:
        scores: (B, C) candidate scores.
        target: (B,) position of the true item among the C candidates.
    Returns:
        (B,) long: how many other candidates score >= the target.
    """
    scores = scores.float()
    t = scores.gather(1, target.long().view(-1, 1))  # (B, 1)
    ge = (scores >= t) | torch.isnan(scores)  # a NaN candidate is never below the target
    rank = ge.sum(dim=1) - 1  # minus the target itself (t >= t), unless t is NaN
    nan_target = torch.isnan(t.squeeze(1))
    return torch.where(nan_target, torch.full_like(rank, scores.size(1) - 1), rank)


def eval_ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) float 0-based pessimistic ranks (``target_rank``); ``inf`` where ``target`` is -1 (the true
    item is not among the candidates, e.g. missed by a retriever: a miss at every k)."""
    missing = target < 0
    rank = target_rank(scores, target.clamp(min=0)).double()
    return torch.where(missing.to(rank.device), torch.full_like(rank, torch.inf), rank)


class RankingMetrics(Metric):
    """HR@k and NDCG@k for k in ``ks`` and MRR, averaged over examples and synchronised across processes.

    ``update(scores (B, C), target (B,))``; ``compute()`` returns ``{"hr@1": ..., "ndcg@10": ..., "mrr": ...}``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: tuple[int, ...] = KS, **kwargs):
        super().__init__(**kwargs)
        self.ks = tuple(ks)
        for k in self.ks:
            self.add_state(f"hr_{k}", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"ndcg_{k}", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("mrr", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        """``target`` -1: the true item is not a candidate (rank ``inf``, 0 on every metric)."""
        self._accumulate(eval_ranks(scores, target))

    def _accumulate(self, rank: torch.Tensor) -> None:
        """Add (B,) 0-based float ranks; ``inf`` (the true item not ranked at all) scores 0 everywhere."""
        gain = 1.0 / torch.log2(rank + 2.0)
        for k in self.ks:
            hit = rank < k
            setattr(self, f"hr_{k}", getattr(self, f"hr_{k}") + hit.sum())
            setattr(self, f"ndcg_{k}", getattr(self, f"ndcg_{k}") + (gain * hit).sum())
        self.mrr = self.mrr + (1.0 / (rank + 1.0)).sum()
        self.count = self.count + rank.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.count.clamp(min=1).double()
        out = {}
        for k in self.ks:
            out[f"hr@{k}"] = (getattr(self, f"hr_{k}") / n).float()
            out[f"ndcg@{k}"] = (getattr(self, f"ndcg_{k}") / n).float()
        out["mrr"] = (self.mrr / n).float()
        return out


def reference_scores(candidates: np.ndarray, item_counts: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """(N, C) scores of the random (seeded) and popularity (training counts) rankers on candidate lists."""
    rng = np.random.default_rng(seed)
    return {"random": rng.random(candidates.shape),
            "popularity": np.asarray(item_counts, dtype=np.float64)[candidates]}


def reference_metrics(
    candidates: np.ndarray, target: np.ndarray, item_counts: np.ndarray, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Scores of the two trivial rankers on fixed candidate lists.

    Args:
        candidates: (N, C) item indices.
        target: (N,) position of the true item.
        item_counts: (num_items,) training-split counts (popularity).
        seed: seed of the random ranker.
    Returns:
        ``{"random": {...}, "popularity": {...}}``, each a metrics dict as ``RankingMetrics`` computes.
    """
    tgt = torch.as_tensor(target)
    out = {}
    for name, scores in reference_scores(candidates, item_counts, seed).items():
        m = RankingMetrics()
        m.update(torch.as_tensor(scores), tgt)
        out[name] = {k: float(v) for k, v in m.compute().items()}
    return out


class GenerationMetrics(RankingMetrics):
    """The paper protocol's metrics from generated answers: NDCG@k and HR@k for k in ``ks`` and MRR@max(ks).

    ``update(rank (B,), matched, segments)`` with ``rank`` the 1-based position of the true title in
    the generated answer (0: not generated, which scores 0 on every metric, as in the released
    evaluation); ``compute()`` adds ``valid``, the share of generated titles that are candidates.
    """

    def __init__(self, ks: tuple[int, ...] = (1, 3, 5), **kwargs):
        super().__init__(ks, **kwargs)
        for name in ("matched", "segments"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, rank: torch.Tensor, matched: int = 0, segments: int = 0) -> None:
        rank = rank.to(self.mrr.device).double()
        # 0-based; not generated, or beyond the largest k: never ranked (so MRR is MRR@5, as released)
        self._accumulate(torch.where((rank > 0) & (rank <= max(self.ks)), rank - 1.0, torch.inf))
        self.matched = self.matched + matched
        self.segments = self.segments + segments

    def compute(self) -> dict[str, torch.Tensor]:
        out = super().compute()
        out["valid"] = (self.matched / self.segments.clamp(min=1)).float()
        return out


class ChanceCheck:
    """Flags training that stays at chance: a collapsed run (the scores of a user's candidates nearly
    equal) has a softmax loss of ln C, C the candidates per example, however long it trains.

    ``update(stream, loss, num_candidates)`` after warm-up, one call a step and stream (WeaveRec's
    branches are streams); ``report()`` gives, per stream, the mean loss after warm-up, ln C and
    ``collapsed`` (1.0 when that mean is within ``tol`` of ln C, relatively). Plain state, so that a
    checkpoint carries it across a restart.
    """

    def __init__(self, tol: float = 0.01):
        self.tol = tol
        self.state: dict[str, list[float]] = {}  # stream -> [sum of losses, steps, C]

    def update(self, stream: str, loss: torch.Tensor | float, num_candidates: int) -> None:
        s = self.state.setdefault(stream, [0.0, 0, num_candidates])
        s[0], s[1] = s[0] + loss, s[1] + 1  # a tensor sum: no device sync a step

    def report(self) -> dict[str, dict[str, float]]:
        out = {}
        for stream, (total, steps, c) in self.state.items():
            if steps:
                mean, chance = float(total) / steps, float(np.log(c))
                out[stream] = {"loss_after_warmup": mean, "chance_loss": chance,
                               "collapsed": float(abs(mean - chance) <= self.tol * chance)}
        return out
