"""The in-memory form every reader produces, and the leave-one-out split of docs/methods.md.

A :class:`Domain` is a catalogue (item ids and titles, indexed by an internal item index) plus one
chronological item list per user. Everything downstream (candidates, text, methods) works on the
internal indices; external ids are kept only to report and to key caches.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import re
from dataclasses import dataclass, field
from typing import Literal

from recsys.core.errors import UserError

Split = Literal["train", "val", "test"]


class DataError(UserError):
    """Bad input data or data config: the message names the file, line or key and what to do."""


_TAG = re.compile(r"<!--.*?-->|</?[A-Za-z][^<>]*>", re.DOTALL)


def clean_title(s) -> str:
    """Unescape HTML entities (``&amp;`` -> ``&``), strip tags, collapse whitespace.

    Anything that is not a string (a missing title) gives ``""``.
    """
    if not isinstance(s, str):
        return ""
    for _ in range(2):  # some dumps escape twice (``&amp;amp;``)
        if "&" not in s:
            break
        unescaped = html.unescape(s)
        if unescaped == s:
            break
        s = unescaped
    if "<" in s:
        s = _TAG.sub(" ", s)
    return " ".join(s.split())


@dataclass(frozen=True)
class Example:
    """One next-item prediction: ``history`` (oldest first, already truncated) -> ``target``."""

    user: int  # index into Domain.user_ids
    history: tuple[int, ...]
    target: int


@dataclass
class Domain:
    """One product domain.

    Attributes:
        name: domain name (``beauty``, ``toys``...).
        item_ids: external item id of each internal item index.
        titles: title of each internal item index (non-empty, cleaned).
        user_ids: external user id of each user index.
        sequences: per user, internal item indices, oldest first.
        stats: counts of what preprocessing dropped (for the log and python -m recsys.data.profile).
    """

    name: str
    item_ids: list[str]
    titles: list[str]
    user_ids: list[str]
    sequences: list[list[int]]
    stats: dict = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return len(self.titles)

    @functools.cached_property
    def fingerprint(self) -> str:
        """16 hex digits of the sha256 of the data as read (item ids, titles, user ids, sequences), computed once:
        what the adapter store records of the data an adapter was trained on (not the name: a copy of a domain
        under another name has the same fingerprint; another domain under the same name has another)."""
        h = hashlib.sha256()
        for part in (self.item_ids, self.titles, self.user_ids, self.sequences):
            h.update(json.dumps(part, separators=(",", ":"), ensure_ascii=False).encode())
            h.update(b"\n")
        return h.hexdigest()[:16]

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)

    def examples(self, split: Split, max_history: int = 10) -> list[Example]:
        """Leave-one-out examples of one split (docs/methods.md, "The common task").

        The last item of a user is the test target, the second-last the validation target, and
        every earlier position t >= 1 a training target with history ``seq[:t]``. Histories keep
        the most recent ``max_history`` items. Users with fewer than 3 items have no triple and
        give no example (readers already drop them).
        """
        if max_history < 1:
            raise DataError(f"data.max_history must be >= 1, got {max_history}")
        out: list[Example] = []
        for u, seq in enumerate(self.sequences):
            n = len(seq)
            if n < 3:
                continue
            if split == "test":
                positions = [n - 1]
            elif split == "val":
                positions = [n - 2]
            elif split == "train":
                positions = range(1, n - 2)
            else:
                raise DataError(f"unknown split {split!r}: use train, val or test")
            for t in positions:
                out.append(Example(u, tuple(seq[max(0, t - max_history) : t]), seq[t]))
        return out

    def train_item_counts(self) -> list[int]:
        """How often each item occurs in the training split (history and targets), for popularity."""
        counts = [0] * self.num_items
        for seq in self.sequences:
            for i in seq[: max(0, len(seq) - 2)]:
                counts[i] += 1
        return counts

    def summary(self) -> dict:
        n_train = sum(max(0, len(s) - 3) for s in self.sequences)
        return {
            "domain": self.name,
            "users": self.num_users,
            "items": self.num_items,
            "interactions": self.num_interactions,
            "train_examples": n_train,
            "val_examples": sum(1 for s in self.sequences if len(s) >= 3),
            "test_examples": sum(1 for s in self.sequences if len(s) >= 3),
            **self.stats,
        }


def drop_short_users(
    name: str,
    item_ids: list[str],
    titles: list[str],
    user_ids: list[str],
    sequences: list[list[int]],
    min_len: int = 3,
    stats: dict | None = None,
) -> Domain:
    """Build a Domain keeping users with at least ``min_len`` items; re-index unused items away."""
    stats = dict(stats or {})
    keep = [u for u, s in enumerate(sequences) if len(s) >= min_len]
    stats["dropped_short_users"] = stats.get("dropped_short_users", 0) + len(sequences) - len(keep)
    used = sorted({i for u in keep for i in sequences[u]})
    remap = {old: new for new, old in enumerate(used)}
    stats["dropped_unused_items"] = stats.get("dropped_unused_items", 0) + len(item_ids) - len(used)
    if not keep:
        raise DataError(
            f"domain {name!r} has no user with at least {min_len} interactions after filtering; "
            "lower data k-core / check the input files"
        )
    return Domain(
        name=name,
        item_ids=[item_ids[i] for i in used],
        titles=[titles[i] for i in used],
        user_ids=[user_ids[u] for u in keep],
        sequences=[[remap[i] for i in sequences[u]] for u in keep],
        stats=stats,
    )
