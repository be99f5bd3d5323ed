"""Candidate lists: fixed evaluation candidates and fresh training negatives.

Evaluation candidates are the target plus ``num_negatives`` items drawn from the domain's
catalogue, never an item of the user's own sequence. They depend only on (domain, user, split,
seed), through a stable hash, so every method, every run and every process sees the same lists.
The candidate order is shuffled and the target's position recorded.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from recsys.data.domain import DataError, Domain, Example

SAMPLING = ("uniform", "popularity")


def stable_seed(*parts) -> int:
    """A seed from strings/ints that is the same in every process (Python's ``hash`` is not)."""
    return zlib.crc32("|".join(map(str, parts)).encode())


@dataclass
class NegativeSampler:
    """Draws negatives for one domain, excluding each user's items.

    Args:
        domain: the domain whose catalogue is sampled.
        sampling: ``"uniform"`` or ``"popularity"`` (proportional to training counts + 1).
    """

    domain: Domain
    sampling: str = "uniform"

    def __post_init__(self):
        if self.sampling not in SAMPLING:
            raise DataError(f"data.candidate_sampling={self.sampling!r} is unknown: use one of {SAMPLING}")
        self.user_items = [frozenset(s) for s in self.domain.sequences]
        self.prob = None
        if self.sampling == "popularity":
            w = np.asarray(self.domain.train_item_counts(), dtype=np.float64) + 1.0
            self.prob = w / w.sum()
        self.max_user_items = max((len(s) for s in self.user_items), default=0)

    def sample(self, user: int, k: int, rng: np.random.Generator, also: list[int] = ()) -> list[int]:
        """``k`` distinct items outside the user's sequence (and outside ``also``)."""
        exclude = self.user_items[user].union(also)
        n = self.domain.num_items
        if n - len(exclude) < k:
            raise DataError(
                f"domain {self.domain.name!r} has {n} items; user {self.domain.user_ids[user]!r} has "
                f"{len(exclude)}, leaving fewer than {k} negatives: lower data.num_negatives"
            )
        out: list[int] = []
        seen = set(exclude)
        while len(out) < k:
            draw = rng.choice(n, size=2 * (k - len(out)) + 4, p=self.prob)
            for i in draw.tolist():
                if i not in seen:
                    seen.add(i)
                    out.append(i)
                    if len(out) == k:
                        break
        return out

    def candidates(self, ex: Example, k: int, rng: np.random.Generator) -> tuple[list[int], int]:
        """Target + ``k`` negatives in shuffled order, and the target's position. The target is never its own
        negative (``also``: a uniform draw excludes the whole sequence anyway; the hard negatives of
        ``RetrievedNegatives`` would not, for a validation target trained under ``data.train_on_val``)."""
        items = [ex.target] + self.sample(ex.user, k, rng, also=[ex.target])
        order = rng.permutation(len(items))
        return [items[j] for j in order], int(np.flatnonzero(order == 0)[0])


def eval_candidates(
    domain: Domain, examples: list[Example], split: str, num_negatives: int = 19, seed: int = 0,
    sampling: str = "uniform",
) -> tuple[np.ndarray, np.ndarray]:
    """Fixed candidates for the val/test examples of one domain.

    Returns:
        candidates (N, 1 + num_negatives) item indices and target (N,) positions.
    """
    sampler = NegativeSampler(domain, sampling)
    cands = np.empty((len(examples), num_negatives + 1), dtype=np.int64)
    target = np.empty(len(examples), dtype=np.int64)
    for n, ex in enumerate(examples):
        rng = np.random.default_rng(stable_seed(domain.name, domain.user_ids[ex.user], split, seed, sampling))
        c, t = sampler.candidates(ex, num_negatives, rng)
        cands[n], target[n] = c, t
    return cands, target
