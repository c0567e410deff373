"""download() against a local HTTP server that can ignore Range, cut connections or 404."""

from __future__ import annotations

import hashlib
import random
import socket

import pytest
import tqdm

from pneumojax.data.download import DownloadError, download

PAYLOAD = random.Random(0).randbytes(300_000)
MD5 = hashlib.md5(PAYLOAD).hexdigest()
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
HINT = "Download it yourself and place it at DEST."


@pytest.fixture
def server(http_server):
    http_server.files["/a.bin"] = PAYLOAD
    return http_server


def test_md5_then_cache(server, tmp_path):
    dest = tmp_path / "sub" / "a.bin"
    assert download(f"{server.base}/a.bin", dest, md5=MD5) == dest
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/a.bin", None)]
    assert download(f"{server.base}/a.bin", dest, md5=MD5, progress=False) == dest
    assert len(server.requests) == 1


def test_sha256_prefix_case_insensitive(server, tmp_path):
    dest = tmp_path / "a.bin"
    download(f"{server.base}/a.bin", dest, sha256=SHA256[:8].upper(), progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_corrupt_dest_is_replaced(server, tmp_path):
    dest = tmp_path / "a.bin"
    dest.write_bytes(b"stale")
    download(f"{server.base}/a.bin", dest, md5=MD5, sha256=SHA256, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_wrong_checksum(server, tmp_path):
    dest, url = tmp_path / "a.bin", f"{server.base}/a.bin"
    with pytest.raises(DownloadError) as err:
        download(url, dest, md5="0" * 32, progress=False)
    assert url in str(err.value) and "0" * 32 in str(err.value) and MD5 in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_resume_sends_range(server, tmp_path):
    dest = tmp_path / "a.bin"
    (tmp_path / "a.bin.partial").write_bytes(PAYLOAD[:100_000])
    download(f"{server.base}/a.bin", dest, sha256=SHA256, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/a.bin", "bytes=100000-")]
    assert not (tmp_path / "a.bin.partial").exists()


def test_complete_partial_restarts_after_416(server, tmp_path):
    (tmp_path / "a.bin.partial").write_bytes(PAYLOAD + b"junk")
    download(f"{server.base}/a.bin", tmp_path / "a.bin", md5=MD5, progress=False)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD
    assert server.requests == [("/a.bin", f"bytes={len(PAYLOAD) + 4}-"), ("/a.bin", None)]


def test_no_range_support_restarts(server, tmp_path):
    server.mode = "no_range"
    (tmp_path / "a.bin.partial").write_bytes(b"x" * 100_000)
    download(f"{server.base}/a.bin", tmp_path / "a.bin", md5=MD5, progress=False)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD


def test_cut_connection_then_resume(server, tmp_path):
    dest, url = tmp_path / "a.bin", f"{server.base}/a.bin"
    server.mode = "cut"
    with pytest.raises(DownloadError, match="a.bin") as err:
        download(url, dest, md5=MD5, hint=HINT, progress=False)
    assert url in str(err.value) and HINT in str(err.value)
    assert not dest.exists()
    assert (tmp_path / "a.bin.partial").stat().st_size == len(PAYLOAD) // 2
    server.mode = "range"
    download(url, dest, md5=MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/a.bin", f"bytes={len(PAYLOAD) // 2}-")


def test_404_names_url_and_hint(server, tmp_path):
    url = f"{server.base}/missing.bin"
    with pytest.raises(DownloadError) as err:
        download(url, tmp_path / "m.bin", md5=MD5, hint=HINT, progress=False)
    assert url in str(err.value) and "404" in str(err.value) and HINT in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_port(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/a.bin"
    with pytest.raises(DownloadError) as err:
        download(url, tmp_path / "a.bin", md5=MD5, hint=HINT, progress=False, timeout=5)
    assert url in str(err.value) and HINT in str(err.value)
    assert not (tmp_path / "a.bin").exists()


@pytest.mark.parametrize("kwargs", [{}, {"sha256": "abc"}, {"md5": "z" * 32}])
def test_bad_or_missing_checksum(tmp_path, kwargs):
    with pytest.raises(ValueError):
        download("http://127.0.0.1:1/a.bin", tmp_path / "a.bin", **kwargs)


def test_ctrl_c_leaves_only_a_partial_that_the_next_call_resumes(server, tmp_path, monkeypatch):
    dest, url = tmp_path / "a.bin", f"{server.base}/a.bin"

    def interrupt(self, n):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(tqdm.tqdm, "update", interrupt)  # after the first chunk is on disk
        with pytest.raises(KeyboardInterrupt):
            download(url, dest, md5=MD5, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin.partial"]
    kept = (tmp_path / "a.bin.partial").read_bytes()
    assert kept and PAYLOAD.startswith(kept)
    download(url, dest, md5=MD5, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"] and dest.read_bytes() == PAYLOAD


def test_a_partial_with_wrong_bytes_is_never_trusted(server, tmp_path):
    dest, url = tmp_path / "a.bin", f"{server.base}/a.bin"
    (tmp_path / "a.bin.partial").write_bytes(b"x" * 100_000)  # resumed, so the whole fails
    with pytest.raises(DownloadError, match="Checksum mismatch"):
        download(url, dest, md5=MD5, progress=False)
    assert list(tmp_path.iterdir()) == []
    download(url, dest, md5=MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD
