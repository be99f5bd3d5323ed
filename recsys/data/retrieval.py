"""Retrieved candidates for two-stage recommendation (``data.candidates=retrieved``).

A retriever run (a method that scores the whole catalogue, e.g. ``method=sasrec``, trained with
``eval.candidates=full``) stores each user's top K items for val and test in its run folder
(``retrieved.npz``, ``recsys.evaluation.catalogue``). A re-ranking run (``data.retriever=<that folder>``) takes
those K items as the candidate list of each user: the target may be absent, which counts as a miss
at every k (its position is -1); when present, the method ranks it among the K. The list order is
shuffled by a stable seed of (domain, user, split), so a re-ranker cannot read the retriever's order;
everything is deterministic.

The same top K can supply hard training negatives (``data.train_negatives=retrieved``, as two-stage LLM
re-rankers are commonly trained): :class:`RetrievedNegatives` draws each training example's negatives
from the retriever's top K of the user's validation split (the ranking computed from the training
part of the sequence, which that ranking excludes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recsys.data.candidates import NegativeSampler, stable_seed
from recsys.data.domain import DataError, Domain, Example

RETRIEVED = "retrieved.npz"  # written by recsys.evaluation.catalogue.evaluate


def _read_retrieved(path: Path, folder, domain: Domain, split: str, history_only: bool):
    """The users and item lists of ``split`` in a retrieved.npz (DataError: another domain or split)."""
    with np.load(path, allow_pickle=False) as z:
        stored = str(z["domain"])
        if stored != domain.name:
            raise DataError(f"data.retriever={folder} retrieved for domain {stored!r}, not {domain.name!r}")
        if f"{split}/users" not in z:
            raise DataError(f"data.retriever={folder} stored no {split} candidates")
        if history_only and (str(z["excludes"]) if "excludes" in z else "sequence") != "history":
            raise DataError(f"data.retriever={folder}: its {RETRIEVED} was stored before rankings excluded only the "
                            "history items (its val lists leave out the test target, which would mark that item for "
                            "hard negatives): store it again, python evaluate.py run_dir=<the retriever run> split=val "
                            "eval.candidates=full, and point data.retriever at that evaluation's folder")
        return z[f"{split}/users"].tolist(), z[f"{split}/items"]


def load_retrieved(folder: str | Path, domain: Domain, split: str, history_only: bool = False) -> dict[str, list[str]]:
    """``{external user id: [external item ids, best first]}`` of ``split`` from a retriever run folder;
    ``history_only``: the lists must exclude only the items before the target (files from before the
    catalogue ranking did so excluded the user's whole sequence)."""
    path = Path(folder) / RETRIEVED
    if not path.is_file():
        raise DataError(f"data.retriever={folder}: no {RETRIEVED} there. Train a retriever first, e.g. "
                        f"python train.py method=sasrec data.target={domain.name} (it stores its top K with "
                        "eval.candidates=full), and point data.retriever at its run folder")
    try:
        users, items = _read_retrieved(path, folder, domain, split, history_only)
    except DataError:
        raise
    except Exception as e:  # not a zip, a member cut short, a missing array, an object array: not what catalogue wrote
        raise DataError(f"data.retriever={folder}: {path} is not a readable {RETRIEVED} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'malformed'}); store it again with python evaluate.py "
                        "run_dir=<the retriever run> eval.candidates=full, and point data.retriever at that folder") from None
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


class RetrievedNegatives(NegativeSampler):
    """Hard training negatives (``data.train_negatives=retrieved``): ``k`` items drawn without replacement
    from the retriever's top K of the user's val split (ranked from the training part of the sequence,
    which it excludes), topped up by the ``sampling`` draw when fewer remain.

    The pool keeps the user's later items (the val and test targets) when the retriever ranked them:
    at training time they are not known, and leaving them out of a 20-item pool would mark the one
    test candidate never trained as a negative. (Uniform draws exclude the whole sequence, as the
    evaluation negatives do; from 10^4 items that exclusion tells nothing.)

    Args:
        domain: the target domain (the retriever's).
        folder: the retriever run folder; it must have ranked every user of the domain.
        sampling: how a short pool is topped up (``data.candidate_sampling``).
    """

    def __init__(self, domain: Domain, folder: str | Path, sampling: str = "uniform"):
        super().__init__(domain, sampling)
        top = load_retrieved(folder, domain, "val", history_only=True)
        missing = [uid for uid in domain.user_ids if uid not in top]
        if missing:
            raise DataError(f"data.train_negatives=retrieved: data.retriever={folder} ranked no val candidates for "
                            f"{len(missing)} users of {domain.name!r} (e.g. {missing[0]!r}): train the retriever "
                            "with data.max_eval_users=null so that it ranks every user")
        index = {iid: i for i, iid in enumerate(domain.item_ids)}
        self.pools = [np.asarray([index[i] for i in top[uid]], dtype=np.int64) for uid in domain.user_ids]

    def sample(self, user: int, k: int, rng: np.random.Generator, also: list[int] = ()) -> list[int]:
        pool = self.pools[user]
        if len(also):  # the example's own target (in the pool when it is the val target)
            pool = pool[~np.isin(pool, list(also))]
        hard = pool[rng.permutation(len(pool))[:k]].tolist()
        return hard + super().sample(user, k - len(hard), rng, also=[*also, *hard])
