"""A source release snapshotted into the home: one id-sorted Parquet file, ids normalised, duplicates resolved.

Why a snapshot: the cleaned S2 databases have a VARCHAR ``corpusid`` in places (every range read would rescan the
whole table), they come as several files (``S2_papers_cleaned.db`` + ``..._additional_papers.db``), and a release
must be fixed while its ranges are embedded. The snapshot is written once per release; reading one range of it
costs time in proportion to that range's rows (row groups of ``SNAPSHOT_ROW_GROUP`` rows, sorted by id, so their
min/max statistics prune every other row group).

Layout under ``<home>/source/``::

    <release>/papers.parquet     corpusid int64, title, abstract, publication_date date, date_from_year bool
                                 (the date is January 1st of the year the source gave; null when the source does
                                 not say), citation_count int64, source_file string (the input file of the row)
    <release>/invalid_corpusid.parquet   rows without a valid id (quarantine), with their source_file
    <release>/manifest.json      release, inputs, per-range rows + content hash, counts of invalid/duplicate rows
    current.json                 {"release": ...}: switched atomically after the snapshot is complete

Rules (also in RELIABILITY.md):
- id: an integer column's non-negative values; a VARCHAR column's values that are digits only after trimming.
  Other rows are quarantined and counted per input file.
- duplicates (within a file or across files): the most complete row wins (longest abstract, then longest title);
  a tie goes to the later input file (a supplement overrides the main file), then the last physical row.
  Dropped copies are counted per input file.
- range content hash: an order-independent sum of md5 over (id, title, abstract): stable across DuckDB versions,
  and blind to columns that do not change the embedded text (dates, citation counts).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa

from .errors import UserError
from .fs import HomePath, register_home_filesystem
from .ranges import IdRange, range_for
from .source import RangeReadStats, SourceInfo, id_expression
from .versions import current_name, prune_versions, staged_version, switch_current

SNAPSHOT_ROW_GROUP = 8192
SNAPSHOT_MEMORY_LIMIT = "2GB"
KEEP_RELEASES = 2  # the current one and the previous one, which runs started before the switch may still read


class SnapshotError(UserError):
    pass


@dataclass
class InputReport:
    path: str
    rows: int = 0
    invalid_corpusid: int = 0
    duplicates_dropped: int = 0
    kept: int = 0


@dataclass
class SnapshotManifest:
    release: str
    range_width: int
    table: str
    inputs: list[InputReport]
    ranges: dict[str, dict] = field(default_factory=dict)  # key -> {"rows": n, "content_hash": h}
    rows: int = 0
    invalid_corpusid: int = 0
    duplicates_dropped: int = 0

    def to_json(self) -> str:
        data = {"release": self.release, "range_width": self.range_width, "table": self.table,
                "inputs": [vars(i) for i in self.inputs], "ranges": self.ranges, "rows": self.rows,
                "invalid_corpusid": self.invalid_corpusid, "duplicates_dropped": self.duplicates_dropped}
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SnapshotManifest:
        data = json.loads(text)
        data["inputs"] = [InputReport(**i) for i in data["inputs"]]
        return cls(**data)


def release_id(versions: list[str]) -> str:
    """One id for a release made of several inputs (each a file identity or a Hub revision)."""
    if len(versions) == 1:
        return versions[0]
    return "multi-" + hashlib.sha256("|".join(versions).encode()).hexdigest()[:16]


def _safe_release(release: str) -> str:
    if not release or any(c in release for c in "/\\") or release.startswith("."):
        raise SnapshotError(f"release id {release!r} cannot name a folder")
    return release


def _column_sql(columns: dict[str, str], name: str, cast: str) -> str:
    return f"TRY_CAST({name} AS {cast})" if name in columns else f"CAST(NULL AS {cast})"


def _input_select(conn: duckdb.DuckDBPyConnection, index: int, info: SourceInfo) -> str:
    alias = f"src{index}"
    conn.execute(f"ATTACH '{info.path.replace(chr(39), chr(39) * 2)}' AS {alias} (READ_ONLY)")
    columns = dict(conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_catalog = ? AND table_name = ?",
        [alias, info.table]).fetchall())
    row = "rowid" if not info.is_view else "NULL::BIGINT"
    table = f'{alias}."{info.table.replace(chr(34), chr(34) * 2)}"'
    return f"""SELECT {index} AS source_index, ({id_expression(info)}) AS corpusid,
                      CAST(corpusid AS VARCHAR) AS corpusid_raw,
                      CAST(title AS VARCHAR) AS title, CAST(abstract AS VARCHAR) AS abstract,
                      {_column_sql(columns, 'publication_date', 'DATE')} AS publication_date,
                      {_column_sql(columns, 'date_from_year', 'BOOLEAN')} AS date_from_year,
                      {_column_sql(columns, 'citation_count', 'BIGINT')} AS citation_count,
                      {row} AS source_row
               FROM {table}"""


def build_snapshot(inputs: list[SourceInfo], root: HomePath, release: str, range_width: int) -> SnapshotManifest:
    """Snapshot the inputs of one release under ``root/<release>/`` and make it the current release."""
    if not inputs:
        raise SnapshotError("a release needs at least one source database")
    release = _safe_release(release)
    with staged_version(root, release) as staging:
        manifest = _snapshot_into(staging, inputs, release, range_width)
    switch_current(root, "release", release)
    prune_versions(root, KEEP_RELEASES, keep={release})
    return manifest


def _snapshot_into(staging: Path, inputs: list[SourceInfo], release: str, range_width: int) -> SnapshotManifest:
    names = [info.path for info in inputs]
    with duckdb.connect() as conn:
        conn.execute(f"SET memory_limit = '{SNAPSHOT_MEMORY_LIMIT}'")
        conn.execute(f"SET temp_directory = '{str(staging / 'tmp')}'")
        union = " UNION ALL ".join(_input_select(conn, i, info) for i, info in enumerate(inputs))
        conn.execute(f"CREATE TEMP VIEW raw_rows AS {union}")
        conn.execute("CREATE TEMP TABLE input_names (source_index INTEGER, source_file VARCHAR)")
        conn.executemany("INSERT INTO input_names VALUES (?, ?)", list(enumerate(names)))
        conn.execute(f"""
            COPY (
                SELECT r.corpusid, r.title, r.abstract, r.publication_date, r.date_from_year, r.citation_count,
                       n.source_file
                FROM raw_rows r JOIN input_names n USING (source_index)
                WHERE r.corpusid IS NOT NULL
                QUALIFY row_number() OVER (
                    PARTITION BY r.corpusid
                    ORDER BY length(r.abstract) DESC NULLS LAST, length(r.title) DESC NULLS LAST,
                             r.source_index DESC, r.source_row DESC NULLS LAST,
                             r.title DESC NULLS LAST, r.abstract DESC NULLS LAST) = 1
                ORDER BY r.corpusid
            ) TO '{staging / 'papers.parquet'}' (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {SNAPSHOT_ROW_GROUP})
        """)
        conn.execute(f"""
            COPY (SELECT r.corpusid_raw, r.title, r.abstract, r.publication_date, r.date_from_year, r.citation_count,
                         n.source_file
                  FROM raw_rows r JOIN input_names n USING (source_index) WHERE r.corpusid IS NULL)
            TO '{staging / 'invalid_corpusid.parquet'}' (FORMAT parquet, COMPRESSION zstd)
        """)
        per_input = conn.execute("""
            SELECT source_index, count(*), count(*) FILTER (WHERE corpusid IS NULL) FROM raw_rows GROUP BY ALL
        """).fetchall()
        kept = dict(conn.execute(f"""
            SELECT n.source_index, count(*) FROM read_parquet('{staging / 'papers.parquet'}') p
            JOIN input_names n USING (source_file) GROUP BY ALL
        """).fetchall())
        ranges = conn.execute(f"""
            SELECT corpusid // {int(range_width)} AS bucket, count(*),
                   sum(md5_number_lower(concat_ws(chr(31), corpusid::VARCHAR, coalesce(title, chr(0)),
                                                  coalesce(abstract, chr(0))))::HUGEINT)::VARCHAR
            FROM read_parquet('{staging / 'papers.parquet'}') GROUP BY bucket ORDER BY bucket
        """).fetchall()
    reports = [InputReport(path=name) for name in names]
    for index, rows, invalid in per_input:
        reports[index].rows, reports[index].invalid_corpusid = int(rows), int(invalid)
    for index, report in enumerate(reports):
        report.kept = int(kept.get(index, 0))
        report.duplicates_dropped = report.rows - report.invalid_corpusid - report.kept
    manifest = SnapshotManifest(
        release=release, range_width=range_width, table=inputs[0].table, inputs=reports,
        ranges={range_for(int(bucket) * range_width, range_width).key:
                {"rows": int(n), "content_hash": hashlib.sha256(str(h).encode()).hexdigest()[:16]}
                for bucket, n, h in ranges},
    )
    manifest.rows = sum(r["rows"] for r in manifest.ranges.values())
    manifest.invalid_corpusid = sum(r.invalid_corpusid for r in reports)
    manifest.duplicates_dropped = sum(r.duplicates_dropped for r in reports)
    shutil.rmtree(staging / "tmp", ignore_errors=True)
    (staging / "manifest.json").write_text(manifest.to_json(), encoding="utf-8")
    return manifest


class Snapshot:
    """A complete snapshot of one release: its manifest and range reads."""

    def __init__(self, folder: HomePath):
        self.folder = folder
        self.manifest = SnapshotManifest.from_json((folder / "manifest.json").read_text(encoding="utf-8"))

    @property
    def version(self) -> str:
        return self.manifest.release

    @property
    def papers_file(self) -> HomePath:
        return self.folder / "papers.parquet"

    @property
    def quarantine_file(self) -> HomePath:
        return self.folder / "invalid_corpusid.parquet"

    def read(self, rng: IdRange, batch_rows: int = 8192) -> tuple[RangeReadStats, Iterator[pa.RecordBatch]]:
        """Rows of one range (one per id, ordered by id) as Arrow batches of corpusid, title, abstract."""
        conn = duckdb.connect()
        conn.execute(f"SET memory_limit = '{SNAPSHOT_MEMORY_LIMIT}'")
        register_home_filesystem(conn, self.papers_file)
        relation = conn.sql(
            f"SELECT corpusid, title, abstract FROM read_parquet('{self.papers_file}') "
            "WHERE corpusid BETWEEN $lo AND $hi ORDER BY corpusid", params={"lo": rng.lo, "hi": rng.hi})
        expected = self.manifest.ranges.get(rng.key, {}).get("rows", 0)
        stats = RangeReadStats(source_rows=int(expected), duplicate_corpusid=0)

        def batches() -> Iterator[pa.RecordBatch]:
            try:
                yield from relation.to_arrow_reader(batch_rows)
            finally:
                conn.close()

        return stats, batches()


def current_snapshot(root: HomePath) -> Snapshot | None:
    """The current release's snapshot, or None before the first one."""
    release = current_name(root, "release")
    return Snapshot(root / _safe_release(release)) if release is not None else None
