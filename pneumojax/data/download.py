"""The one place pneumojax fetches files: verified, atomic and resumable.

Data sets (MedMNIST from Zenodo) and pretrained weights (Keras .h5 with an MD5,
torchvision .pth named by the head of its SHA-256, safetensors) all come through
`download`, so no file reaches disk under its final name unless its checksum matched.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pathlib
import string
import urllib.error
import urllib.request

import tqdm

_CHUNK = 1 << 20
# Some hosts (Zenodo among them) refuse urllib's default "Python-urllib/3.x".
_USER_AGENT = "pneumojax/0.1"


class DownloadError(RuntimeError):
    """A transfer failed or the file it produced did not match its checksum."""


def _check_hex(name: str, value: str, min_len: int, max_len: int) -> str:
    value = value.lower()
    if not min_len <= len(value) <= max_len or not set(value) <= set(string.hexdigits.lower()):
        raise ValueError(f"{name} must be {min_len} to {max_len} hex chars, got {value!r}")
    return value


def _mismatch(path: pathlib.Path, md5: str | None, sha256: str | None) -> str | None:
    """Returns why `path` fails its checksums, or None if it passes (one read for both)."""
    hashers = {"md5": hashlib.md5(), "sha256": hashlib.sha256()}
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            for h in hashers.values():
                h.update(chunk)
    got = {name: h.hexdigest() for name, h in hashers.items()}
    if md5 is not None and got["md5"] != md5:
        return f"expected md5 {md5}, got {got['md5']}"
    if sha256 is not None and not got["sha256"].startswith(sha256):
        return f"expected sha256 {sha256}{'...' if len(sha256) < 64 else ''}, got {got['sha256']}"
    return None


def _fetch(url: str, partial: pathlib.Path, timeout: float, progress: bool) -> None:
    """Streams url into `partial`, resuming from its current size when the server allows."""
    offset = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise
        # The partial is already as long as (or longer than) the file: start over.
        partial.unlink()
        return _fetch(url, partial, timeout, progress)
    with response:
        if response.status != 206:
            offset = 0  # The server ignored Range and sends the whole file.
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        received = 0
        with (
            open(partial, "ab" if offset else "wb") as f,
            tqdm.tqdm(
                total=None if expected is None else offset + expected,
                initial=offset,
                unit="B",
                unit_scale=True,
                desc=partial.name.removesuffix(".partial"),
                disable=not progress,
            ) as bar,
        ):
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    # http.client returns b"" rather than raising when a sized body is cut short.
    if expected is not None and received < expected:
        raise http.client.IncompleteRead(b"", expected - received)


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    hint: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> pathlib.Path:
    """Fetch url to dest, verified and atomic; returns dest.

    `sha256` may be a prefix of 8+ hex chars, as in torchvision file names. An existing
    dest that verifies is returned without network access. A failed transfer keeps
    `dest.partial` so the next call resumes; a checksum mismatch deletes it.
    """
    if md5 is None and sha256 is None:
        raise ValueError(f"download({url!r}) needs md5 or sha256: unverified files are not allowed")
    md5 = None if md5 is None else _check_hex("md5", md5, 32, 32)
    sha256 = None if sha256 is None else _check_hex("sha256", sha256, 8, 64)
    dest = pathlib.Path(dest)
    if dest.is_file() and _mismatch(dest, md5, sha256) is None:
        return dest
    suffix = f"\n{hint}" if hint else ""
    partial = dest.with_name(dest.name + ".partial")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        _fetch(url, partial, timeout, progress)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"Could not download {url}: HTTP {e.code} {e.reason}.{suffix}") from e
    except urllib.error.URLError as e:
        raise DownloadError(f"Could not download {url}: {e.reason}.{suffix}") from e
    except http.client.IncompleteRead as e:
        cause = f"connection closed with {e.expected} bytes still to come"
        raise DownloadError(f"Could not download {url}: {cause}; retry to resume.{suffix}") from e
    except (OSError, http.client.HTTPException) as e:
        cause = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise DownloadError(f"Could not download {url}: {cause}; retry to resume.{suffix}") from e
    if (why := _mismatch(partial, md5, sha256)) is not None:
        partial.unlink()
        raise DownloadError(f"Checksum mismatch for {url}: {why}.{suffix}")
    os.replace(partial, dest)
    return dest
