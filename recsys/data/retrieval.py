"""Retrieved candidates for two-stage recommendation (``data.candidates=retrieved``).

A retriever run (a method that scores the whole catalogue, e.g. ``method=sasrec``, trained with
``eval.candidates=full``) stores each user's top K items for val and test in its run folder
(``retrieved.npz``, ``recsys.catalogue``). A re-ranking run (``data.retriever=<that folder>``) takes
those K items as the candidate list of each user: the target may be absent, which counts as a miss
at every k (its position is -1); when present, the method ranks it among the K. The list order is
shuffled by a stable seed of (domain, user, split), so a re-ranker cannot read the retriever's order;
everything is deterministic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recsys.data.candidates import stable_seed
from recsys.data.domain import DataError, Domain, Example

RETRIEVED = "retrieved.npz"  # written by recsys.catalogue.evaluate


def load_retrieved(folder: str | Path, domain: Domain, split: str) -> dict[str, list[str]]:
    """``{external user id: [external item ids, best first]}`` of ``split`` from a retriever run folder."""
    path = Path(folder) / RETRIEVED
    if not path.is_file():
        raise DataError(f"data.retriever={folder}: no {RETRIEVED} there. Train a retriever first, e.g. "
                        f"python train.py method=sasrec data.target={domain.name} (it stores its top K with "
                        "eval.candidates=full), and point data.retriever at its run folder")
    with np.load(path, allow_pickle=False) as z:
        stored = str(z["domain"])
        if stored != domain.name:
            raise DataError(f"data.retriever={folder} retrieved for domain {stored!r}, not {domain.name!r}")
        if f"{split}/users" not in z:
            raise DataError(f"data.retriever={folder} stored no {split} candidates")
        users, items = z[f"{split}/users"].tolist(), z[f"{split}/items"]
    return {u: items[n].tolist() for n, u in enumerate(users)}


def retrieved_candidates(domain: Domain, examples: list[Example], split: str, folder: str | Path,
                         k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The retriever's top ``k`` (None: all it stored) as each example's candidates.

    Returns:
        candidates (N, k) item indices (shuffled by a stable seed) and target (N,) the target's position,
        -1 where the retriever missed it.
    """
    top = load_retrieved(folder, domain, split)
    if k is None:
        k = min((len(v) for v in top.values()), default=0)
    index = {iid: i for i, iid in enumerate(domain.item_ids)}
    cands = np.empty((len(examples), k), dtype=np.int64)
    target = np.empty(len(examples), dtype=np.int64)
    for n, ex in enumerate(examples):
        uid = domain.user_ids[ex.user]
        if uid not in top:
            raise DataError(f"data.retriever={folder} has no {split} candidates for user {uid!r}: the retriever must "
                            "evaluate every user this run evaluates (train it with data.max_eval_users=null)")
        items = top[uid]
        if len(items) < k:
            raise DataError(f"data.retrieve_k={k} but the retriever stored {len(items)} items a user "
                            f"(its eval.retrieve_k): lower data.retrieve_k or retrain the retriever")
        row = [index[i] for i in items[:k]]
        order = np.random.default_rng(stable_seed(domain.name, uid, split, "retrieved")).permutation(k)
        row = [row[j] for j in order]
        cands[n] = row
        target[n] = row.index(ex.target) if ex.target in row else -1
    return cands, target


def recall(target: np.ndarray) -> float:
    """Share of examples whose target the retriever found (position >= 0)."""
    return float(np.mean(np.asarray(target) >= 0)) if len(target) else float("nan")
