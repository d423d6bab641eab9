"""Parquet files of the project home: schemas, atomic writes, chunk checkpoints, the DuckDB catalog.

Every partition is its own Parquet file, written to a hidden temporary file in the same folder, fsynced and
renamed over the old one: readers (DuckDB views, the publisher) see the previous complete file or the new
complete file, never a partial one, and a failed write leaves the last good version in place.

A home can also live on object storage (``PAPER_ASSETS_HOME=s3://bucket/prefix``, endpoint and credentials from
the standard AWS variables): the shared data (source snapshots, partitions, checkpoints, quality gates, index,
novelty, manifests) is then reached through fsspec's S3 filesystem, and what belongs to one machine (the DuckDB
catalog file, the Dagster instance folder, locks, CPU calibration, caches) stays in a local folder
(``PAPER_ASSETS_LOCAL_HOME``). S3 has no rename; a file is written completely to a local temporary file and then
stored under its final key with one PUT (a multipart upload becomes visible only when it completes), so readers
see the old object or the new one, never a partial one. Folders of several files (a snapshot, an index build) are
written under a new name and made current by switching a small ``current.json`` pointer, as on a local disk.
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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError
from .ranges import IdRange

METADATA_KEY = b"paper_assets"
# Rows per checkpointed chunk: a crash redoes at most this many (minutes on a CPU, seconds on a GPU), and the
# rows in flight (queued for tokenising, being encoded) stay a few chunks, so memory does not grow with a partition.
DEFAULT_CHUNK_ROWS = 4096
EMBEDDING_ROW_GROUP = 4096  # ~12.6 MB of 768-d float32 per row group: small enough for the Hub dataset viewer

PAPERS_SCHEMA = pa.schema(
    [
        pa.field("corpusid", pa.int64(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("text_sha256", pa.string(), nullable=False),
        pa.field("text_rule", pa.string(), nullable=False),
    ]
)


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


def embeddings_schema(dim: int, metadata: dict | None = None) -> pa.Schema:
    schema = pa.schema(
        [
            pa.field("corpusid", pa.int64(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("text_sha256", pa.string(), nullable=False),
        ]
    )
    if metadata is not None:
        schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    return schema


def embeddings_batch(corpusids: np.ndarray, vectors: np.ndarray, hashes: pa.Array, schema: pa.Schema) -> pa.RecordBatch:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), dim)
    return pa.RecordBatch.from_arrays(
        [pa.array(corpusids, type=pa.int64()), embedding, pa.array(hashes, type=pa.string())], schema=schema
    )


def vectors_of(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """The ``embedding`` column as an (n, dim) float32 array without per-row Python objects."""
    column = table.column("embedding")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


def file_metadata(path: HomePath) -> dict:
    raw = parquet_metadata(path).metadata or {}
    return json.loads(raw.get(METADATA_KEY, b"{}"))


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


CURRENT_FILE = "current.json"


def switch_current(root: HomePath, field: str, name: str) -> None:
    """Point ``root/current.json`` at the complete version folder ``root/name`` (atomically; readers see the old
    pointer or the new one)."""
    with atomic_path(root / CURRENT_FILE) as tmp:
        tmp.write_text(json.dumps({field: name}), encoding="utf-8")


def current_name(root: HomePath, field: str) -> str | None:
    """The version folder ``root/current.json`` points at, or None before the first switch (or when that folder
    has lost its manifest: a reader then sees no version rather than a broken one)."""
    with contextlib.suppress(FileNotFoundError):
        name = json.loads(read_record(root / CURRENT_FILE))[field]
        if (root / name / "manifest.json").exists():
            return name
    return None


def prune_versions(root: HomePath, keep_newest: int, keep: set[str]) -> None:
    """Remove complete version folders (those with a ``manifest.json``) beyond the newest ``keep_newest`` by
    manifest time, never one named in ``keep``."""
    versions = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                       and (p / "manifest.json").exists()),
                      key=lambda p: (p / "manifest.json").stat().st_mtime, reverse=True)
    for old in versions[keep_newest:]:
        if old.name not in keep:
            remove_tree(old)


@contextlib.contextmanager
def staged_version(root: HomePath, name: str) -> Iterator[Path]:
    """A local folder to write version ``name`` into; on success it becomes ``root/name`` whole (``manifest.json``
    last, so :func:`current_name` never accepts a version with files still missing), else it is discarded."""
    if is_local(root):
        staging = root / f".{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            yield staging
            shutil.rmtree(root / name, ignore_errors=True)
            staging.rename(root / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    with tempfile.TemporaryDirectory(prefix=f"paper_assets-{name}-") as scratch:
        yield Path(scratch)
        final = root / name
        # Written over, not removed first: a version's name stands for its content (a release id, an index build
        # hash), so readers of the current version keep a complete one throughout.
        files = sorted((p for p in Path(scratch).rglob("*") if p.is_file()), key=lambda p: p.name == "manifest.json")
        for file in files:
            target = final / file.relative_to(scratch).as_posix()
            final.fs.put_file(str(file), target.path)


def local_version(folder: HomePath, cache: Path | None) -> Path:
    """A local copy of the version folder ``folder`` (itself when local): readers that memory-map or hand paths to
    native libraries need one. Version folders are named by content, so a cached copy stays valid; its
    ``manifest.json`` is fetched again each time (it records what the version was last confirmed against)."""
    if is_local(folder):
        return folder
    local = cache / folder.name
    if not (local / "manifest.json").exists():
        partial = cache / f".{folder.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        folder.fs.get(folder.path.rstrip("/") + "/", str(partial), recursive=True)
        shutil.rmtree(local, ignore_errors=True)
        partial.rename(local)
    else:
        with atomic_path(local / "manifest.json") as tmp:
            folder.fs.get_file((folder / "manifest.json").path, str(tmp))
    return local


LOCAL_HOME_ENV = "PAPER_ASSETS_LOCAL_HOME"


def default_local_home(root: HomePath) -> Path:
    """Where an object-storage home keeps this machine's part: ``$PAPER_ASSETS_LOCAL_HOME``, else a folder under
    the user's cache named after the bucket and prefix."""
    if os.environ.get(LOCAL_HOME_ENV):
        return Path(os.environ[LOCAL_HOME_ENV]).resolve()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (cache / "paper_assets" / root.protocol / root.path.strip("/")).resolve()


class ProjectHome:
    """The layout of ``PAPER_ASSETS_HOME``.

    ``root`` holds the shared data (a local folder or an object-storage prefix); ``local`` holds what belongs to
    this machine. For a local home they are the same folder, so its layout is what it always was."""

    def __init__(self, root: str | os.PathLike, local: str | os.PathLike | None = None):
        self.root = home_location(root)
        if local is not None:
            self.local = Path(local).resolve()
        else:
            self.local = self.root if is_local(self.root) else default_local_home(self.root)

    @property
    def remote(self) -> bool:
        return not is_local(self.root)

    def _inside(self, path: HomePath) -> HomePath:
        if not is_local(path):
            if ".." in path.parts:
                raise ValueError(f"{path} escapes the project home {self.root}")
            return path
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise ValueError(f"{path} escapes the project home {self.root}")
        return resolved

    @property
    def papers_dir(self) -> HomePath:
        return self.root / "papers"

    @property
    def embeddings_dir(self) -> HomePath:
        return self.root / "embeddings"

    @property
    def source_dir(self) -> HomePath:
        return self.root / "source"

    @property
    def stats_dir(self) -> HomePath:
        """Shared records: the norm registry, what was published."""
        return self.root / "stats"

    @property
    def machine_stats_dir(self) -> Path:
        """Records of this machine: CPU calibration, canary vectors of the model on this device."""
        return self.local / "stats"

    @property
    def config_file(self) -> Path:
        return self.local / "paper_assets.json"

    @property
    def warehouse(self) -> Path:
        return self.local / "warehouse.duckdb"

    @property
    def dagster_home(self) -> Path:
        return self.local / "dagster"

    @property
    def calibration_file(self) -> Path:
        return self.machine_stats_dir / "calibration.json"

    @property
    def celery_config_dir(self) -> Path:
        return self.dagster_home / "celery"

    def canary_file(self, fingerprint: str, precision: str) -> Path:
        return self.machine_stats_dir / f"canary-{fingerprint}-{precision}.npy"

    @property
    def index_dir(self) -> HomePath:
        return self.root / "index"

    @property
    def index_cache(self) -> Path:
        """Local copies of object-storage index builds (FAISS and the memory-mapped vectors need local files)."""
        return self.local / "cache" / "index"

    @property
    def novelty_dir(self) -> HomePath:
        return self.root / "novelty"

    def novelty_file(self, month: str) -> HomePath:
        return self._inside(self.novelty_dir / f"novelty-{month}.parquet")

    @property
    def hub_folder(self) -> Path:
        return self.local / "hub"

    @property
    def demo_dir(self) -> Path:
        return self.local / "demo"

    def papers_file(self, rng: IdRange) -> HomePath:
        return self._inside(self.papers_dir / f"papers-{rng.key}.parquet")

    def embeddings_file(self, rng: IdRange) -> HomePath:
        return self._inside(self.embeddings_dir / f"embeddings-{rng.key}.parquet")

    def gate_file(self, rng: IdRange) -> HomePath:
        """The quality-gate record of a partition's embeddings (what its blocking checks decided)."""
        return self._inside(self.embeddings_dir / f"embeddings-{rng.key}.checks.json")

    def checkpoint_dir(self, rng: IdRange) -> HomePath:
        return self._inside(self.embeddings_dir / ".checkpoints" / rng.key)

    def lock(self, name: str) -> FileLock:
        """A lock between this machine's processes (on object storage, writers on different machines work on
        different partitions; the Dagster run coordinator keeps one run per partition)."""
        return FileLock(self.local / ".locks" / f"{name}.lock")

    def register_filesystem(self, conn) -> None:
        register_home_filesystem(conn, self.root)


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


class ChunkCheckpoints:
    """Finished chunks of a partition being embedded; a rerun redoes at most the chunk that was interrupted.

    The folder holds ``state.json`` (what the chunks were made from) and ``chunk-NNNNNN.parquet`` files. A state
    that does not match the current input or model discards every chunk.
    """

    def __init__(self, folder: HomePath, state: dict):
        self.folder = folder
        self.state = state
        stored = folder / "state.json"
        if folder.exists():
            try:
                matches = json.loads(read_record(stored)) == state
            except (OSError, ValueError):
                matches = False
            if not matches:
                remove_tree(folder)
        if not folder.exists():
            ensure_dir(folder)
            with atomic_path(stored) as tmp:
                tmp.write_text(json.dumps(state, sort_keys=True), encoding="utf-8")

    def chunk_file(self, index: int) -> HomePath:
        return self.folder / f"chunk-{index:06d}.parquet"

    def has(self, index: int) -> bool:
        return self.chunk_file(index).exists()

    def write(self, index: int, batch: pa.RecordBatch) -> None:
        with atomic_parquet_writer(self.chunk_file(index), batch.schema, compression="none") as writer:
            writer.write_batch(batch)

    def chunks(self) -> list[HomePath]:
        return sorted(self.folder.glob("chunk-*.parquet"), key=lambda p: p.name)

    def clear(self) -> None:
        remove_tree(self.folder)


def refresh_catalog(conn, home: ProjectHome) -> list[str]:
    """(Re)create the ``papers``, ``embeddings`` and ``paper_novelty`` views over the Parquet files; return the views
    made.

    The views use globs, so new partitions appear without a refresh; a refresh is only needed for the first file.
    On an object-storage home the views read ``s3://`` paths: a connection needs
    :meth:`ProjectHome.register_filesystem` before it queries them.
    """
    home.register_filesystem(conn)
    made = []
    for view, folder, prefix in (
        ("papers", home.papers_dir, "papers"),
        ("embeddings", home.embeddings_dir, "embeddings"),
        ("paper_novelty", home.novelty_dir, "novelty"),
    ):
        files = sorted(folder.glob(f"{prefix}-*.parquet"), key=lambda p: p.name)
        if files:
            pattern = str(folder / f"{prefix}-*.parquet").replace("'", "''")
            columns = "*"
            if view == "embeddings":
                # Parquet has no fixed-size list: cast back to ARRAY so array_cosine_similarity & co. work.
                dim = parquet_schema(files[0]).field("embedding").type.list_size
                columns = f"corpusid, embedding::FLOAT[{int(dim)}] AS embedding, text_sha256"
            conn.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT {columns} FROM read_parquet('{pattern}')")
            made.append(view)
        else:
            conn.execute(f"DROP VIEW IF EXISTS {view}")
    return made
