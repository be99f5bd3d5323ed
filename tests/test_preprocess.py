"""Preprocessing (title cleaning, dedupe, time order, k-core) and the on-disk cache."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from recsys.data import preprocess
from recsys.data.domain import DataError
from recsys.data.preprocess import build_domain, clean_title, load_plain_domain, load_raw_domain
from recsys.data.readers import read_raw

RAW = Path(__file__).parent / "fixtures" / "raw"
CATEGORY = {2014: "Beauty", 2018: "Beauty", 2023: "All_Beauty"}
# the sequences documented in tests/fixtures/raw/make_fixtures.py, by item number
EXPECTED = [[2, 3, 4, 5, 6], [3, 5, 4, 1, 6], [6, 5, 4, 2, 1],
            [2, 1, 6, 5, 3], [4, 6, 1, 3, 2], [5, 4, 3, 2, 1]]
TITLES = [
    "Neutrogena Oil-Free Acne Wash, 6 Fl. Oz",
    "L'Oreal Paris Voluminous Mascara, Black",
    "Burt's Bees Beeswax Lip Balm & Tint",
    "Cr\u00e8me de la Mer Moisturizing Cream",
    "OPI Nail Lacquer, Big Apple Red",
    "Revlon One-Step Hair Dryer and Volumizer",
]


@pytest.mark.parametrize("raw,clean", [
    ("Burt&#39;s Bees &amp; Co", "Burt's Bees & Co"),
    ('<span class="a-size-medium a-color-secondary">OPI</span> Nail  Lacquer\n', "OPI Nail Lacquer"),
    ("Rock &amp;amp; Roll", "Rock & Roll"),
    ("Hearts <3 and x > y", "Hearts <3 and x > y"),
    ("&lt;b&gt;bold&lt;/b&gt;", "bold"),
    ("Caf\u00e9\u00a0Noir\t ", "Caf\u00e9 Noir"),
    ("<br/>  ", ""),
    (None, ""),
    (["not", "a", "string"], ""),
])
def test_clean_title(raw, clean):
    assert clean_title(raw) == clean


@pytest.mark.parametrize("year", [2014, 2018, 2023])
def test_build_domain_on_fixtures(year: int, caplog):
    interactions, titles = read_raw(RAW / str(year), CATEGORY[year], year)
    with caplog.at_level(logging.INFO, logger="recsys.data"):
        d = build_domain("beauty", interactions, titles, k_core=5)
    item_no = [int(i[-2:]) for i in d.item_ids]
    assert item_no == [1, 2, 3, 4, 5, 6]
    assert d.titles == TITLES
    assert [[item_no[i] for i in s] for s in d.sequences] == EXPECTED
    assert d.stats == {
        "dropped_items_no_title": 2,  # I8 (no or empty title), I9 (not in the meta file)
        "dropped_interactions_no_title": 3,
        "dropped_duplicate_interactions": 2 if year == 2023 else 1,
        "kcore_dropped_users": 2,  # U7, U9
        "kcore_dropped_items": 1,  # I7
        "kcore_dropped_interactions": 6,
        "dropped_short_users": 0,
        "dropped_unused_items": 0,
    }
    assert "dropped 2 items without a title (3 interactions)" in caplog.text


def test_k_core_is_iterative_and_configurable():
    interactions, titles = read_raw(RAW / "2014", "Beauty", 2014)
    # k=3: I7 has 2 users and goes first; only then does U7 fall to 2 items
    d3 = build_domain("b", interactions, titles, k_core=3)
    assert (d3.num_users, d3.num_items) == (6, 6)
    assert d3.stats["kcore_dropped_users"] == 2 and d3.stats["kcore_dropped_items"] == 1
    # k=2 keeps U7 and I7; U9 (2 items) passes the 2-core but not the 3-item minimum
    d2 = build_domain("b", interactions, titles, k_core=2)
    assert (d2.num_users, d2.num_items, d2.num_interactions) == (7, 7, 34)
    assert d2.stats["kcore_dropped_users"] == 0 and d2.stats["dropped_short_users"] == 1
    u1 = d2.sequences[d2.user_ids.index("A1X2014REVIEWER01")]
    assert [int(d2.item_ids[i][-2:]) for i in u1] == [2, 3, 4, 7, 5, 6]


def test_dedupe_keeps_earliest_and_sort_is_stable():
    titles = {i: f"title {i}" for i in "abcdefg"}
    interactions = [
        ("u", "c", 50),  # a later duplicate of c, listed first
        ("u", "a", 30),
        ("u", "f", 30),  # same time as d, listed before it
        ("u", "b", 10),
        ("u", "c", 20),
        ("u", "d", 30),
        ("u", "e", 40),
        ("u", "a", 5),  # the earliest review of a
    ]
    d = build_domain("t", interactions, titles, k_core=1)
    assert [d.item_ids[i] for i in d.sequences[0]] == ["a", "b", "c", "f", "d", "e"]
    assert d.stats["dropped_duplicate_interactions"] == 2


def test_untitled_items_are_dropped_and_counted():
    titles = {"a": "A", "b": "  ", "c": "<p></p>", "d": "D", "e": "E"}
    interactions = [("u", i, t) for t, i in enumerate("abcdefe")]
    d = build_domain("t", interactions, titles, k_core=1)
    assert d.item_ids == ["a", "d", "e"]
    assert d.stats["dropped_items_no_title"] == 3  # b, c (empty once cleaned), f (no title)
    assert d.stats["dropped_interactions_no_title"] == 3


def test_no_user_left_names_domain_and_k_core():
    interactions, titles = read_raw(RAW / "2014", "Beauty", 2014)
    with pytest.raises(DataError, match=r"domain 'beauty'.*6-core.*lower data k_core"):
        build_domain("beauty", interactions, titles, k_core=6)
    with pytest.raises(DataError, match="k_core must be an integer >= 1"):
        build_domain("beauty", interactions, titles, k_core=0)


# --------------------------------------------------------------------------- cache


@pytest.fixture
def raw14(tmp_path: Path) -> Path:
    folder = tmp_path / "raw"
    shutil.copytree(RAW / "2014", folder)
    return folder


def cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_cache_hit_returns_equal_domain(raw14: Path, tmp_path: Path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    first = load_raw_domain(raw14, "Beauty", 2014, cache_dir=cache)
    assert first.name == "beauty" and first.num_users == 6
    (written,) = cache.iterdir()
    assert written.name.startswith("Beauty-2014-k5-") and written.suffix == ".json"

    def no_read(*args, **kwargs):
        raise AssertionError("read_raw called on a cache hit")

    monkeypatch.setattr(preprocess, "read_raw", no_read)
    with caplog.at_level(logging.INFO, logger="recsys.data"):
        second = load_raw_domain(raw14, "Beauty", 2014, cache_dir=cache)
    assert second == first
    assert "cache hit" in caplog.text
    assert load_raw_domain(raw14, "Beauty", 2014, name="src", cache_dir=cache).name == "src"


def test_cache_key_follows_files_and_settings(raw14: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    load_raw_domain(raw14, "Beauty", 2014, cache_dir=cache)
    load_raw_domain(raw14, "Beauty", 2014, k_core=2, cache_dir=cache)
    assert len(cache_files(cache)) == 2  # one file per k_core
    meta = raw14 / "meta_Beauty.json"
    st = meta.stat()
    os.utime(meta, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a newer meta file
    d = load_raw_domain(raw14, "Beauty", 2014, cache_dir=cache)
    assert d.num_users == 6
    assert len(cache_files(cache)) == 2  # the stale k5 file was replaced, not kept


def test_default_cache_dir_and_no_cache(raw14: Path):
    load_raw_domain(raw14, "Beauty", 2014, use_cache=False)
    assert not (raw14 / ".cache").exists()
    load_raw_domain(raw14, "Beauty", 2014)
    assert len(cache_files(raw14 / ".cache")) == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "wrong_index"])
def test_damaged_cache_is_rebuilt(raw14: Path, tmp_path: Path, damage: str, caplog):
    cache = tmp_path / "cache"
    good = load_raw_domain(raw14, "Beauty", 2014, cache_dir=cache)
    (path,) = cache.iterdir()
    data = path.read_bytes()
    path.write_bytes({
        "truncate": data[: len(data) // 2],
        "garbage": b"\x00\xff not json",
        "empty": b"",
        "wrong_index": data.replace(b'"sequences":[[', b'"sequences":[[99,'),
    }[damage])
    with caplog.at_level(logging.WARNING, logger="recsys.data"):
        rebuilt = load_raw_domain(raw14, "Beauty", 2014, cache_dir=cache)
    assert rebuilt == good
    assert "ignoring damaged cache" in caplog.text
    assert path.read_bytes() == data  # rewritten intact


def test_interrupted_write_leaves_no_trusted_cache(raw14: Path, tmp_path: Path, monkeypatch):
    cache = tmp_path / "cache"

    def crash(*args):
        raise KeyboardInterrupt  # the process dies between writing and renaming

    monkeypatch.setattr(preprocess.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        load_raw_domain(raw14, "Beauty", 2014, cache_dir=cache)
    assert cache_files(cache) == []  # no final file, and the temp file was removed

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(preprocess.os, "replace", fail)
    d = load_raw_domain(raw14, "Beauty", 2014, cache_dir=cache)  # a failed write only warns
    assert d.num_users == 6 and cache_files(cache) == []
    monkeypatch.undo()

    # a temp file left by a killed process is never read as the cache
    cache.mkdir(exist_ok=True)
    (cache / ".Beauty-2014-k5-0123456789abcdef.json.x1y2.tmp").write_bytes(b'{"format_version":')
    calls = []
    real_read_raw = preprocess.read_raw
    monkeypatch.setattr(preprocess, "read_raw", lambda *a: calls.append(a) or real_read_raw(*a))
    assert load_raw_domain(raw14, "Beauty", 2014, cache_dir=cache) == d
    assert len(calls) == 1  # a miss: built from the raw files


def test_load_plain_domain(tmp_path: Path, monkeypatch):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "items.jsonl").write_text('{"item_id": "1", "title": "x"}\n{"item_id": "2", "title": "y"}\n')
    (folder / "sequences.jsonl").write_text('{"user_id": "7", "item_ids": ["1", "2", "1"]}\n')
    d = load_plain_domain(folder)
    assert (d.name, d.sequences) == ("p", [[0, 1, 0]])
    assert cache_files(folder) == ["items.jsonl", "sequences.jsonl"]  # nothing written there

    cache = tmp_path / "cache"
    assert load_plain_domain(folder, cache_dir=cache) == d
    assert len(cache_files(cache)) == 1
    monkeypatch.setattr(preprocess, "read_plain", lambda *a: pytest.fail("not a cache hit"))
    assert load_plain_domain(folder, name="q", cache_dir=cache).name == "q"
