"""Files of the project home on a local disk or on object storage, written all-or-nothing.

A home can live on object storage (``PAPER_ASSETS_HOME=s3://bucket/prefix``, endpoint and credentials from the
standard AWS variables): the shared data is then reached through fsspec's S3 filesystem. A local file is written to
a hidden temporary file in the same folder, fsynced and renamed over the old one; S3 has no rename, so a file is
written completely to a local temporary file and then stored under its final key with one PUT (a multipart upload
becomes visible only when it completes). Either way readers see the old file or the new one, never a partial one,
and a failed write leaves the last good version in place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError

# A path in the home: a local ``Path``, or a ``upath.UPath`` on object storage (same pathlib API).
HomePath = Any
REMOTE_SCHEMES = ("s3",)


def home_location(root: str | os.PathLike) -> HomePath:
    """``root`` as a path: a resolved local ``Path``, or an ``s3://`` UPath (listing cache off: other machines
    write the same prefixes)."""
    text = str(root)
    if "://" not in text:
        return Path(text).resolve()
    scheme = text.split("://", 1)[0]
    if scheme not in REMOTE_SCHEMES:
        raise UserError(f"home {text!r}: a local folder or s3://bucket/prefix")
    try:
        from upath import UPath
    except ImportError as err:
        raise UserError(f"home {text!r} needs the s3 extra: pip install 'paper_assets[s3]'") from err
    options: dict = {"use_listings_cache": False}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:  # botocore reads it too; naming it keeps fsspec's cached filesystems apart per endpoint
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return UPath(text.rstrip("/"), **options)


def is_local(path: HomePath) -> bool:
    return isinstance(path, Path)


def _arrow(path: HomePath) -> dict:
    return {"filesystem": None} if is_local(path) else {"filesystem": path.fs}


def _arrow_path(path: HomePath) -> str:
    return str(path) if is_local(path) else path.path


def read_parquet(path: HomePath, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(_arrow_path(path), columns=columns, **_arrow(path))


def parquet_file(path: HomePath) -> pq.ParquetFile:
    """A Parquet file to stream one row group at a time. No pre-buffering: pyarrow's pre-buffer cache keeps every
    column chunk it has read until the file is closed (~90 MB after one pass over a 200k-paper papers file, 15 MB
    without), so memory would grow with the partition."""
    return pq.ParquetFile(_arrow_path(path), pre_buffer=False, **_arrow(path))


def parquet_metadata(path: HomePath) -> pq.FileMetaData:
    return pq.read_metadata(_arrow_path(path), **_arrow(path))


def parquet_schema(path: HomePath) -> pa.Schema:
    return pq.read_schema(_arrow_path(path), **_arrow(path))


def read_record(path: HomePath) -> str:
    """A small shared record (JSON) as text, in one read. On object storage that is one GET, which returns one whole
    version of the object; reading it as an open file instead (s3fs) sends each read with ``If-Match`` on the ETag
    seen when it was opened, which fails (412 PreconditionFailed) when another machine replaced it in between."""
    if is_local(path):
        return path.read_text(encoding="utf-8")
    return path.fs.cat_file(path.path).decode("utf-8")


_RECORDS_BY_ETAG: dict[tuple[str, str], dict] = {}


def read_records(folder: HomePath) -> dict[str, dict]:
    """Every ``*.json`` record directly in ``folder`` by file name (none when the folder does not exist). On object
    storage: one listing, then GETs, concurrent, of only the records not already read in this process at the same
    ETag (a long-lived worker reads each partition's record once); one removed since the listing is left out."""
    if is_local(folder):
        return {path.name: json.loads(path.read_text(encoding="utf-8")) for path in sorted(folder.glob("*.json"))}
    try:
        listing = [entry for entry in folder.fs.ls(folder.path, detail=True) if entry["name"].endswith(".json")]
    except FileNotFoundError:
        return {}
    tagged = {entry["name"]: (entry["name"], str(entry.get("ETag", ""))) for entry in listing}
    for stale in [key for key in _RECORDS_BY_ETAG if key[0] in tagged and key != tagged[key[0]]]:
        del _RECORDS_BY_ETAG[stale]  # a record rewritten since: its old version is not read again
    missing = [name for name, tag in tagged.items() if not tag[1] or tag not in _RECORDS_BY_ETAG]
    for name, content in folder.fs.cat(missing, on_error="omit").items() if missing else ():
        _RECORDS_BY_ETAG[tagged[name]] = json.loads(content)
    return {name.rsplit("/", 1)[-1]: dict(_RECORDS_BY_ETAG[tag]) for name, tag in sorted(tagged.items())
            if tag in _RECORDS_BY_ETAG}


def remove_tree(path: HomePath) -> None:
    if is_local(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.fs.rm(path.path, recursive=True)


def ensure_dir(path: HomePath) -> None:
    """Create a local folder; object storage has no folders (a prefix exists once a key under it does)."""
    if is_local(path):
        path.mkdir(parents=True, exist_ok=True)


def register_home_filesystem(conn, path: HomePath) -> None:
    """Let a DuckDB connection read ``s3://`` paths of the home through the same fsspec filesystem (the httpfs
    extension would need a download DuckDB cannot make offline)."""
    if is_local(path):
        return
    protocol = path.fs.protocol
    if not conn.filesystem_is_registered(protocol if isinstance(protocol, str) else protocol[0]):
        conn.register_filesystem(path.fs)


@contextlib.contextmanager
def local_copies(files: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``files`` with every object-storage path replaced by a downloaded temporary copy (for uploaders that want a
    local file); local paths and bytes pass through."""
    if all(isinstance(f, bytes) or is_local(f) for f in files.values()):
        yield files
        return
    with tempfile.TemporaryDirectory(prefix="paper_assets-") as scratch:
        copies = {}
        for i, (key, value) in enumerate(files.items()):
            if isinstance(value, bytes) or is_local(value):
                copies[key] = value
            else:
                copies[key] = Path(scratch) / f"{i}-{value.name}"
                value.fs.get_file(value.path, str(copies[key]))
        yield copies


def sha256_file(path: HomePath) -> str:
    with path.open("rb") if hasattr(path, "open") else open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(final: HomePath) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success it replaces ``final`` atomically, else it is removed.

    On object storage the temporary file is local and is stored under ``final`` with one upload when complete."""
    if not is_local(final) and not isinstance(final, str):
        with tempfile.TemporaryDirectory(prefix="paper_assets-") as scratch:
            tmp = Path(scratch) / final.name
            yield tmp
            final.fs.put_file(str(tmp), final.path)
        return
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_parquet_writer(final: HomePath, schema: pa.Schema, **options) -> Iterator[pq.ParquetWriter]:
    with atomic_path(final) as tmp:
        writer = pq.ParquetWriter(tmp, schema, compression=options.pop("compression", "zstd"), **options)
        try:
            yield writer
        finally:
            writer.close()


class FileLock:
    """An exclusive ``flock`` between processes (the DuckDB catalog has one writer at a time)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
