"""Tests for anomaly_models.data.download against a real HTTP server on 127.0.0.1.

The server supports Range requests and can be told to cut a transfer short, so resuming
and interrupted downloads are tested end to end; no test touches the network.
"""

from __future__ import annotations

import hashlib
import io
import random
import socket
import tarfile
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from anomaly_models.data.download import (
    MVTEC_CATEGORIES,
    SOURCES,
    Source,
    download_dataset,
    download_file,
    extract_archive,
)
from anomaly_models.errors import DataError, DownloadError

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24  # header-only stand-in: the downloader never decodes images

MVTEC_LIKE = {
    "bottle/train/good/000.png": PNG,
    "bottle/train/good/001.png": PNG[::-1],
    "bottle/test/broken_large/000.png": PNG + random.Random(0).randbytes(50_000),  # incompressible bulk
    "bottle/ground_truth/broken_large/000_mask.png": PNG,
    "bottle/readme.txt": b"tiny MVTec-like folder\n" * 200,
}


class RangeHandler(BaseHTTPRequestHandler):
    """Serves files from ``server.root``; honours ``Range: bytes=N-`` with 206 Partial Content.

    ``server.ignore_range = True`` answers 200 with the whole file, like servers without
    Range support. ``server.cut_after[path] = n`` makes the next request for ``path``
    announce the full length but send only ``n`` bytes and drop the connection (used
    once, then forgotten).
    Every request is recorded in ``server.seen`` as (path, Range header or None).
    """

    def do_GET(self) -> None:
        server = self.server
        path = self.path.split("?")[0]
        server.seen.append((path, self.headers.get("Range")))
        file = server.root / path.lstrip("/")
        if not file.is_file():
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        data = file.read_bytes()
        start = 0
        range_header = None if server.ignore_range else self.headers.get("Range")
        if range_header:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(HTTPStatus.PARTIAL_CONTENT)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(HTTPStatus.OK)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = server.cut_after.pop(path, None)
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, format: str, *args) -> None:  # keep test output clean
        pass


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """A proxy from the environment must not intercept requests to 127.0.0.1."""
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.root, httpd.seen, httpd.cut_after, httpd.ignore_range = root, [], {}, False
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def make_tar_gz(
    path: Path, files: dict[str, bytes], *, extra: list[tarfile.TarInfo] = (), mode: str = "w:gz"
) -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"evil\n") if info.isreg() else None)
    return path


def evil_file(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(b"evil\n")
    return info


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def served_archive(server) -> Path:
    return make_tar_gz(server.root / "bottle.tar.gz", MVTEC_LIKE)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_download_verifies_checksum_and_extracts(server, tmp_path):
    archive = served_archive(server)
    dest = download_file(f"{server.url}/bottle.tar.gz", tmp_path / "dl" / "bottle.tar.gz",
                         sha256=sha256(archive), progress=False)
    assert dest.read_bytes() == archive.read_bytes()
    assert not dest.with_name("bottle.tar.gz.part").exists()

    target = extract_archive(dest, tmp_path / "data")
    for name, data in MVTEC_LIKE.items():
        assert (target / name).read_bytes() == data
    assert leftovers(tmp_path) == ["data", "dl", "served"]  # no temporary folder left


@pytest.mark.parametrize("mode,suffix", [("w:xz", ".tar.xz"), ("w", ".tar"), ("w:bz2", ".tar.bz2")])
def test_other_tar_formats_extract(tmp_path, mode, suffix):
    archive = make_tar_gz(tmp_path / f"bottle{suffix}", MVTEC_LIKE, mode=mode)
    target = extract_archive(archive, tmp_path / "data")
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*.png")) == sorted(
        n for n in MVTEC_LIKE if n.endswith(".png")
    )


def test_existing_entries_in_target_are_kept(tmp_path):
    archive = make_tar_gz(tmp_path / "a.tar.gz", {"bottle/x.txt": b"new", "cable/y.txt": b"new"})
    (tmp_path / "data" / "bottle").mkdir(parents=True)
    (tmp_path / "data" / "bottle" / "x.txt").write_bytes(b"old")
    extract_archive(archive, tmp_path / "data")
    assert (tmp_path / "data" / "bottle" / "x.txt").read_bytes() == b"old"
    assert (tmp_path / "data" / "cable" / "y.txt").read_bytes() == b"new"
    assert leftovers(tmp_path) == ["a.tar.gz", "data"]


def test_md5_is_checked_too(server, tmp_path):
    archive = served_archive(server)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    dest = download_file(f"{server.url}/bottle.tar.gz", tmp_path / "a.tar.gz", md5=md5, progress=False)
    assert dest.exists()
    with pytest.raises(DownloadError, match="md5"):
        download_file(f"{server.url}/bottle.tar.gz", tmp_path / "b.tar.gz", md5="0" * 32, progress=False)


def test_existing_file_with_right_checksum_is_not_downloaded_again(server, tmp_path):
    archive = served_archive(server)
    dest = tmp_path / "bottle.tar.gz"
    dest.write_bytes(archive.read_bytes())
    download_file(f"{server.url}/bottle.tar.gz", dest, sha256=sha256(archive), progress=False)
    assert server.seen == []


def test_checksum_mismatch_deletes_everything(server, tmp_path):
    served_archive(server)
    dest = tmp_path / "bottle.tar.gz"
    url = f"{server.url}/bottle.tar.gz"
    with pytest.raises(DownloadError) as info:
        download_file(url, dest, sha256="0" * 64, progress=False)
    message = str(info.value)
    assert url in message and "0" * 64 in message and sha256(server.root / "bottle.tar.gz") in message
    assert leftovers(tmp_path) == ["served"]  # neither dest nor dest.part


def test_resume_requests_only_the_rest(server, tmp_path):
    archive = served_archive(server)
    data = archive.read_bytes()
    dest = tmp_path / "bottle.tar.gz"
    half = len(data) // 2
    dest.with_name("bottle.tar.gz.part").write_bytes(data[:half])

    download_file(f"{server.url}/bottle.tar.gz", dest, sha256=sha256(archive), progress=False)
    assert server.seen == [("/bottle.tar.gz", f"bytes={half}-")]
    assert dest.read_bytes() == data


def test_part_file_longer_than_the_file_restarts_from_scratch(server, tmp_path):
    archive = served_archive(server)
    dest = tmp_path / "bottle.tar.gz"
    dest.with_name("bottle.tar.gz.part").write_bytes(b"x" * (len(archive.read_bytes()) + 10))
    download_file(f"{server.url}/bottle.tar.gz", dest, sha256=sha256(archive), progress=False)
    assert [r for _, r in server.seen] == [f"bytes={len(archive.read_bytes()) + 10}-", None]  # 416, then all
    assert dest.read_bytes() == archive.read_bytes()


def test_server_without_range_support_restarts_from_scratch(server, tmp_path):
    archive = served_archive(server)
    data = archive.read_bytes()
    dest = tmp_path / "bottle.tar.gz"
    dest.with_name("bottle.tar.gz.part").write_bytes(b"x" * 100)  # would corrupt the file if appended to
    server.ignore_range = True
    download_file(f"{server.url}/bottle.tar.gz", dest, sha256=sha256(archive), progress=False)
    assert dest.read_bytes() == data


def test_interrupted_transfer_then_retry_completes(server, tmp_path):
    archive = served_archive(server)
    data = archive.read_bytes()
    dest = tmp_path / "bottle.tar.gz"
    url = f"{server.url}/bottle.tar.gz"
    server.cut_after["/bottle.tar.gz"] = 1000

    with pytest.raises(DownloadError, match="interrupted") as info:
        download_file(url, dest, sha256=sha256(archive), progress=False)
    assert url in str(info.value)
    part = dest.with_name("bottle.tar.gz.part")
    assert part.read_bytes() == data[:1000] and not dest.exists()

    download_file(url, dest, sha256=sha256(archive), progress=False)
    assert server.seen[-1] == ("/bottle.tar.gz", "bytes=1000-")
    assert dest.read_bytes() == data and not part.exists()


def test_http_error_names_url(server, tmp_path):
    url = f"{server.url}/missing.tar.gz"
    with pytest.raises(DownloadError, match="404") as info:
        download_file(url, tmp_path / "missing.tar.gz", progress=False)
    assert url in str(info.value)
    assert leftovers(tmp_path) == ["served"]


def test_unreachable_url_names_url(tmp_path):
    with socket.socket() as s:  # bind then close: nothing listens on this port any more
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.tar.gz"
    with pytest.raises(DownloadError) as info:
        download_file(url, tmp_path / "x.tar.gz", timeout=5, progress=False)
    assert url in str(info.value) and "refused" in str(info.value)


@pytest.mark.parametrize(
    "evil",
    [
        pytest.param(lambda tmp: evil_file("../evil.txt"), id="dotdot"),
        pytest.param(lambda tmp: evil_file("bottle/../../evil.txt"), id="nested-dotdot"),
        pytest.param(lambda tmp: evil_file(str(tmp / "abs_evil.txt")), id="absolute"),
        pytest.param(lambda tmp: _symlink("bottle/link", "../../evil.txt"), id="symlink-escape"),
    ],
)
def test_unsafe_archive_is_refused_and_nothing_is_left(tmp_path, evil):
    base = tmp_path / "base"
    base.mkdir()
    bad = evil(tmp_path)
    archive = make_tar_gz(tmp_path / "evil.tar.gz", MVTEC_LIKE, extra=[bad])  # safe members first

    with pytest.raises(DownloadError) as info:
        extract_archive(archive, base / "data")
    assert str(archive) in str(info.value) and bad.name in str(info.value)
    assert leftovers(base) == []  # no target folder, no temporary folder
    assert leftovers(tmp_path) == ["base", "evil.tar.gz"]  # nothing escaped either


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_archive_leaves_nothing_half_extracted(tmp_path, damage):
    archive = make_tar_gz(tmp_path / "corrupt.tar.gz", MVTEC_LIKE)
    data = bytearray(archive.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        for i in range(len(data) // 2, len(data) // 2 + 16):
            data[i] ^= 0xFF
    archive.write_bytes(bytes(data))
    base = tmp_path / "base"
    base.mkdir()
    (base / "data").mkdir()
    (base / "data" / "keep.txt").write_text("existing\n")

    with pytest.raises(DownloadError, match="corrupt or truncated") as info:
        extract_archive(archive, base / "data")
    assert str(archive) in str(info.value)
    assert leftovers(base) == ["data"]
    assert leftovers(base / "data") == ["keep.txt"]


def test_download_dataset_end_to_end(server, tmp_path):
    archive = served_archive(server)
    sources = {
        "mvtec": {
            "bottle": Source(
                filename="bottle.tar.gz",
                urls=(f"{server.url}/gone.tar.gz", f"{server.url}/bottle.tar.gz"),  # first mirror 404s
                extracts_to=("bottle",),
                sha256=sha256(archive),
            ),
        },
    }
    root = tmp_path / "datasets"
    folder = download_dataset("mvtec", root, category="bottle", sources=sources)
    assert folder == root / "bottle"
    assert (folder / "train" / "good" / "000.png").read_bytes() == PNG
    assert leftovers(root) == ["bottle"]  # archive deleted after extraction
    assert leftovers(tmp_path) == ["datasets", "served"]

    requests = len(server.seen)
    assert download_dataset("mvtec", root, category="bottle", sources=sources) == folder
    assert len(server.seen) == requests  # already there: skipped


def test_download_without_checksum_warns(server, tmp_path, caplog):
    served_archive(server)
    sources = {"cifar10": {None: Source("c.tar.gz", (f"{server.url}/bottle.tar.gz",), ("bottle",))}}
    with caplog.at_level("WARNING", logger="anomaly_models.data.download"):
        folder = download_dataset("cifar10", tmp_path / "root", sources=sources)
    assert folder == tmp_path / "root" / "bottle"
    assert "could not be verified" in caplog.text


def test_unknown_dataset_lists_allowed_names(tmp_path):
    with pytest.raises(DataError) as info:
        download_dataset("imagenet", tmp_path)
    assert "imagenet" in str(info.value) and "cifar10" in str(info.value) and "mvtec" in str(info.value)


def test_unknown_category_lists_allowed_categories(tmp_path):
    with pytest.raises(DataError) as info:
        download_dataset("mvtec", tmp_path, category="bottel")
    message = str(info.value)
    assert "bottel" in message and "bottle" in message and "zipper" in message
    with pytest.raises(DataError, match="no categories"):
        download_dataset("cifar10", tmp_path, category="bottle")
    assert leftovers(tmp_path) == []


def test_builtin_table_is_complete():
    assert set(SOURCES["mvtec"]) == {None, *MVTEC_CATEGORIES} and len(MVTEC_CATEGORIES) == 15
    for source in [*SOURCES["mvtec"].values(), *SOURCES["cifar10"].values()]:
        assert source.urls and all(url.startswith("https://") for url in source.urls)
        assert all(url.endswith(source.filename) for url in source.urls)
    assert SOURCES["cifar10"][None].md5 == "c58f30108f718f92721af3b95e74349a"
    assert SOURCES["mvtec"][None].sha256 == "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
    for category in MVTEC_CATEGORIES:  # no published checksum: must say so, not guess one
        assert SOURCES["mvtec"][category].sha256 is None and SOURCES["mvtec"][category].md5 is None


def test_offline_without_a_local_copy_says_where_the_data_was_looked_for(server, tmp_path, monkeypatch):
    """What a fresh clone without ../shared/data meets offline: the failed download, and the
    setting that would have read a local copy instead."""
    from dataclasses import replace

    from anomaly_models.config import load_params
    from anomaly_models.data.download import materialise_dataset

    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv("ANOMALY_DATA_DIR", str(empty))
    bottle = SOURCES["mvtec"]["bottle"]
    monkeypatch.setitem(SOURCES["mvtec"], "bottle", replace(bottle, urls=(f"{server.url}/gone.tar.xz",)))
    data = replace(load_params(Path(__file__).resolve().parents[1] / "params.yaml").data, root=None)
    with pytest.raises(DownloadError) as info:
        materialise_dataset(data, tmp_path / "project-data")
    message = str(info.value)
    assert f"{server.url}/gone.tar.xz" in message and "404" in message
    assert str(empty / "mvtec_ad" / "bottle") in message and "ANOMALY_DATA_DIR" in message
    assert not (tmp_path / "project-data").exists() or not any((tmp_path / "project-data").rglob("*.png"))
