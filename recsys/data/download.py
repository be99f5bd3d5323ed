"""Download the official Amazon review dumps (2014, 2018, 2023) of one category.

Nothing downloads unless asked::

    python -m recsys.data.download --category Beauty --year 2014 --root data/raw

Each file is written to ``<name>.part`` and renamed once its size matches Content-Length (and
its sha256 when one is given); an interrupted download resumes with an HTTP Range request
(restarting when the server ignores Range). Files already present are skipped unless ``force``.
The files land directly in ``root``, where :func:`recsys.data.readers.read_raw` looks for them.
Only ``urllib`` is used.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

from recsys.data.domain import DataError
from recsys.data.readers import YEARS, raw_file_stems

log = logging.getLogger("recsys.data")

# Official locations: year -> (folder of the 5-core reviews, of the full reviews, of the meta).
OFFICIAL_DIRS = {
    2014: (
        "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles",
        "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles",
        "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles",
    ),
    2018: (
        "https://jmcauley.ucsd.edu/data/amazon_v2/categoryFilesSmall",
        "https://jmcauley.ucsd.edu/data/amazon_v2/categoryFiles",
        "https://jmcauley.ucsd.edu/data/amazon_v2/metaFiles2",
    ),
    2023: (
        "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/raw/review_categories",
        "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/raw/review_categories",
        "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/raw/meta_categories",
    ),
}
CHUNK = 1 << 20
TIMEOUT_S = 60


class DownloadError(DataError):
    """A download failed: the message names the URL and what to do."""


def file_urls(
    category: str, year: int, five_core: bool = True, base_url: str | None = None
) -> list[str]:
    """URLs of the review file and the meta file of ``category``/``year``.

    ``five_core`` picks the 5-core review file (2014, 2018; 2023 has only one). ``base_url``
    replaces every official folder: a mirror (or a test server) serves all files flat under it.
    """
    if year not in YEARS:
        raise DataError(f"unknown Amazon review data year {year!r}: use one of {YEARS}")
    reviews_names, meta_name = raw_file_stems(category, year, prefer_5core=True)
    review_name = reviews_names[0] if five_core else reviews_names[-1]
    five_dir, full_dir, meta_dir = OFFICIAL_DIRS[year]
    if base_url is not None:
        five_dir = full_dir = meta_dir = base_url.rstrip("/")
    return [f"{five_dir if five_core else full_dir}/{review_name}", f"{meta_dir}/{meta_name}"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _open(url: str, offset: int):
    headers = {"User-Agent": "recsys-download/1"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            return None  # the .part is no prefix of the file: start again
        raise DownloadError(
            f"HTTP {e.code} {e.reason} for {url}: check the category spelling (as in the file "
            "names, e.g. Beauty, Sports_and_Outdoors, All_Beauty) and the year"
        ) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot reach {url}: {reason}") from None


def fetch(
    url: str,
    dest: str | Path,
    force: bool = False,
    sha256: str | None = None,
    progress=None,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a partial ``.part``.

    ``progress``: a started ``rich.progress.Progress`` to report to, or None for no bar.
    Raises DownloadError on HTTP errors, an interrupted transfer (run again to resume), a size
    that does not match Content-Length, or a sha256 mismatch.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    if dest.exists() and not force:
        if sha256 and _sha256(dest) != sha256:
            raise DownloadError(f"{dest} exists but its sha256 is not {sha256}; use --force")
        log.info("%s already present, skipped", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if force:
        part.unlink(missing_ok=True)

    offset = part.stat().st_size if part.exists() else 0
    resp = _open(url, offset)
    if resp is None:
        log.info("%s: the server refused to resume from byte %d; restarting", url, offset)
        part.unlink()
        offset = 0
        resp = _open(url, 0)
    with resp:
        total = _transfer(url, resp, part, offset, dest.name, progress)
    size = _check_part(url, part, total, sha256)
    os.replace(part, dest)
    log.info("downloaded %s (%d bytes) to %s", url, size, dest)
    return dest


def _transfer(url: str, resp, part: Path, offset: int, label: str, progress) -> int | None:
    """Write ``resp``'s body into ``part`` (appended from ``offset`` when the server resumes, else from the
    start); returns the file's announced total size (None: unknown)."""
    length = resp.headers.get("Content-Length")
    length = int(length) if length is not None and length.isdigit() else None
    total = length
    mode = "wb"
    if offset and resp.status == 206:
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", ""))
        if m is None or int(m.group(1)) != offset:
            raise DownloadError(f"{url}: unexpected Content-Range {resp.headers.get('Content-Range')!r}")
        total = int(m.group(3)) if m.group(3) != "*" else (offset + length if length else None)
        mode = "ab"
        log.info("%s: resuming at byte %d", url, offset)
    elif offset:
        log.info("%s: the server ignored the Range request; restarting", url)
        offset = 0
    task = None
    if progress is not None:
        task = progress.add_task(label, total=total, completed=offset)
    done = offset
    try:
        with open(part, mode) as f:
            while block := resp.read(CHUNK):
                f.write(block)
                done += len(block)
                if task is not None:
                    progress.update(task, completed=done)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, http.client.HTTPException) as e:
        raise DownloadError(
            f"download of {url} interrupted after {done} bytes ({type(e).__name__}: {e}); "
            "run the same command again to resume"
        ) from None
    return total


def _check_part(url: str, part: Path, total: int | None, sha256: str | None) -> int:
    """The downloaded ``part``'s size, after checking it against ``total`` and ``sha256`` (DownloadError, and
    the file removed when it cannot be resumed)."""
    size = part.stat().st_size
    if total is not None and size != total:
        if size < total:
            raise DownloadError(
                f"download of {url} incomplete: {size} of {total} bytes; "
                "run the same command again to resume"
            )
        part.unlink()
        raise DownloadError(f"download of {url} gave {size} bytes, more than the {total} announced")
    if sha256:
        got = _sha256(part)
        if got != sha256:
            part.unlink()
            raise DownloadError(f"download of {url}: sha256 {got} is not the expected {sha256}")
    return size


def download(
    category: str,
    year: int,
    root: str | Path,
    base_url: str | None = None,
    force: bool = False,
    five_core: bool = True,
    sha256: dict[str, str] | None = None,
    show_progress: bool = True,
) -> list[Path]:
    """Download the review and meta files of ``category``/``year`` into ``root``.

    ``sha256`` maps file names to expected digests (checked when given). Returns the two paths.
    """
    year = int(year)
    urls = file_urls(category, year, five_core, base_url)
    root = Path(root)
    sha256 = sha256 or {}
    paths = []
    progress = None
    if show_progress:
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)

        progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                            TransferSpeedColumn(), TimeRemainingColumn())
        progress.start()
    try:
        for url in urls:
            name = url.rsplit("/", 1)[1]
            paths.append(fetch(url, root / name, force, sha256.get(name), progress))
    finally:
        if progress is not None:
            progress.stop()
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recsys.data.download",
        description="Download the official Amazon review and meta files of one category.",
    )
    parser.add_argument("--category", required=True,
                        help="category as spelled in the file names, e.g. Beauty, All_Beauty")
    parser.add_argument("--year", required=True, type=int, choices=YEARS)
    parser.add_argument("--root", required=True, type=Path, help="folder to write the files to")
    parser.add_argument("--base-url", default=None, help="mirror serving all files flat")
    parser.add_argument("--full", action="store_true",
                        help="the full review file instead of the 5-core one (2014, 2018)")
    parser.add_argument("--force", action="store_true", help="download again even if present")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        paths = download(args.category, args.year, args.root, args.base_url, args.force,
                         five_core=not args.full)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
