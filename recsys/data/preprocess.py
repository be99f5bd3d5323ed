"""From raw interactions to a :class:`~recsys.data.domain.Domain`, and the on-disk cache.

:func:`build_domain` is the preprocessing of every raw Amazon dump: drop items without a
title, drop repeated (user, item) reviews keeping the earliest, order each user's items by time,
iterative k-core, then drop users with fewer than 3 items. :func:`load_raw_domain` reads the
dump (:func:`recsys.data.readers.read_raw`), builds the domain and caches it in one JSON file
keyed by the input files and the settings, so the second load skips all of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path

from recsys.data.domain import DataError, Domain, clean_title, drop_short_users
from recsys.data.readers import find_raw_files, read_plain, read_raw
from recsys.core.progress import status

log = logging.getLogger("recsys.data")

# Bump when build_domain or the cache layout changes: old cache files then stop matching.
CACHE_FORMAT_VERSION = 1

def _k_core(
    user_items: dict[str, list[str]], k: int
) -> tuple[dict[str, list[str]], int]:
    """Iteratively drop users with < k items and items with < k users until none is left.

    ``user_items`` holds distinct items per user. Returns the kept users (items in the same
    order) and the number of rounds."""
    rounds = 0
    with status(f"k-core filtering (k={k}, rounds)") as step:
        while True:
            rounds += 1
            user_items, changed = _k_core_round(user_items, k)
            step(1, f"round {rounds}: {len(user_items):,} users left")
            if not changed:
                return user_items, rounds


def _k_core_round(user_items: dict[str, list[str]], k: int) -> tuple[dict[str, list[str]], bool]:
    """One round of :func:`_k_core`: the users kept, and whether anything was dropped."""
    item_users = Counter(i for items in user_items.values() for i in items)
    weak_items = {i for i, c in item_users.items() if c < k}
    kept = {}
    changed = False
    for u, items in user_items.items():
        if weak_items:
            items = [i for i in items if i not in weak_items]
        if len(items) >= k:
            kept[u] = items
        if len(items) != len(user_items[u]) or len(items) < k:
            changed = True
    return kept, changed


def _titled_sequences(interactions: list[tuple[str, str, int]], clean: dict[str, str]):
    """Each user's titled items by time (stable), repeats dropped keeping the earliest: (user -> items, items
    without a title, interactions dropped for them, duplicate interactions dropped)."""
    per_user: dict[str, list[tuple[int, str]]] = {}
    untitled_items: set[str] = set()
    dropped_untitled = 0
    for user, item, t in interactions:
        if item not in clean:
            untitled_items.add(item)
            dropped_untitled += 1
            continue
        per_user.setdefault(user, []).append((t, item))
    user_items: dict[str, list[str]] = {}
    duplicates = 0
    for user, events in per_user.items():
        events.sort(key=lambda e: e[0])  # stable: equal times keep input order
        seen: set[str] = set()
        items = []
        for _, item in events:
            if item in seen:
                duplicates += 1
            else:
                seen.add(item)
                items.append(item)
        user_items[user] = items
    return user_items, untitled_items, dropped_untitled, duplicates


def build_domain(
    name: str,
    interactions: list[tuple[str, str, int]],
    titles: dict[str, str],
    k_core: int = 5,
) -> Domain:
    """Preprocess raw ``(user_id, item_id, timestamp)`` interactions into a Domain.

    Steps, each counted in ``domain.stats`` and logged: drop interactions with items whose
    cleaned title is empty or missing; drop repeated (user, item) pairs keeping the earliest
    (ties: the first in input order); order each user's items by time (stable); iterative
    ``k_core`` on users and items; drop users with fewer than 3 items. Users and items are
    indexed in sorted id order, so the result does not depend on the order of the input lines.
    """
    if isinstance(k_core, bool) or not isinstance(k_core, int) or k_core < 1:
        raise DataError(f"k_core must be an integer >= 1, got {k_core!r}")
    clean = {item: t for item, t in ((i, clean_title(raw)) for i, raw in titles.items()) if t}

    user_items, untitled_items, dropped_untitled, duplicates = _titled_sequences(interactions, clean)
    n_users = len(user_items)
    n_items = len({i for items in user_items.values() for i in items})
    n_inter = sum(len(s) for s in user_items.values())
    kept, rounds = _k_core(user_items, k_core)
    kept_items = sorted({i for items in kept.values() for i in items})
    stats = {
        "dropped_items_no_title": len(untitled_items),
        "dropped_interactions_no_title": dropped_untitled,
        "dropped_duplicate_interactions": duplicates,
        "kcore_dropped_users": n_users - len(kept),
        "kcore_dropped_items": n_items - len(kept_items),
        "kcore_dropped_interactions": n_inter - sum(len(s) for s in kept.values()),
    }
    log.info(
        "domain %r: %d interactions; dropped %d items without a title (%d interactions), "
        "%d duplicate reviews; %d-core (%d rounds) dropped %d users, %d items, %d interactions",
        name, len(interactions), stats["dropped_items_no_title"], dropped_untitled, duplicates,
        k_core, rounds, stats["kcore_dropped_users"], stats["kcore_dropped_items"],
        stats["kcore_dropped_interactions"],
    )
    if not kept:
        raise DataError(
            f"domain {name!r}: no user left after the {k_core}-core filter "
            f"({n_users} users, {n_items} titled items before it); lower data k_core "
            f"(e.g. k_core={max(1, k_core - 2)}) or use a larger dump"
        )
    index = {item: i for i, item in enumerate(kept_items)}
    user_ids = sorted(kept)
    sequences = [[index[i] for i in kept[u]] for u in user_ids]
    domain = drop_short_users(
        name, kept_items, [clean[i] for i in kept_items], user_ids, sequences, 3, stats
    )
    log.info(
        "domain %r: %d users, %d items, %d interactions (dropped %d users with < 3 items)",
        name, domain.num_users, domain.num_items, domain.num_interactions,
        domain.stats["dropped_short_users"],
    )
    return domain


# --------------------------------------------------------------------------- cache


def _cache_key(files: list[Path], settings: dict) -> str:
    described = []
    for p in files:
        st = p.stat()
        described.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    payload = {"format_version": CACHE_FORMAT_VERSION, "settings": settings, "files": described}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _domain_to_json(domain: Domain) -> dict:
    return {
        "name": domain.name,
        "item_ids": domain.item_ids,
        "titles": domain.titles,
        "user_ids": domain.user_ids,
        "sequences": domain.sequences,
        "stats": domain.stats,
    }


def _domain_from_json(d: dict) -> Domain:
    """Rebuild a Domain, checking the structure (a damaged file raises ValueError)."""
    domain = Domain(
        name=d["name"], item_ids=d["item_ids"], titles=d["titles"], user_ids=d["user_ids"],
        sequences=d["sequences"], stats=d["stats"],
    )
    lists = (domain.item_ids, domain.titles, domain.user_ids, domain.sequences)
    if not all(isinstance(x, list) for x in lists) or not isinstance(domain.stats, dict):
        raise ValueError("wrong field types")
    if len(domain.item_ids) != len(domain.titles) or len(domain.user_ids) != len(domain.sequences):
        raise ValueError("inconsistent lengths")
    if not domain.sequences or not all(isinstance(s, list) and s for s in domain.sequences):
        raise ValueError("empty sequences")
    lo = min(min(s) for s in domain.sequences)
    hi = max(max(s) for s in domain.sequences)
    if lo < 0 or hi >= len(domain.item_ids):
        raise ValueError("item index out of range")
    return domain


def read_cache(path: Path, key: str) -> Domain | None:
    """The cached Domain of ``path`` if it exists, is intact and was written for ``key``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("cannot read cache %s (%s); rebuilding", path, e)
        return None
    try:
        obj = json.loads(raw)
        if obj["format_version"] != CACHE_FORMAT_VERSION or obj["key"] != key:
            raise ValueError("written for other inputs or settings")
        return _domain_from_json(obj["domain"])
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring damaged cache %s (%s); rebuilding", path, e)
        return None


def write_cache(path: Path, key: str, domain: Domain) -> None:
    """Write atomically: a temp file in the same folder, fsync, then ``os.replace``.

    A crash at any point leaves either the old file or none under ``path``, never a partial one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(
        {"format_version": CACHE_FORMAT_VERSION, "key": key, "domain": _domain_to_json(domain)},
        ensure_ascii=False, separators=(",", ":"),
    ).encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable; not possible everywhere
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _through_cache(
    name: str, files: list[Path], settings: dict, cache_dir: Path, label: str, build
) -> Domain:
    """``build()``'s Domain, from ``cache_dir`` when a file for these inputs and settings exists.

    Cache files are named ``<label>-<hash of the input folder>-<key>.json``; writing one removes
    the older ones of the same label and folder (the inputs changed since)."""
    key = _cache_key(files, settings)
    folder_tag = hashlib.sha256(str(files[0].resolve().parent).encode()).hexdigest()[:8]
    prefix = f"{label}-{folder_tag}-"
    path = cache_dir / f"{prefix}{key[:16]}.json"
    domain = read_cache(path, key)
    if domain is not None:
        log.info("domain %r: cache hit %s", name, path)
        domain.name = name
        return domain
    domain = build()
    try:
        write_cache(path, key, domain)
        log.info("domain %r: cached in %s", name, path)
        for old in cache_dir.glob(f"{prefix}*.json"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as e:
        log.warning("domain %r: could not write cache %s (%s)", name, path, e)
    return domain


def load_raw_domain(
    folder: str | Path,
    category: str,
    year: int,
    name: str | None = None,
    k_core: int = 5,
    cache_dir: str | Path | None = None,
    prefer_5core: bool = True,
    use_cache: bool = True,
) -> Domain:
    """Read an official Amazon dump (see :func:`~recsys.data.readers.read_raw`) and
    preprocess it (:func:`build_domain`), through an on-disk cache.

    The cache file lives in ``cache_dir`` (default ``<folder>/.cache``); its key hashes the
    input files (absolute path, size, mtime) and the settings, so touching a file or changing
    ``k_core`` rebuilds. A damaged cache file is ignored and rebuilt; failing to write one only
    warns. ``use_cache=False`` neither reads nor writes it. ``name`` defaults to the lower-cased
    category.
    """
    folder = Path(folder)
    name = name or category.lower()
    files = list(find_raw_files(folder, category, year, prefer_5core))

    def build() -> Domain:
        interactions, titles = read_raw(folder, category, year, prefer_5core)
        return build_domain(name, interactions, titles, k_core)

    if not use_cache:
        return build()
    settings = {"reader": "raw", "category": category, "year": int(year), "k_core": k_core,
                "prefer_5core": prefer_5core}
    cache_dir = Path(cache_dir) if cache_dir is not None else folder / ".cache"
    label = f"{category}-{int(year)}-k{k_core}"
    return _through_cache(name, files, settings, cache_dir, label, build)


def load_plain_domain(
    folder: str | Path, name: str | None = None, cache_dir: str | Path | None = None
) -> Domain:
    """Read a plain-format domain folder (:func:`~recsys.data.readers.read_plain`).

    With ``cache_dir`` the result is cached there like :func:`load_raw_domain`'s (a hit takes
    about a fifth of the read); without it nothing is written: the plain folders are read-only
    shared input. ``name`` defaults to the folder name.
    """
    folder = Path(folder)
    name = name or folder.name
    if cache_dir is None:
        return read_plain(folder, name)
    files = [folder / "items.jsonl", folder / "sequences.jsonl"]
    if not all(p.is_file() for p in files):
        return read_plain(folder, name)  # raises the reader's DataError
    settings = {"reader": "plain"}
    return _through_cache(
        name, files, settings, Path(cache_dir), f"plain-{folder.name}", lambda: read_plain(folder, name)
    )
