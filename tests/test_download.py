"""usam_bioimageio.io.download against a local HTTP server (no network)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from loopback import serve
from usam_bioimageio.io import download
from usam_bioimageio.errors import ChecksumError, DownloadError
from usam_bioimageio.io.download import cache_dir, fetch, sha256_of

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # ~1 MiB, more than one read chunk




@pytest.fixture
def served(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    (root / "model.pt").write_bytes(PAYLOAD)
    with serve(root) as (base, requests):
        yield base, requests, root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("USAM_CACHE_DIR", str(d))
    return d


SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_cache_dir_env_read_at_call_time(tmp_path, monkeypatch):
    monkeypatch.delenv("USAM_CACHE_DIR", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "usam_bioimageio"
    monkeypatch.setenv("USAM_CACHE_DIR", str(tmp_path / "a"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.setenv("USAM_CACHE_DIR", str(tmp_path / "b"))
    assert cache_dir() == tmp_path / "b"


def test_sha256_of(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(PAYLOAD)
    assert sha256_of(p) == SHA
    assert sha256_of(str(p)) == SHA


def test_download_verified_and_cached(served, cache):
    base, requests, _ = served
    path = fetch(f"{base}/model.pt", sha256=SHA, filename="m.pt", progress=False)
    assert path == cache / "m.pt"
    assert path.read_bytes() == PAYLOAD
    assert requests == ["/model.pt"]
    # Second fetch: served from the cache, the server is not asked again.
    again = fetch(f"{base}/model.pt", sha256=SHA, filename="m.pt", progress=False)
    assert again == path
    assert requests == ["/model.pt"]
    assert sorted(p.name for p in cache.iterdir()) == ["m.pt"]  # no temporary files left


def test_sha256_prefix_and_case_accepted(served, cache):
    base, _, _ = served
    path = fetch(f"{base}/model.pt", sha256="sha256:" + SHA.upper(), progress=False)
    assert path.parent == cache and path.name.endswith("-model.pt")


def test_default_filenames_do_not_collide(served, cache):
    base, requests, root = served
    (root / "a").mkdir()
    (root / "b").mkdir()
    (root / "a" / "download").write_bytes(b"first")
    (root / "b" / "download").write_bytes(b"second")
    pa = fetch(f"{base}/a/download", sha256=None, progress=False)
    pb = fetch(f"{base}/b/download", sha256=None, progress=False)
    assert pa != pb and pa.read_bytes() == b"first" and pb.read_bytes() == b"second"


def test_wrong_hash_refused_and_nothing_kept(served, cache):
    base, requests, _ = served
    with pytest.raises(ChecksumError, match="Hash mismatch") as info:
        fetch(f"{base}/model.pt", sha256="0" * 64, filename="m.pt", progress=False)
    assert SHA in str(info.value)  # the actual hash is reported
    assert isinstance(info.value, ValueError)
    assert list(cache.iterdir()) == []


def test_stale_cached_file_is_replaced(served, cache):
    base, requests, _ = served
    cache.mkdir()
    (cache / "m.pt").write_bytes(b"stale or half-written")
    path = fetch(f"{base}/model.pt", sha256=SHA, filename="m.pt", progress=False)
    assert path.read_bytes() == PAYLOAD
    assert requests == ["/model.pt"]


def test_cached_file_reused_without_hash(served, cache):
    base, requests, _ = served
    cache.mkdir()
    (cache / "m.pt").write_bytes(b"whatever")
    assert fetch(f"{base}/model.pt", sha256=None, filename="m.pt", progress=False).read_bytes() == b"whatever"
    assert requests == []


def test_cache_dir_env_honoured(served, tmp_path, monkeypatch):
    base, _, _ = served
    monkeypatch.setenv("USAM_CACHE_DIR", str(tmp_path / "elsewhere"))
    path = fetch(f"{base}/model.pt", sha256=SHA, filename="m.pt", progress=False)
    assert path == tmp_path / "elsewhere" / "m.pt"


def test_http_404(served, cache):
    base, _, _ = served
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        fetch(f"{base}/missing.pt", sha256=None, progress=False)
    assert "missing.pt" in str(info.value)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_connection_refused(cache):
    import socket

    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="failed"):
        fetch(f"http://127.0.0.1:{port}/x.pt", sha256=None, progress=False, timeout=5)


def test_timeout(tmp_path, cache):
    import socket

    with socket.socket() as s:  # accepts connections (backlog) but never answers
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(DownloadError, match="timed out"):
            fetch(f"http://127.0.0.1:{port}/x.pt", sha256=None, progress=False, timeout=0.5)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_progress_bar(served, cache, capsys):
    base, _, _ = served
    fetch(f"{base}/model.pt", sha256=SHA, filename="m.pt", progress=True)
    err = capsys.readouterr().err
    assert "m.pt" in err


def test_file_url_and_plain_path(tmp_path, cache):
    p = tmp_path / "local.pt"
    p.write_bytes(PAYLOAD)
    assert fetch(p.as_uri(), sha256=SHA, progress=False) == p
    assert fetch(str(p), sha256=SHA, progress=False) == p
    assert fetch(str(p), sha256=None, progress=False) == p
    with pytest.raises(ChecksumError):
        fetch(p.as_uri(), sha256="1" * 64, progress=False)
    assert p.read_bytes() == PAYLOAD  # a local file is never touched
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        fetch(str(tmp_path / "nope.pt"), sha256=None, progress=False)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        fetch((tmp_path / "nope.pt").as_uri(), sha256=None, progress=False)
    assert not cache.exists()  # local files are not copied into the cache


def test_invalid_arguments(served, cache):
    base, _, _ = served
    with pytest.raises(ValueError, match="hex"):
        fetch(f"{base}/model.pt", sha256="abc", progress=False)
    with pytest.raises(ValueError, match="file name"):
        fetch(f"{base}/model.pt", sha256=None, filename="../escape.pt", progress=False)
    with pytest.raises(ValueError, match="scheme"):
        fetch("ftp://example.org/x.pt", sha256=None, progress=False)


def test_xxh128_needs_xxhash_unless_sha256_given(served, cache, monkeypatch):
    base, _, _ = served
    monkeypatch.setitem(sys.modules, "xxhash", None)  # import xxhash -> ImportError
    with pytest.raises(RuntimeError, match="xxhash"):
        fetch(f"{base}/model.pt", sha256=None, xxh128="0" * 32, progress=False)
    assert not cache.exists() or list(cache.iterdir()) == []
    # with a sha256 as well, the sha256 is checked and the download succeeds
    assert fetch(f"{base}/model.pt", sha256=SHA, xxh128="0" * 32, progress=False).read_bytes() == PAYLOAD


def test_xxh128_checked(served, cache):
    import xxhash
    base, _, _ = served
    good = xxhash.xxh128(PAYLOAD).hexdigest()
    with pytest.raises(ChecksumError):
        fetch(f"{base}/model.pt", sha256=None, xxh128="0" * 32, progress=False)
    assert download.xxh128_of(fetch(f"{base}/model.pt", sha256=None, xxh128="xxh128:" + good, progress=False)) == good
