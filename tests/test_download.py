"""Download against a loopback HTTP server serving the fixture dumps (no other network)."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from recsys.data import download as dl
from recsys.data.download import DownloadError, download, file_urls, main
from recsys.data.readers import read_raw

RAW = Path(__file__).parent / "fixtures" / "raw"
# served under the official names: the plain meta file too, as downloaded files keep the URL's
# name (the reader tells gzip from plain by content)
FILES = {
    "reviews_Beauty_5.json.gz": (RAW / "2014/reviews_Beauty_5.json.gz").read_bytes(),
    "meta_Beauty.json.gz": (RAW / "2014/meta_Beauty.json").read_bytes(),
}


class Handler(BaseHTTPRequestHandler):
    """Serves ``server.files`` with Range support; ``server.mode`` bends the rules:
    ``ignore_range`` answers 200 with the whole file, ``cut`` sends half the body and hangs up."""

    def do_GET(self):
        srv = self.server
        name = self.path.rsplit("/", 1)[-1]
        srv.requests.append((name, self.headers.get("Range")))
        data = srv.files.get(name)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and srv.mode != "ignore_range":
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.mode == "cut":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.mode, srv.requests = dict(FILES), "normal", []
    thread = threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/mirror"
    yield srv
    srv.shutdown()
    srv.server_close()


def test_official_urls():
    assert file_urls("Beauty", 2014) == [
        "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_Beauty_5.json.gz",
        "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/meta_Beauty.json.gz",
    ]
    assert file_urls("Beauty", 2018) == [
        "https://jmcauley.ucsd.edu/data/amazon_v2/categoryFilesSmall/Beauty_5.json.gz",
        "https://jmcauley.ucsd.edu/data/amazon_v2/metaFiles2/meta_Beauty.json.gz",
    ]
    base = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/raw"
    assert file_urls("All_Beauty", 2023) == [
        f"{base}/review_categories/All_Beauty.jsonl.gz",
        f"{base}/meta_categories/meta_All_Beauty.jsonl.gz",
    ]
    assert file_urls("Beauty", 2018, base_url="http://m/x/")[0] == "http://m/x/Beauty_5.json.gz"


def test_fresh_download_reads_back(server, tmp_path: Path):
    sums = {n: hashlib.sha256(b).hexdigest() for n, b in FILES.items()}
    paths = download("Beauty", 2014, tmp_path, base_url=server.url, sha256=sums)
    assert [p.name for p in paths] == list(FILES)
    assert all(p.read_bytes() == FILES[p.name] for p in paths)
    assert not list(tmp_path.glob("*.part"))
    assert read_raw(tmp_path, "Beauty", 2014) == read_raw(RAW / "2014", "Beauty", 2014)

    server.requests.clear()
    download("Beauty", 2014, tmp_path, base_url=server.url)  # complete files: skipped
    assert server.requests == []
    download("Beauty", 2014, tmp_path, base_url=server.url, force=True, show_progress=False)
    assert len(server.requests) == 2


@pytest.mark.parametrize("mode", ["normal", "ignore_range"])
def test_resume_from_part(server, tmp_path: Path, mode: str):
    server.mode = mode
    name = "reviews_Beauty_5.json.gz"
    (tmp_path / f"{name}.part").write_bytes(FILES[name][:300])
    download("Beauty", 2014, tmp_path, base_url=server.url, show_progress=False)
    assert (tmp_path / name).read_bytes() == FILES[name]
    assert (name, "bytes=300-") in server.requests  # asked to resume; restarted if ignored
    assert not (tmp_path / f"{name}.part").exists()


def test_interrupted_transfer_resumes_next_time(server, tmp_path: Path):
    name = "reviews_Beauty_5.json.gz"
    server.mode = "cut"
    with pytest.raises(DownloadError, match=r"run the same command again to resume"):
        download("Beauty", 2014, tmp_path, base_url=server.url, show_progress=False)
    part = tmp_path / f"{name}.part"
    assert 0 < part.stat().st_size < len(FILES[name]) and not (tmp_path / name).exists()
    server.mode = "normal"
    download("Beauty", 2014, tmp_path, base_url=server.url, show_progress=False)
    assert (tmp_path / name).read_bytes() == FILES[name]


def test_oversized_part_restarts(server, tmp_path: Path):
    name = "reviews_Beauty_5.json.gz"
    (tmp_path / f"{name}.part").write_bytes(b"x" * (len(FILES[name]) + 5))  # server says 416
    download("Beauty", 2014, tmp_path, base_url=server.url, show_progress=False)
    assert (tmp_path / name).read_bytes() == FILES[name]


def test_http_error_names_url(server, tmp_path: Path):
    with pytest.raises(DownloadError, match=rf"HTTP 404 .*for {server.url}/reviews_Nope_5.json.gz"):
        download("Nope", 2014, tmp_path, base_url=server.url, show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_sha256_mismatch(server, tmp_path: Path):
    bad = {"reviews_Beauty_5.json.gz": "0" * 64}
    with pytest.raises(DownloadError, match="sha256"):
        download("Beauty", 2014, tmp_path, base_url=server.url, sha256=bad, show_progress=False)
    assert not list(tmp_path.glob("reviews_*"))


def test_cli(server, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr(dl, "TIMEOUT_S", 5)
    rc = main(["--category", "Beauty", "--year", "2014", "--root", str(tmp_path),
               "--base-url", server.url])
    assert rc == 0
    assert str(tmp_path / "meta_Beauty.json.gz") in capsys.readouterr().out
    rc = main(["--category", "Nope", "--year", "2014", "--root", str(tmp_path),
               "--base-url", server.url])
    assert rc == 1 and "HTTP 404" in capsys.readouterr().err
