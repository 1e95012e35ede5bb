"""Fetching checkpoints and other files into a local cache, verified by hash.

Runtime module: standard library plus tqdm, no torch.

* :func:`cache_dir` is ``$USAM_CACHE_DIR`` (read at every call) or ``~/.cache/usam_bioimageio``.
* :func:`fetch` downloads an http(s) URL into the cache atomically (a temporary file in the cache directory,
  hashed while it is written, moved into place with ``os.replace`` only once its hash matches), reuses a cached
  file only if its hash matches, and returns local files (plain paths and ``file://`` URLs) in place after
  checking their hash.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Dict, Optional

from usam_bioimageio.errors import ChecksumError, DownloadError
from usam_bioimageio.settings import CACHE_ENV_VAR, cache_dir

__all__ = [
    "CACHE_ENV_VAR",
    "ChecksumError",
    "DownloadError",
    "cache_dir",
    "fetch",
    "sha256_of",
    "xxh128_of",
]

DEFAULT_TIMEOUT = 60.0  # seconds, for connecting and for each read
_CHUNK = 1 << 20


def _hash_file(path: Path, hasher) -> str:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def sha256_of(path) -> str:
    """Hex sha256 of the file at ``path``, read in chunks."""
    return _hash_file(Path(path), hashlib.sha256())


def _xxh128():
    try:
        import xxhash
    except ImportError:
        raise RuntimeError(
            "Verifying an xxh128 hash needs the 'xxhash' package (pip install xxhash); "
            "or pass a sha256 hash instead."
        ) from None
    return xxhash.xxh128()


def xxh128_of(path) -> str:
    """Hex xxh128 of the file at ``path`` (micro-sam's hash); needs the ``xxhash`` package."""
    return _hash_file(Path(path), _xxh128())


def _normalise(digest: Optional[str], algorithm: str) -> Optional[str]:
    if digest is None:
        return None
    digest = digest.strip().lower()
    if digest.startswith(algorithm + ":"):
        digest = digest[len(algorithm) + 1 :]
    n = {"sha256": 64, "xxh128": 32}[algorithm]
    if len(digest) != n or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"Invalid {algorithm} hash {digest!r}: expected {n} hex digits")
    return digest


def _hashers(expected: Dict[str, str]) -> Dict[str, object]:
    """Hash objects for the expected digests. xxh128 is skipped when sha256 is checked and xxhash is missing."""
    out: Dict[str, object] = {}
    if "sha256" in expected:
        out["sha256"] = hashlib.sha256()
    if "xxh128" in expected:
        try:
            out["xxh128"] = _xxh128()
        except RuntimeError:
            if not out:
                raise
    return out


def _mismatches(expected: Dict[str, str], hashers: Dict[str, object]) -> Dict[str, str]:
    """algorithm -> actual digest for each checked hash that does not match."""
    return {a: h.hexdigest() for a, h in hashers.items() if h.hexdigest() != expected[a]}


def _verify_file(path: Path, expected: Dict[str, str]) -> Dict[str, str]:
    hashers = _hashers(expected)
    if hashers:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                for h in hashers.values():
                    h.update(chunk)
    return _mismatches(expected, hashers)


def _mismatch_message(what: str, expected: Dict[str, str], actual: Dict[str, str]) -> str:
    parts = [f"{a} {actual[a]} (expected {expected[a]})" for a in actual]
    return f"Hash mismatch for {what}: got " + "; ".join(parts)


def _local_path(url_or_path: str) -> Optional[Path]:
    """The local path for a plain path or a file:// URL, None for a remote URL."""
    parsed = urllib.parse.urlparse(url_or_path)
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"Unsupported file URL with a host: {url_or_path!r}")
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive, i.e. a path
        raise ValueError(f"Unsupported URL scheme {parsed.scheme!r} in {url_or_path!r}: use http(s), file or a path")
    return Path(url_or_path).expanduser()


def _default_filename(url: str) -> str:
    # Several hosts end every URL in ".../download": prefix the name with a hash of the whole URL.
    base = os.path.basename(urllib.parse.urlparse(url).path) or "download"
    return f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}"


def _check_filename(filename: str) -> str:
    if not filename or filename in (".", "..") or "/" in filename or "\\" in filename or "\0" in filename:
        raise ValueError(f"Invalid cache file name {filename!r}: a plain file name is expected")
    return filename


def _user_agent() -> str:
    try:
        from usam_bioimageio import __version__
    except Exception:  # pragma: no cover
        __version__ = "0"
    return f"usam-bioimageio/{__version__} (python urllib)"


def _download(url: str, target: Path, expected: Dict[str, str], progress: bool, timeout: float) -> None:
    """Download ``url`` to ``target`` via a temporary file in the same directory; nothing is left on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        hashers = _hashers(expected)
        request = urllib.request.Request(url, headers={"User-Agent": _user_agent()})
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise DownloadError(f"Download of {url} failed: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (socket.timeout, TimeoutError)):
                raise DownloadError(f"Download of {url} timed out after {timeout:g} s (no response)") from None
            raise DownloadError(f"Download of {url} failed: {e.reason}") from None
        except (socket.timeout, TimeoutError):
            raise DownloadError(f"Download of {url} timed out after {timeout:g} s (no response)") from None
        with response, os.fdopen(fd, "wb") as out:
            fd = -1
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            from tqdm.auto import tqdm

            received = 0
            with tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name,
                disable=not progress, leave=False,
            ) as bar:
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except (socket.timeout, TimeoutError):
                        raise DownloadError(
                            f"Download of {url} timed out after {timeout:g} s without data "
                            f"({received} bytes received)"
                        ) from None
                    except OSError as e:  # connection reset, http.client.IncompleteRead, ...
                        raise DownloadError(f"Download of {url} failed after {received} bytes: {e}") from None
                    if not chunk:
                        break
                    out.write(chunk)
                    for h in hashers.values():
                        h.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if total is not None and received != total:
                raise DownloadError(f"Download of {url} is truncated: {received} of {total} bytes received")
            out.flush()
            os.fsync(out.fileno())
        bad = _mismatches(expected, hashers)
        if bad:
            raise ChecksumError(_mismatch_message(f"the download of {url}", expected, bad) + "; nothing was kept")
        os.replace(tmp, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


def fetch(
    url_or_path: str,
    *,
    sha256: Optional[str],
    filename: Optional[str] = None,
    progress: bool = True,
    xxh128: Optional[str] = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Return a local, hash-checked copy of ``url_or_path``.

    Args:
        url_or_path: an http(s) URL (downloaded into :func:`cache_dir`), a ``file://`` URL or a local path
            (returned in place, not copied).
        sha256: the expected sha256 (hex, optionally prefixed ``sha256:``); ``None`` checks nothing, unless
            ``xxh128`` is given. A cached file is then reused as it is.
        filename: the name of the file in the cache; default: derived from the URL (a hash of the URL plus its
            last path component).
        progress: show a tqdm progress bar while downloading.
        xxh128: an expected xxh128 (micro-sam's hash), checked too; needs the ``xxhash`` package unless
            ``sha256`` is given as well (then xxh128 is checked only when xxhash is installed).
        timeout: seconds allowed for connecting and for each read.

    Raises:
        ChecksumError (a ValueError): the file's hash is wrong. A wrong download is deleted; a local file is
            left untouched.
        DownloadError (an OSError): HTTP error, unreachable host, timeout, truncated transfer.
        FileNotFoundError: a local path or file:// URL that does not exist.
    """
    expected = {
        a: d for a, d in (("sha256", _normalise(sha256, "sha256")), ("xxh128", _normalise(xxh128, "xxh128"))) if d
    }
    local = _local_path(str(url_or_path))
    if local is not None:
        if not local.is_file():
            shown = "" if local == Path(url_or_path) else f" ({url_or_path})"
            raise FileNotFoundError(f"No such file: {local}{shown}")
        bad = _verify_file(local, expected)
        if bad:
            raise ChecksumError(_mismatch_message(str(local), expected, bad) + "; refusing it")
        return local

    url = str(url_or_path)
    target = cache_dir() / _check_filename(filename or _default_filename(url))
    if target.is_file():
        if not _verify_file(target, expected):
            return target
        # A stale or corrupt cached copy: download again (the replacement is atomic).
    _download(url, target, expected, progress, timeout)
    return target
