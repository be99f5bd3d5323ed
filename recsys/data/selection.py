"""Which examples a run trains and is evaluated on: the evaluated users, the selection users of
``train_on_val``, each domain's training examples (target fraction, caps) and the training streams of a mix
(``target``, ``joint``, WeaveRec's ``hybrid``). Every draw is seeded from the run's seed, so every method of a
comparison sees the same examples. ``dm`` is the ``RecDataModule`` whose settings and domains are read.
"""

from __future__ import annotations

import logging

import numpy as np

from recsys.data.candidates import stable_seed
from recsys.data.domain import DataError, Domain, Example

log = logging.getLogger("recsys.data")


def eval_users(dm, d: Domain) -> set[int]:
    """The evaluated users: all, or a seeded subset of ``max_eval_users``, the same for every method."""
    users = list(range(d.num_users))
    if dm.max_eval_users and dm.max_eval_users < len(users):
        rng = np.random.default_rng(stable_seed("eval_users", d.name, dm.seed))
        users = rng.choice(len(users), size=dm.max_eval_users, replace=False).tolist()
    return set(users)


def selection_users(dm, d: Domain) -> set[int]:
    """``train_on_val``: the held-out users whose validation examples select the model (seeded,
    ``selection_share`` of the users, at most ``max_eval_users``); their validation never trains."""
    n = max(1, round(dm.selection_share * d.num_users))
    if dm.max_eval_users:
        n = min(n, dm.max_eval_users)
    rng = np.random.default_rng(stable_seed("selection_users", d.name, dm.seed))
    return set(rng.choice(d.num_users, size=n, replace=False).tolist())


def domain_train(dm, name: str) -> list[tuple[str, Example]]:
    """``name``'s training examples under the data settings (target fraction, train_on_val, caps), seeded."""
    d = dm.domains[name]
    exs = d.examples("train", dm.max_history)
    if name == dm.target and dm.train_on_val:  # the release trains on validation examples too
        exs = exs + [e for e in d.examples("val", dm.max_history) if e.user not in dm.selection_users]
    if name == dm.target and dm.target_fraction < 1.0:
        rng = np.random.default_rng(stable_seed("fraction", name, dm.seed))
        n_keep = max(1, round(dm.target_fraction * d.num_users))
        keep = set(rng.permutation(d.num_users)[:n_keep].tolist())
        exs = [e for e in exs if e.user in keep]
    cap = dm.max_train_examples
    if cap and name == dm.target and dm.cap_scales_with_fraction:
        cap = max(1, round(dm.target_fraction * cap))  # the share of a capped budget (data-efficiency sweeps)
    if cap and len(exs) > cap:
        rng = np.random.default_rng(stable_seed("train_cap", name, dm.seed))
        sel = sorted(rng.choice(len(exs), size=cap, replace=False).tolist())
        exs = [exs[i] for i in sel]
    if not exs:
        raise DataError(f"domain {name!r} has no training example (users need >= 4 items)")
    return [(name, e) for e in exs]


def hybrid_entries(dm, source: str) -> list[tuple[str, Example]]:
    """WeaveRec's hybrid mixture as released: min(cap, |T|) target examples and, independently,
    min(cap, |S|) of ``source`` (50/50 when both domains have at least ``hybrid_cap``)."""
    tgt, src = domain_train(dm, dm.target), domain_train(dm, source)
    n, n_src = min(dm.hybrid_cap, len(tgt)), min(dm.hybrid_cap, len(src))
    if n_src != n:
        log.warning("hybrid %s+%s is not 50/50: %d target and %d source examples (hybrid_cap %d)",
                    dm.target, source, n, n_src, dm.hybrid_cap)
    rng = np.random.default_rng(stable_seed("hybrid", dm.target, source, dm.seed))
    pick = lambda xs, k: [xs[i] for i in sorted(rng.choice(len(xs), size=k, replace=False).tolist())]  # noqa: E731
    return pick(tgt, n) + pick(src, n_src)


def sequence_windows(entries: list[tuple[str, Example]], window: int) -> list[tuple[str, Example]]:
    """A user's prefixes ``window`` apart, from the longest back (``train_examples=sequences``).

    ``entries`` hold each user's examples in order of position (as ``domain_train`` makes them: target
    t = 1, 2, ...). The longest prefix, read causally with the loss at every position, holds the
    transitions of the last ``window`` prefixes; the one ``window`` positions earlier the ones before, and
    so on: together exactly the transitions of every prefix, each once. (With ``data.max_train_examples``
    capping the prefixes, the windows tile the kept ones only approximately.)"""
    by_user: dict[tuple[str, int], list[int]] = {}
    for i, (dom, ex) in enumerate(entries):
        by_user.setdefault((dom, ex.user), []).append(i)
    keep = sorted(i for idx in by_user.values() for i in idx[::-1][::window])
    return [entries[i] for i in keep]


def train_streams(dm) -> dict[str, list[tuple[str, Example]]]:
    """Training streams: ``{"train": ...}`` or, for ``hybrid``, ``{"target": ..., "hybrid/<S>": ...}``;
    under ``train_examples=sequences`` a user's prefixes a window apart (``sequence_windows``)."""
    streams = mixed_streams(dm)
    if getattr(dm, "train_examples", "prefixes") == "sequences":
        streams = {name: sequence_windows(entries, dm.max_history) for name, entries in streams.items()}
    return streams


def mixed_streams(dm) -> dict[str, list[tuple[str, Example]]]:
    """Every prefix of each training stream of the mix."""
    if dm.mix == "target":
        return {"train": domain_train(dm, dm.target)}
    if dm.mix == "joint":
        pooled = domain_train(dm, dm.target)
        for s in dm.sources:
            pooled += domain_train(dm, s)
        return {"train": pooled}
    streams = {"target": domain_train(dm, dm.target)}
    for s in dm.sources:
        if f"hybrid/{s}" not in dm.skip_streams:  # e.g. a WeaveRec hybrid reused from the store
            streams[f"hybrid/{s}"] = hybrid_entries(dm, s)
    return streams
