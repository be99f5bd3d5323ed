"""Which examples a run trains and is evaluated on: the evaluated users, the selection users of
``train_on_val``, each domain's training examples (target fraction, caps) and the training streams of a mix
(``target``, ``joint``, WeaveRec's ``hybrid``). Every draw is seeded from the run's seed, so every method of a
comparison sees the same examples. ``s`` is the run's ``DomainSettings`` (``recsys.data.settings``), ``domains``
the domains read (name -> ``Domain``), ``held_out`` the selection users of ``train_on_val`` (None without it).
"""

from __future__ import annotations

import logging

import numpy as np

from recsys.data.candidates import stable_seed
from recsys.data.domain import DataError, Domain, Example
from recsys.data.settings import DomainSettings

log = logging.getLogger("recsys.data")


def eval_users(s: DomainSettings, d: Domain) -> set[int]:
    """The evaluated users: all, or a seeded subset of ``max_eval_users``, the same for every method."""
    users = list(range(d.num_users))
    if s.max_eval_users and s.max_eval_users < len(users):
        rng = np.random.default_rng(stable_seed("eval_users", d.name, s.seed))
        users = rng.choice(len(users), size=s.max_eval_users, replace=False).tolist()
    return set(users)


def selection_users(s: DomainSettings, d: Domain) -> set[int]:
    """``train_on_val``: the held-out users whose validation examples select the model (seeded,
    ``selection_share`` of the users, at most ``max_eval_users``); their validation never trains."""
    n = max(1, round(s.selection_share * d.num_users))
    if s.max_eval_users:
        n = min(n, s.max_eval_users)
    rng = np.random.default_rng(stable_seed("selection_users", d.name, s.seed))
    return set(rng.choice(d.num_users, size=n, replace=False).tolist())


def domain_train(s: DomainSettings, domains: dict[str, Domain], name: str,
                 held_out: set[int] | None = None) -> list[tuple[str, Example]]:
    """``name``'s training examples under the data settings (target fraction, train_on_val, caps), seeded."""
    d = domains[name]
    exs = d.examples("train", s.max_history)
    if name == s.target and s.train_on_val:  # the release trains on validation examples too
        exs = exs + [e for e in d.examples("val", s.max_history) if e.user not in (held_out or set())]
    if name == s.target and s.target_fraction < 1.0:
        rng = np.random.default_rng(stable_seed("fraction", name, s.seed))
        n_keep = max(1, round(s.target_fraction * d.num_users))
        keep = set(rng.permutation(d.num_users)[:n_keep].tolist())
        exs = [e for e in exs if e.user in keep]
    cap = s.max_train_examples
    if cap and name == s.target and s.cap_scales_with_fraction:
        cap = max(1, round(s.target_fraction * cap))  # the share of a capped budget (data-efficiency sweeps)
    if cap and len(exs) > cap:
        rng = np.random.default_rng(stable_seed("train_cap", name, s.seed))
        sel = sorted(rng.choice(len(exs), size=cap, replace=False).tolist())
        exs = [exs[i] for i in sel]
    if not exs:
        raise DataError(f"domain {name!r} has no training example (users need >= 4 items)")
    return [(name, e) for e in exs]


def hybrid_entries(s: DomainSettings, domains: dict[str, Domain], source: str,
                   held_out: set[int] | None = None) -> list[tuple[str, Example]]:
    """WeaveRec's hybrid mixture as released: min(cap, |T|) target examples and, independently,
    min(cap, |S|) of ``source`` (50/50 when both domains have at least ``hybrid_cap``)."""
    tgt, src = domain_train(s, domains, s.target, held_out), domain_train(s, domains, source, held_out)
    n, n_src = min(s.hybrid_cap, len(tgt)), min(s.hybrid_cap, len(src))
    if n_src != n:
        log.warning("hybrid %s+%s is not 50/50: %d target and %d source examples (hybrid_cap %d)",
                    s.target, source, n, n_src, s.hybrid_cap)
    rng = np.random.default_rng(stable_seed("hybrid", s.target, source, s.seed))
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


def train_streams(s: DomainSettings, domains: dict[str, Domain], held_out: set[int] | None = None,
                  skip: set[str] = frozenset(), examples: str = "prefixes") -> dict[str, list[tuple[str, Example]]]:
    """Training streams: ``{"train": ...}`` or, for ``hybrid``, ``{"target": ..., "hybrid/<S>": ...}`` (less the
    streams in ``skip``, e.g. a WeaveRec hybrid reused from the store); under ``examples="sequences"`` a user's
    prefixes a window apart (``sequence_windows``)."""
    streams = mixed_streams(s, domains, held_out, skip)
    if examples == "sequences":
        streams = {name: sequence_windows(entries, s.max_history) for name, entries in streams.items()}
    return streams


def mixed_streams(s: DomainSettings, domains: dict[str, Domain], held_out: set[int] | None = None,
                  skip: set[str] = frozenset()) -> dict[str, list[tuple[str, Example]]]:
    """Every prefix of each training stream of the mix."""
    if s.mix == "target":
        return {"train": domain_train(s, domains, s.target, held_out)}
    if s.mix == "joint":
        pooled = domain_train(s, domains, s.target, held_out)
        for src in s.sources:
            pooled += domain_train(s, domains, src, held_out)
        return {"train": pooled}
    streams = {"target": domain_train(s, domains, s.target, held_out)}
    for src in s.sources:
        if f"hybrid/{src}" not in skip:
            streams[f"hybrid/{src}"] = hybrid_entries(s, domains, src, held_out)
    return streams
