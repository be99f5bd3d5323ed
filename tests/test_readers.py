"""Readers: the plain format and the official 2014 / 2018 / 2023 Amazon dumps."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from recsys.data.domain import DataError
from recsys.data.readers import find_raw_files, read_plain, read_raw

RAW = Path(__file__).parent / "fixtures" / "raw"
SHARED_AMAZON = Path(__file__).parents[2] / "shared/data/amazon"
CATEGORY = {2014: "Beauty", 2018: "Beauty", 2023: "All_Beauty"}


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


# --------------------------------------------------------------------------- plain format


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    folder.mkdir()
    write_jsonl(folder / "items.jsonl", [
        {"item_id": "a", "title": "Alpha &amp; <b>Omega</b>"},
        {"item_id": "b", "title": "  Beta   cream "},
        {"item_id": "c", "title": ""},  # dropped: empty title
        {"item_id": "d"},  # dropped: no title
        {"item_id": "e", "title": "Epsilon"},
        {"item_id": "f", "title": "Phi, never referenced"},
    ])
    write_jsonl(folder / "sequences.jsonl", [
        {"user_id": "u1", "item_ids": ["a", "b", "c", "e"]},
        {"user_id": "u2", "item_ids": ["e", "zz", "b", "a"]},  # zz: not in items.jsonl
        {"user_id": "u3", "item_ids": ["a", "d", "b"]},  # left with 2 items: dropped
        "",  # blank lines are ignored
        {"user_id": "u4", "item_ids": ["b", "a", "e", "b"]},  # repeats are kept as they are
    ])
    return folder


def test_read_plain(plain: Path):
    d = read_plain(plain)
    assert d.name == "tiny"
    assert d.user_ids == ["u1", "u2", "u4"]
    assert d.item_ids == ["a", "b", "e"]  # file order; f is unused, c and d have no title
    assert d.titles == ["Alpha & Omega", "Beta cream", "Epsilon"]
    assert d.sequences == [[0, 1, 2], [2, 1, 0], [1, 0, 2, 1]]
    assert d.stats == {
        "dropped_items_no_title": 2,
        "dropped_interactions_no_title": 2,
        "dropped_interactions_unknown_item": 1,
        "dropped_short_users": 1,
        "dropped_unused_items": 1,
    }
    assert read_plain(plain, name="other").name == "other"


def test_read_plain_bad_inputs(plain: Path):
    (plain / "sequences.jsonl").rename(plain / "seq.bak")
    with pytest.raises(DataError, match="sequences.jsonl"):
        read_plain(plain)
    (plain / "seq.bak").rename(plain / "sequences.jsonl")

    with open(plain / "sequences.jsonl", "a") as f:
        f.write('{"user_id": "u5", "item_ids": ["a", "b"\n')
    with pytest.raises(DataError, match=r"sequences\.jsonl, line 6: malformed JSON"):
        read_plain(plain)

    write_jsonl(plain / "sequences.jsonl", [{"user_id": "u1", "item_ids": ["a", "b", "e"]},
                                            {"user_id": "u1", "item_ids": ["a", "b", "e"]}])
    with pytest.raises(DataError, match="line 2: duplicate user_id 'u1'"):
        read_plain(plain)

    write_jsonl(plain / "items.jsonl", [{"title": "no id"}])
    with pytest.raises(DataError, match=r"items\.jsonl, line 1: missing field 'item_id'"):
        read_plain(plain)


@pytest.mark.skipif(
    not (SHARED_AMAZON / "beauty").is_dir(),
    reason=f"shared Amazon data not found at {SHARED_AMAZON}/beauty",
)
def test_read_plain_beauty():
    d = read_plain(SHARED_AMAZON / "beauty")
    assert (d.name, d.num_users, d.num_items, d.num_interactions) == ("beauty", 22363, 12101, 198502)
    assert min(len(s) for s in d.sequences) >= 5
    assert all(d.titles)


# --------------------------------------------------------------------------- raw dumps


@pytest.mark.parametrize("year", [2014, 2018, 2023])
def test_read_raw_fixture(year: int):
    interactions, titles = read_raw(RAW / str(year), CATEGORY[year], year)
    n_dup = 2 if year == 2023 else 1
    assert len(interactions) == 39 + n_dup  # every line, duplicates included, file order kept
    users = {u for u, _, _ in interactions}
    items = {i for _, i, _ in interactions}
    assert len(users) == 8 and len(items) == 9
    assert all(isinstance(t, int) and 1.3e9 < t < 1.8e9 for _, _, t in interactions)  # seconds
    # titles: reviewed items only; I8 has no usable title (absent in 2014, empty in 2023, a bare
    # tag in 2018 that only cleaning empties) and I9 is missing from the meta file
    assert len(titles) == (7 if year != 2018 else 8)
    assert not any(k.endswith(("09", "11", "12")) for k in titles)


def test_read_raw_quirks():
    _, t14 = read_raw(RAW / "2014", "Beauty", 2014)
    assert t14["B0014ITM02"] == "L'Oreal Paris Voluminous Mascara, Black"  # Python literal line
    _, t18 = read_raw(RAW / "2018", "Beauty", 2018)
    assert t18["B0018ITM03"] == "Burt&#39;s Bees Beeswax Lip Balm &amp; Tint"  # raw, uncleaned
    assert t18["B0018ITM01"] == "Neutrogena Oil-Free Acne Wash, 6 Fl. Oz"  # first line wins
    inter23, _ = read_raw(RAW / "2023", "All_Beauty", 2023)
    assert all(i.startswith("B0023PAR") for _, i, _ in inter23)  # parent_asin, never the variant
    raw = gzip.decompress((RAW / "2023/All_Beauty.jsonl.gz").read_bytes()).splitlines()[0]
    assert inter23[0][2] == json.loads(raw)["timestamp"] // 1000


def test_read_raw_2018_full_file():
    five, _ = read_raw(RAW / "2018", "Beauty", 2018)
    full, _ = read_raw(RAW / "2018", "Beauty", 2018, prefer_5core=False)
    assert len(full) == len(five) + 6
    reviews, meta = find_raw_files(RAW / "2018", "Beauty", 2018, prefer_5core=False)
    assert (reviews.name, meta.name) == ("Beauty.json.gz", "meta_Beauty.json.gz")


def test_compression_is_detected_by_content(tmp_path: Path):
    # the gzip reviews under a plain name, the plain meta under a .gz name
    src = RAW / "2014"
    (tmp_path / "reviews_Beauty_5.json").write_bytes((src / "reviews_Beauty_5.json.gz").read_bytes())
    shutil.copy(src / "meta_Beauty.json", tmp_path / "meta_Beauty.json.gz")
    assert read_raw(tmp_path, "Beauty", 2014) == read_raw(src, "Beauty", 2014)


def test_missing_files_name_the_download_command(tmp_path: Path):
    with pytest.raises(DataError) as e:
        read_raw(tmp_path, "Beauty", 2014)
    msg = str(e.value)
    assert "reviews_Beauty_5.json.gz" in msg
    assert f"python -m recsys.data.download --category Beauty --year 2014 --root {tmp_path}" in msg

    shutil.copy(RAW / "2023/All_Beauty.jsonl.gz", tmp_path)
    with pytest.raises(DataError, match=r"meta_All_Beauty\.jsonl\.gz.*--year 2023"):
        read_raw(tmp_path, "All_Beauty", 2023)
    with pytest.raises(DataError, match="unknown Amazon review data year"):
        read_raw(tmp_path, "Beauty", 2020)


def _copy_with_line(src: Path, dst: Path, lineno: int, line: str, gz: bool) -> None:
    data = src.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    lines = data.decode().splitlines()
    lines[lineno - 1] = line
    out = ("\n".join(lines) + "\n").encode()
    dst.write_bytes(gzip.compress(out) if gz else out)


@pytest.mark.parametrize("year,which,line,error", [
    (2014, "reviews", '{"reviewerID": "A1", "asin": "B1", "unixRev', r"line 4: malformed JSON"),
    (2014, "reviews", '{"reviewerID": "A1", "asin": "B1"}', r"line 4: missing field 'unixReviewTime'"),
    (2014, "meta", "{'asin': 'B0014ITM01', 'title': 'unterminated}", r"line 4: neither JSON nor"),
    (2018, "meta", '{"asin": "B0018ITM01", "title": ', r"line 4: malformed JSON"),
    (2023, "reviews", '{"user_id": "U", "parent_asin": "P", "timestamp": "soon"}',
     r"line 4: field 'timestamp' must be a number"),
    (2023, "meta", '["not", "an", "object"]', r"line 4: expected a JSON object"),
])
def test_malformed_line_names_file_and_line(tmp_path, year, which, line, error):
    reviews, meta = find_raw_files(RAW / str(year), CATEGORY[year], year)
    for p in (reviews, meta):
        if (which == "reviews") == (p is reviews):
            _copy_with_line(p, tmp_path / p.name, 4, line, gz=p.suffix == ".gz")
            bad = p.name
        else:
            shutil.copy(p, tmp_path / p.name)
    with pytest.raises(DataError, match=rf"{bad}, {error}"):
        read_raw(tmp_path, CATEGORY[year], year)


def test_truncated_gzip(tmp_path: Path):
    data = (RAW / "2014/reviews_Beauty_5.json.gz").read_bytes()
    (tmp_path / "reviews_Beauty_5.json.gz").write_bytes(data[: len(data) // 2])
    shutil.copy(RAW / "2014/meta_Beauty.json", tmp_path)
    with pytest.raises(DataError, match="reviews_Beauty_5.json.gz: corrupt or truncated gzip"):
        read_raw(tmp_path, "Beauty", 2014)
