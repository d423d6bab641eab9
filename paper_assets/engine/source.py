"""The cleaned S2 source database: validation, versioning and streamed reads of corpus-id ranges.

The source is always opened read-only, so any number of runs can read it at once. Ranges are read with
``WHERE id BETWEEN lo AND hi`` as Arrow record batches, never with ``OFFSET``.

Id rule: ``corpusid`` may be an integer or a VARCHAR column. A value counts as an id when it is a non-negative
integer (VARCHAR: digits only after trimming). Other rows belong to no range; they are counted, and the
release snapshot (``engine/snapshot.py``) quarantines them with the file they came from.

Duplicate rule: when several rows share an id, the most complete one is kept (longest abstract, then longest
title, then the last physical row); the others are counted as ``duplicate_corpusid``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from .errors import UserError
from .ranges import IdRange

DEFAULT_TABLE = "papers_with_abstracts"
REQUIRED_COLUMNS = ("corpusid", "title", "abstract")
_INTEGER_TYPES = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT"}
_TEXT_TYPES = {"VARCHAR"}


class SourceError(UserError):
    """The source cannot be used; the message names the problem and what to do."""


@dataclass(frozen=True)
class SourceInfo:
    path: str
    table: str
    id_type: str  # "integer" | "varchar"
    is_view: bool
    version: str
    size_bytes: int

    def read(self, rng: IdRange, batch_rows: int = 8192) -> tuple[RangeReadStats, Iterator[pa.RecordBatch]]:
        return read_range(self, rng, batch_rows)


# A partition read sorts one id window at a time; without a cap DuckDB's buffer pool keeps every source block it
# touched (up to 80% of RAM), so a long partition of a big source would hold gigabytes. The cap still fits a window
# of 8,192 abstracts of 100k characters each. It is SET after connecting: connections of one process share the
# database instance, and DuckDB refuses a second connection with a different configuration.
RANGE_READ_MEMORY_LIMIT = "2GB"
EVICT_MEMORY_LIMIT = "1MB"


def _connect(path: str) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(path, read_only=True)
    except duckdb.Error as err:
        raise SourceError(f"{path} is not a readable DuckDB database: {err}") from err


def local_version(path: str) -> str:
    stat = os.stat(path)
    digest = hashlib.sha256(f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    return f"file-{digest[:16]}"


def inspect_source(
    path: str | os.PathLike, table: str = DEFAULT_TABLE, version: str | None = None,
    setting: str = "the source setting",
) -> SourceInfo:
    """Check everything a run needs before any work starts. ``setting`` names, in the error hints, where the user
    gave the path (an environment variable or a CLI flag)."""
    path = str(path)
    if not Path(path).is_file():
        raise SourceError(f"source database {path} does not exist (check {setting}, or run `paper-assets demo` "
                          "for the offline demo)")
    with _connect(path) as conn:
        found = conn.execute(
            "SELECT table_type FROM information_schema.tables WHERE table_name = ?", [table]
        ).fetchall()
        if not found:
            tables = [r[0] for r in conn.execute("SELECT table_name FROM information_schema.tables").fetchall()]
            raise SourceError(f"source {path} has no table {table!r} (tables: {', '.join(tables) or 'none'})")
        columns = dict(
            conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ?", [table]
            ).fetchall()
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise SourceError(f"table {table!r} in {path} lacks column(s) {', '.join(missing)}; it has {sorted(columns)}")
    id_type = columns["corpusid"].upper()
    if id_type in _INTEGER_TYPES:
        kind = "integer"
    elif id_type in _TEXT_TYPES:
        kind = "varchar"
    else:
        raise SourceError(f"column corpusid of {table!r} has type {id_type}; expected an integer type or VARCHAR")
    for col in ("title", "abstract"):
        if columns[col].upper() not in _TEXT_TYPES:
            raise SourceError(f"column {col} of {table!r} has type {columns[col]}; expected VARCHAR")
    return SourceInfo(
        path=path,
        table=table,
        id_type=kind,
        is_view=found[0][0].upper() == "VIEW",
        version=version or local_version(path),
        size_bytes=os.path.getsize(path),
    )


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def id_expression(info: SourceInfo) -> str:
    """SQL for the row's id as BIGINT, NULL when it is not a valid id."""
    if info.id_type == "integer":
        return "CASE WHEN corpusid >= 0 AND corpusid <= 9223372036854775807 THEN CAST(corpusid AS BIGINT) END"
    return (
        "CASE WHEN regexp_full_match(trim(corpusid), '[0-9]{1,18}') THEN CAST(trim(corpusid) AS BIGINT) END"
    )


def _tiebreak(info: SourceInfo) -> str:
    last = "rowid DESC" if not info.is_view else "title DESC NULLS LAST, abstract DESC NULLS LAST"
    return f"length(abstract) DESC NULLS LAST, length(title) DESC NULLS LAST, {last}"


def _range_filter(info: SourceInfo) -> str:
    # An integer column is filtered on itself so DuckDB can prune row groups by their min/max.
    if info.id_type == "integer":
        return "corpusid BETWEEN ? AND ?"
    return f"({id_expression(info)}) BETWEEN ? AND ?"


@dataclass(frozen=True)
class RangeStats:
    rows: int
    distinct_ids: int
    content_hash: str


def range_stats(info: SourceInfo, width: int) -> tuple[dict[int, RangeStats], int]:
    """Per range start: rows, distinct ids and an order-independent content hash; plus the invalid-id count."""
    sql = f"""
        WITH src AS (SELECT ({id_expression(info)}) AS id, title, abstract FROM {_quoted(info.table)})
        SELECT id // {int(width)} AS bucket, count(*), count(DISTINCT id),
               sum(hash(id, title, abstract)::HUGEINT)::VARCHAR
        FROM src WHERE id IS NOT NULL GROUP BY bucket ORDER BY bucket
    """
    with _connect(info.path) as conn:
        rows = conn.execute(sql).fetchall()
        invalid = conn.execute(
            f"SELECT count(*) FROM {_quoted(info.table)} WHERE ({id_expression(info)}) IS NULL"
        ).fetchall()[0][0]
    stats = {
        int(bucket) * width: RangeStats(int(n), int(distinct), hashlib.sha256(str(h).encode()).hexdigest()[:16])
        for bucket, n, distinct, h in rows
    }
    return stats, int(invalid)


@dataclass
class RangeReadStats:
    source_rows: int = 0
    duplicate_corpusid: int = 0


def range_rows(info: SourceInfo, rng: IdRange) -> int:
    """Source rows whose id falls in ``rng`` (duplicates included)."""
    with _connect(info.path) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {_quoted(info.table)} WHERE {_range_filter(info)}",
                                [rng.lo, rng.hi]).fetchall()[0][0])


def _id_windows(conn, info: SourceInfo, rng: IdRange, rows: int, window_rows: int) -> list[tuple[int, int]]:
    """Split ``rng`` at id quantiles into windows of about ``window_rows`` rows (all copies of an id share one)."""
    pieces = -(-rows // window_rows)
    if pieces <= 1:
        return [(rng.lo, rng.hi)]
    cuts = conn.execute(
        f"SELECT quantile_disc(({id_expression(info)}), ?) FROM {_quoted(info.table)} WHERE {_range_filter(info)}",
        [[i / pieces for i in range(1, pieces)], rng.lo, rng.hi],
    ).fetchall()[0][0]
    windows, lo = [], rng.lo
    for cut in sorted({int(c) for c in cuts if c is not None}):
        if lo <= cut < rng.hi:
            windows.append((lo, cut))
            lo = cut + 1
    windows.append((lo, rng.hi))
    return windows


def _drop_cached_blocks(conn: duckdb.DuckDBPyConnection) -> None:
    """Evict the table blocks DuckDB's buffer pool kept from the window just read.

    The pool keeps every block it read until the memory limit presses (a 200k-paper range: ~150 MB more than a 20k
    one); lowering the limit evicts unpinned blocks at once (DuckDB's documented way to reclaim them), and nothing
    is pinned between two windows. The next window re-reads its blocks from the OS page cache."""
    try:
        conn.execute(f"SET memory_limit = '{EVICT_MEMORY_LIMIT}'")
    except duckdb.OutOfMemoryException:
        pass  # something is still pinned: the blocks stay cached, as they would without this
    finally:
        conn.execute(f"SET memory_limit = '{RANGE_READ_MEMORY_LIMIT}'")


def read_range(
    info: SourceInfo, rng: IdRange, batch_rows: int = 8192, window_rows: int = 8192
) -> tuple[RangeReadStats, Iterator[pa.RecordBatch]]:
    """Rows of one range, one per id (duplicate rule applied), ordered by id, as Arrow batches.

    Columns: ``corpusid`` int64, ``title`` string, ``abstract`` string. The range is read in id windows of about
    ``window_rows`` rows so DuckDB's sort and de-duplication never hold more than one window: memory stays flat
    however many papers a partition has.
    """
    conn = _connect(info.path)
    conn.execute(f"SET memory_limit = '{RANGE_READ_MEMORY_LIMIT}'")
    params = [rng.lo, rng.hi]
    total, distinct = conn.execute(
        f"SELECT count(*), count(DISTINCT ({id_expression(info)})) FROM {_quoted(info.table)} "
        f"WHERE {_range_filter(info)}",
        params,
    ).fetchall()[0]
    stats = RangeReadStats(source_rows=int(total), duplicate_corpusid=int(total) - int(distinct))
    sql = f"""
        SELECT ({id_expression(info)}) AS corpusid, CAST(title AS VARCHAR) AS title,
               CAST(abstract AS VARCHAR) AS abstract
        FROM {_quoted(info.table)} WHERE {_range_filter(info)}
        QUALIFY row_number() OVER (PARTITION BY ({id_expression(info)}) ORDER BY {_tiebreak(info)}) = 1
        ORDER BY corpusid
    """
    windows = _id_windows(conn, info, rng, int(total), window_rows)

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            for lo, hi in windows:
                yield from conn.sql(sql, params=[lo, hi]).to_arrow_reader(batch_rows)
                _drop_cached_blocks(conn)
        finally:
            conn.close()

    return stats, batches()
