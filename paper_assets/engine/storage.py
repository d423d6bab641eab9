"""Parquet files of the project home: schemas, atomic writes, chunk checkpoints, the DuckDB catalog.

Every partition is its own Parquet file, written to a hidden temporary file in the same folder, fsynced and
renamed over the old one: readers (DuckDB views, the publisher) see the previous complete file or the new
complete file, never a partial one, and a failed write leaves the last good version in place.
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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
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


def file_metadata(path: str | os.PathLike) -> dict:
    raw = pq.read_metadata(path).metadata or {}
    return json.loads(raw.get(METADATA_KEY, b"{}"))


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success it replaces ``final`` atomically, else it is removed."""
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
def atomic_parquet_writer(final: str | os.PathLike, schema: pa.Schema, **options) -> Iterator[pq.ParquetWriter]:
    with atomic_path(final) as tmp:
        writer = pq.ParquetWriter(tmp, schema, compression=options.pop("compression", "zstd"), **options)
        try:
            yield writer
        finally:
            writer.close()


CURRENT_FILE = "current.json"


def switch_current(root: Path, field: str, name: str) -> None:
    """Point ``root/current.json`` at the complete version folder ``root/name`` (atomically; readers see the old
    pointer or the new one)."""
    with atomic_path(root / CURRENT_FILE) as tmp:
        tmp.write_text(json.dumps({field: name}), encoding="utf-8")


def current_name(root: Path, field: str) -> str | None:
    """The version folder ``root/current.json`` points at, or None before the first switch (or when that folder
    has lost its manifest: a reader then sees no version rather than a broken one)."""
    with contextlib.suppress(FileNotFoundError):
        name = json.loads((root / CURRENT_FILE).read_text(encoding="utf-8"))[field]
        if (root / name / "manifest.json").exists():
            return name
    return None


def prune_versions(root: Path, keep_newest: int, keep: set[str]) -> None:
    """Remove complete version folders (those with a ``manifest.json``) beyond the newest ``keep_newest`` by
    manifest time, never one named in ``keep``."""
    versions = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                       and (p / "manifest.json").exists()),
                      key=lambda p: (p / "manifest.json").stat().st_mtime_ns, reverse=True)
    for old in versions[keep_newest:]:
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)


class ProjectHome:
    """The layout of ``PAPER_ASSETS_HOME``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise ValueError(f"{path} escapes the project home {self.root}")
        return resolved

    @property
    def papers_dir(self) -> Path:
        return self.root / "papers"

    @property
    def embeddings_dir(self) -> Path:
        return self.root / "embeddings"

    @property
    def source_dir(self) -> Path:
        return self.root / "source"

    @property
    def stats_dir(self) -> Path:
        return self.root / "stats"

    @property
    def warehouse(self) -> Path:
        return self.root / "warehouse.duckdb"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster"

    @property
    def calibration_file(self) -> Path:
        return self.stats_dir / "calibration.json"

    @property
    def celery_config_dir(self) -> Path:
        return self.dagster_home / "celery"

    def canary_file(self, fingerprint: str, precision: str) -> Path:
        return self.stats_dir / f"canary-{fingerprint}-{precision}.npy"

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def novelty_dir(self) -> Path:
        return self.root / "novelty"

    def novelty_file(self, month: str) -> Path:
        return self._inside(self.novelty_dir / f"novelty-{month}.parquet")

    @property
    def hub_folder(self) -> Path:
        return self.root / "hub"

    @property
    def demo_dir(self) -> Path:
        return self.root / "demo"

    def papers_file(self, rng: IdRange) -> Path:
        return self._inside(self.papers_dir / f"papers-{rng.key}.parquet")

    def embeddings_file(self, rng: IdRange) -> Path:
        return self._inside(self.embeddings_dir / f"embeddings-{rng.key}.parquet")

    def gate_file(self, rng: IdRange) -> Path:
        """The quality-gate record of a partition's embeddings (what its blocking checks decided)."""
        return self._inside(self.embeddings_dir / f"embeddings-{rng.key}.checks.json")

    def checkpoint_dir(self, rng: IdRange) -> Path:
        return self._inside(self.embeddings_dir / ".checkpoints" / rng.key)

    def lock(self, name: str) -> FileLock:
        return FileLock(self.root / ".locks" / f"{name}.lock")


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

    def __init__(self, folder: Path, state: dict):
        self.folder = folder
        self.state = state
        stored = folder / "state.json"
        if folder.exists():
            try:
                matches = json.loads(stored.read_text(encoding="utf-8")) == state
            except (OSError, ValueError):
                matches = False
            if not matches:
                shutil.rmtree(folder)
        if not folder.exists():
            folder.mkdir(parents=True)
            with atomic_path(stored) as tmp:
                tmp.write_text(json.dumps(state, sort_keys=True), encoding="utf-8")

    def chunk_file(self, index: int) -> Path:
        return self.folder / f"chunk-{index:06d}.parquet"

    def has(self, index: int) -> bool:
        return self.chunk_file(index).exists()

    def write(self, index: int, batch: pa.RecordBatch) -> None:
        with atomic_parquet_writer(self.chunk_file(index), batch.schema, compression="none") as writer:
            writer.write_batch(batch)

    def chunks(self) -> list[Path]:
        return sorted(self.folder.glob("chunk-*.parquet"))

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def refresh_catalog(conn, home: ProjectHome) -> list[str]:
    """(Re)create the ``papers``, ``embeddings`` and ``paper_novelty`` views over the Parquet files; return the views
    made.

    The views use globs, so new partitions appear without a refresh; a refresh is only needed for the first file.
    """
    made = []
    for view, folder, prefix in (
        ("papers", home.papers_dir, "papers"),
        ("embeddings", home.embeddings_dir, "embeddings"),
        ("paper_novelty", home.novelty_dir, "novelty"),
    ):
        files = sorted(folder.glob(f"{prefix}-*.parquet"))
        if files:
            pattern = str(folder / f"{prefix}-*.parquet").replace("'", "''")
            columns = "*"
            if view == "embeddings":
                # Parquet has no fixed-size list: cast back to ARRAY so array_cosine_similarity & co. work.
                dim = pq.read_schema(files[0]).field("embedding").type.list_size
                columns = f"corpusid, embedding::FLOAT[{int(dim)}] AS embedding, text_sha256"
            conn.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT {columns} FROM read_parquet('{pattern}')")
            made.append(view)
        else:
            conn.execute(f"DROP VIEW IF EXISTS {view}")
    return made
