"""Readers of the two on-disk forms of Amazon review data.

- :func:`read_plain`: the re-packed plain format of ``shared/data/amazon/<domain>/``
  (``items.jsonl`` + ``sequences.jsonl``), straight to a :class:`~recsys.data.domain.Domain`.
- :func:`read_raw`: the official Amazon review dumps of 2014, 2018 and 2023, to raw
  ``(user_id, item_id, timestamp)`` interactions and raw titles; :mod:`recsys.data.preprocess`
  turns those into a Domain (title cleaning, dedupe, k-core) and caches the result.

Files may be gzip or plain text whatever their name says: gzip is detected by its magic bytes.
Every malformed line raises :class:`~recsys.data.domain.DataError` naming the file and line.
"""

from __future__ import annotations

import ast
import gzip
import json
import logging
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

from recsys.data.domain import DataError, Domain, clean_title, drop_short_users
from recsys.core.progress import track

log = logging.getLogger("recsys.data")

YEARS = (2014, 2018, 2023)
_GZIP_MAGIC = b"\x1f\x8b"


# --------------------------------------------------------------------------- file access


def _open_binary(path: Path):
    """Open ``path`` for reading bytes, decompressing if it starts with the gzip magic."""
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == _GZIP_MAGIC else open(path, "rb")


def iter_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, line)`` for the non-blank lines of a plain or gzip text file.

    A truncated or corrupt gzip stream raises DataError naming the file (re-download it).
    """
    path = Path(path)
    lineno = 0
    try:
        with _open_binary(path) as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield lineno, line
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(
            f"{path}: corrupt or truncated gzip data after line {lineno} ({e}); "
            "download the file again (python -m recsys.data.download ... --force)"
        ) from None


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """``(line_number, object)`` of every non-blank line of a small JSON-lines file.

    The whole file is parsed in one ``json.loads`` call (several times faster than line by
    line); only when that fails is it parsed line by line, to name the bad line.
    """
    with _open_binary(path) as f:
        try:
            text = f.read().decode("utf-8")
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None
    # split on "\n" only: str.splitlines() would also split inside strings at U+2028 etc.
    numbered = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    try:
        objs = json.loads("[" + ",".join(line for _, line in numbered) + "]")
        if len(objs) == len(numbered) and all(isinstance(o, dict) for o in objs):
            return [(n, o) for (n, _), o in zip(numbered, objs)]
    except ValueError:
        pass
    return [(n, _parse_json(path, n, line)) for n, line in numbered]


def _parse_json(path: Path, lineno: int, line: bytes | str) -> dict:
    try:
        obj = json.loads(line)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise DataError(f"{path}, line {lineno}: malformed JSON ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _parse_json_or_literal(path: Path, lineno: int, line: bytes) -> dict:
    """A JSON object, or a Python dict literal (the 2014 meta files), never ``eval``."""
    try:
        obj = json.loads(line)
    except ValueError:
        try:
            obj = ast.literal_eval(line.decode("utf-8"))
        except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError) as e:
            raise DataError(
                f"{path}, line {lineno}: neither JSON nor a Python dict literal "
                f"({type(e).__name__}: {e})"
            ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}, line {lineno}: expected a dict, got {type(obj).__name__}")
    return obj


def _field(obj: dict, key: str, path: Path, lineno: int):
    try:
        return obj[key]
    except KeyError:
        raise DataError(f"{path}, line {lineno}: missing field {key!r}") from None


def _str_id(value, key: str, path: Path, lineno: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise DataError(f"{path}, line {lineno}: field {key!r} must be a non-empty id, got {value!r}")
    return str(value)


# --------------------------------------------------------------------------- plain format


def _read_plain_items(path: Path) -> tuple[list[str], list[str], dict[str, int], set[str]]:
    """``items.jsonl``: (item ids, cleaned titles, id -> index, ids dropped for an empty title)."""
    item_ids: list[str] = []
    titles: list[str] = []
    index: dict[str, int] = {}
    untitled: set[str] = set()
    for lineno, obj in _read_jsonl(path):
        iid = _str_id(_field(obj, "item_id", path, lineno), "item_id", path, lineno)
        if iid in index or iid in untitled:
            raise DataError(f"{path}, line {lineno}: duplicate item_id {iid!r}")
        title = clean_title(obj.get("title"))
        if not title:
            untitled.add(iid)
            continue
        index[iid] = len(item_ids)
        item_ids.append(iid)
        titles.append(title)
    return item_ids, titles, index, untitled


def _read_plain_sequences(path: Path, index: dict[str, int], untitled: set[str]):
    """``sequences.jsonl``: (user ids, item-index sequences, references dropped for an untitled item, for an
    unknown one)."""
    user_ids: list[str] = []
    sequences: list[list[int]] = []
    seen_users: set[str] = set()
    dropped_untitled = dropped_unknown = 0
    for lineno, obj in _read_jsonl(path):
        uid = _str_id(_field(obj, "user_id", path, lineno), "user_id", path, lineno)
        if uid in seen_users:
            raise DataError(f"{path}, line {lineno}: duplicate user_id {uid!r}")
        seen_users.add(uid)
        refs = _field(obj, "item_ids", path, lineno)
        if not isinstance(refs, list):
            raise DataError(f"{path}, line {lineno}: 'item_ids' must be a list")
        try:
            seq = [index[ref] for ref in refs]  # the common case: every id known
        except (KeyError, TypeError):
            seq = []
            for ref in map(str, refs):
                i = index.get(ref)
                if i is not None:
                    seq.append(i)
                elif ref in untitled:
                    dropped_untitled += 1
                else:
                    dropped_unknown += 1
        user_ids.append(uid)
        sequences.append(seq)
    return user_ids, sequences, dropped_untitled, dropped_unknown


def read_plain(folder: str | Path, name: str | None = None) -> Domain:
    """Read the plain format: ``items.jsonl`` ({"item_id","title"}) and ``sequences.jsonl``
    ({"user_id","item_ids"}, oldest first).

    Titles are cleaned; items whose title is empty are dropped, and so are the references to
    them and to ids missing from ``items.jsonl``; users left with fewer than 3 items are dropped.
    Every count lands in ``domain.stats``. ``name`` defaults to the folder name.
    """

    folder = Path(folder)
    name = name or folder.name
    items_path, seq_path = folder / "items.jsonl", folder / "sequences.jsonl"
    for p in (items_path, seq_path):
        if not p.is_file():
            raise DataError(
                f"plain domain {name!r}: missing {p} (a plain domain folder holds items.jsonl "
                "and sequences.jsonl, see shared/data/amazon/README.md)"
            )

    item_ids, titles, index, untitled = _read_plain_items(items_path)
    user_ids, sequences, dropped_untitled, dropped_unknown = _read_plain_sequences(seq_path, index, untitled)

    stats = {
        "dropped_items_no_title": len(untitled),
        "dropped_interactions_no_title": dropped_untitled,
        "dropped_interactions_unknown_item": dropped_unknown,
    }
    if not any(len(s) >= 3 for s in sequences):  # say why, in this format's terms (not the raw dumps' k-core)
        total = sum(len(s) for s in sequences) + dropped_untitled + dropped_unknown
        raise DataError(
            f"{seq_path}: no user has 3 or more usable items ({len(user_ids)} users; of {total} item ids, "
            f"{dropped_unknown} are not in {items_path.name} and {dropped_untitled} name an item without a title); "
            f"fill {seq_path.name} with users of >= 3 items whose item_ids are the item_id values of {items_path.name}"
        )
    domain = drop_short_users(name, item_ids, titles, user_ids, sequences, min_len=3, stats=stats)
    # data the reader left out (unknown item ids, items without a title) is the user's to know: a warning
    lost = dropped_untitled + dropped_unknown
    sequences_total = lost + sum(len(seq) for seq in sequences)
    log.log(logging.WARNING if lost else logging.INFO,
            "read plain domain %r from %s: %d users, %d items, %d interactions; dropped %s%s",
            name, folder, domain.num_users, domain.num_items, domain.num_interactions, domain.stats,
            f" ({lost} interactions of {sequences_total} left out: see {seq_path.name})" if lost else "")
    return domain


# --------------------------------------------------------------------------- raw Amazon dumps


def _check_year(year: int) -> int:
    try:
        year = int(year)
    except (TypeError, ValueError):
        year = -1
    if year not in YEARS:
        raise DataError(f"unknown Amazon review data year {year!r}: use one of {YEARS}")
    return year


def raw_file_stems(category: str, year: int, prefer_5core: bool = True) -> tuple[list[str], str]:
    """Official file names (``.gz`` form) of one category: (review files in order of preference,
    meta file). 2014 and 2018 have a 5-core and a full review file; 2023 has one."""
    year = _check_year(year)
    if year == 2014:
        reviews = [f"reviews_{category}_5.json.gz", f"reviews_{category}.json.gz"]
        meta = f"meta_{category}.json.gz"
    elif year == 2018:
        reviews = [f"{category}_5.json.gz", f"{category}.json.gz"]
        meta = f"meta_{category}.json.gz"
    else:
        reviews = [f"{category}.jsonl.gz"]
        meta = f"meta_{category}.jsonl.gz"
    if not prefer_5core:
        reviews.reverse()
    return reviews, meta


def _existing(folder: Path, gz_name: str) -> Path | None:
    """``X.json.gz`` or ``X.json`` (either may hold gzip or plain bytes)."""
    for cand in (gz_name, gz_name[: -len(".gz")]):
        if (folder / cand).is_file():
            return folder / cand
    return None


def find_raw_files(
    folder: str | Path, category: str, year: int, prefer_5core: bool = True
) -> tuple[Path, Path]:
    """Locate (reviews file, meta file) of ``category``/``year`` in ``folder``.

    Raises DataError naming the expected names and the download command when one is missing.
    """
    folder = Path(folder)
    year = _check_year(year)
    review_names, meta_name = raw_file_stems(category, year, prefer_5core)
    how = (
        f"get them with: python -m recsys.data.download --category {category} --year {year} "
        f"--root {folder}"
    )
    found = [p for p in (_existing(folder, n) for n in review_names) if p is not None]
    if not found:
        raise DataError(
            f"no {year} review file for category {category!r} in {folder}: expected "
            + " or ".join(f"{n} (or {n[:-3]})" for n in review_names)
            + f"; {how}"
        )
    reviews = found[0]
    if reviews.name.split(".")[0] != review_names[0].split(".")[0]:
        log.warning("%s not found in %s, using %s", review_names[0], folder, reviews.name)
    meta = _existing(folder, meta_name)
    if meta is None:
        raise DataError(
            f"no {year} metadata (titles) for category {category!r} in {folder}: expected "
            f"{meta_name} (or {meta_name[:-3]}); {how}"
        )
    return reviews, meta


# field names per year: (user, item, time, time unit in seconds), meta item field
_REVIEW_FIELDS = {
    2014: ("reviewerID", "asin", "unixReviewTime", 1),
    2018: ("reviewerID", "asin", "unixReviewTime", 1),
    2023: ("user_id", "parent_asin", "timestamp", 1000),
}
_META_ITEM = {2014: "asin", 2018: "asin", 2023: "parent_asin"}


def _read_reviews(path: Path, year: int) -> list[tuple[str, str, int]]:
    ukey, ikey, tkey, per_second = _REVIEW_FIELDS[year]
    out: list[tuple[str, str, int]] = []
    for lineno, line in track(iter_lines(path), f"reading reviews {path.name} (lines)"):
        obj = _parse_json(path, lineno, line)
        user = _str_id(_field(obj, ukey, path, lineno), ukey, path, lineno)
        item = _str_id(_field(obj, ikey, path, lineno), ikey, path, lineno)
        t = _field(obj, tkey, path, lineno)
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise DataError(f"{path}, line {lineno}: field {tkey!r} must be a number, got {t!r}")
        out.append((user, item, int(t) // per_second))
    return out


def _read_titles(path: Path, year: int, wanted: set[str]) -> dict[str, str]:
    """Raw title of every item of ``wanted`` that has one (first non-empty line wins).

    A meta file mostly describes items no review references (and a 2014 line needs the slow
    ``ast.literal_eval``), so a line whose item id a cheap byte match finds outside ``wanted``
    is skipped unparsed; every other line is parsed and checked.
    """
    key = _META_ITEM[year]
    id_pattern = re.compile(rb"""['"]""" + key.encode() + rb"""['"]\s*:\s*['"]([^'"]+)['"]""")
    parse = _parse_json_or_literal if year == 2014 else _parse_json
    titles: dict[str, str] = {}
    for lineno, line in track(iter_lines(path), f"reading titles {path.name} (lines)"):
        m = id_pattern.search(line)
        if m is not None:
            try:
                if m.group(1).decode() not in wanted:
                    continue
            except UnicodeDecodeError:
                pass
        obj = parse(path, lineno, line)
        item = _str_id(_field(obj, key, path, lineno), key, path, lineno)
        title = obj.get("title")
        if item in wanted and item not in titles and isinstance(title, str) and title.strip():
            titles[item] = title
    return titles


def read_raw(
    folder: str | Path, category: str, year: int, prefer_5core: bool = True
) -> tuple[list[tuple[str, str, int]], dict[str, str]]:
    """Read an official Amazon review dump of ``category`` (file-name spelling, e.g. ``Beauty``,
    ``All_Beauty``) and ``year`` (2014, 2018 or 2023) from ``folder``.

    Returns ``(interactions, titles)``: interactions in file order as ``(user_id, item_id,
    timestamp_seconds)`` (2023: ``parent_asin`` is the item and milliseconds become seconds),
    duplicates and all; titles maps each reviewed item that has a non-empty title to its raw
    (uncleaned) title. ``prefer_5core``: with both the 5-core and the full review file present
    (2014, 2018), read the 5-core one.
    """
    year = _check_year(year)
    reviews_path, meta_path = find_raw_files(folder, category, year, prefer_5core)
    interactions = _read_reviews(reviews_path, year)
    titles = _read_titles(meta_path, year, {item for _, item, _ in interactions})
    log.info(
        "read %d reviews from %s and %d titles from %s",
        len(interactions), reviews_path, len(titles), meta_path,
    )
    return interactions, titles
