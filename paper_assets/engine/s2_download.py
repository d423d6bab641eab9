"""Downloading S2 dataset files: resumable per file, sizes verified, several at once within a bound.

A file is fetched into ``<name>.part`` and renamed to ``<name>`` only once its size equals what the server said
the whole file holds (``Content-Range`` total, else ``Content-Length``). An interrupted download keeps its part
file; the next attempt asks for the rest with ``Range: bytes=<size>-`` and appends when the server answers 206
(206 is checked against the part's size; a 200 starts the file over). Pre-signed URLs expire, so callers ask the
API for fresh URLs on every attempt and files are matched by name, not by URL.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import requests

from .errors import UserError

CHUNK_BYTES = 1 << 16


class DownloadError(UserError):
    pass


class DownloadInterrupted(ConnectionError):
    """The connection broke mid-file: the part file keeps what arrived, and a retry resumes from there."""


@dataclass(frozen=True)
class Downloaded:
    path: Path
    bytes: int
    resumed_from: int  # bytes already on disk when this attempt started (0: a fresh download)
    reused: bool  # complete from an earlier attempt: nothing fetched


def file_name(url: str) -> str:
    name = os.path.basename(urlparse(url).path)
    if not name or name in (".", ".."):
        raise DownloadError(f"cannot name a local file after {url.split('?')[0]}")
    return name


def _expected_size(response: requests.Response, offset: int) -> int | None:
    content_range = response.headers.get("Content-Range", "")
    if response.status_code == 206:
        unit_range, _, total = content_range.partition("/")
        if not unit_range.startswith(f"bytes {offset}-"):
            raise DownloadError(f"server resumed at {content_range!r}, not at byte {offset}")
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def download(url: str, folder: Path, session: requests.Session | None = None, timeout: float = 60.0) -> Downloaded:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / file_name(url)
    if target.exists():
        return Downloaded(target, target.stat().st_size, target.stat().st_size, reused=True)
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    http = session or requests
    with http.get(url, headers=headers, stream=True, timeout=timeout) as response:
        if response.status_code == 416 and offset:  # the part is already the whole file
            expected, mode = offset, "ab"
        else:
            if response.status_code not in (200, 206):
                raise DownloadError(f"downloading {target.name}: HTTP {response.status_code} (a pre-signed URL "
                                    "may have expired; the next attempt asks S2 for fresh ones)")
            if response.status_code == 200:
                offset = 0
            expected = _expected_size(response, offset)
            mode = "ab" if offset else "wb"
            with open(part, mode) as handle:
                try:
                    for block in response.iter_content(CHUNK_BYTES):
                        handle.write(block)
                except requests.RequestException as err:
                    handle.flush()
                    raise DownloadInterrupted(f"{target.name}: the connection broke after {handle.tell():,} "
                                              "bytes; the next attempt resumes there") from err
                handle.flush()
                os.fsync(handle.fileno())
    size = part.stat().st_size
    if expected is not None and size != expected:
        raise DownloadError(f"{target.name}: {size:,} of {expected:,} bytes arrived; run again to resume")
    os.replace(part, target)
    return Downloaded(target, size, offset, reused=False)


def download_all(urls: Iterable[str], folder: Path, workers: int = 4) -> list[Downloaded]:
    """Every file, at most ``workers`` at a time, in the order given. Files already complete are not fetched
    again; the first failure is raised after the other downloads finish (their progress is kept)."""
    urls = list(urls)
    names = [file_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise DownloadError("two files of one dataset share a name; cannot keep them apart")
    session = requests.Session()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(download, url, folder, session) for url in urls]
        errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]
    return [f.result() for f in futures]
