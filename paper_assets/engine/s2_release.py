"""An S2 Datasets API release as a source database: ``papers`` + ``abstracts``, kept current by S2's diffs.

Layout under ``<local home>/s2/``::

    <release>/s2.duckdb        tables papers, abstracts; view papers_with_abstracts (the source the snapshot reads)
    <release>/manifest.json    release, how it was built (full download or the diffs applied), row counts
    current.json               {"release": ...}: switched only after the release database is complete
    downloads/<release>/...    files being fetched (resumable); removed once their release is current

Rules (also in RELIABILITY.md):
- ``papers_with_abstracts`` joins ``papers`` and ``abstracts`` by corpusid and keeps papers that have a non-blank
  abstract, as the notebook's table of that name does. ``PAPER_ASSETS_S2_FILTER``, a DuckDB predicate over the
  ``papers`` columns below, narrows the papers kept (e.g. ``year >= 2000``).
- One abstract per paper: ``abstracts`` may hold several rows per corpusid; the longest (after trimming) wins,
  then the smallest in text order, so the choice does not depend on file order.
- Publication date: ``publicationdate`` when S2 has one, else January 1st of ``year``; ``date_from_year`` marks
  the second case. Neither: no date.
- Moving from the home's release to a newer one applies the diffs S2 publishes between them (in order; in each
  diff the update files first, then the delete files), so only changed records are downloaded. Where S2 serves no
  diff path (HTTP 404) the newer release is downloaded whole; the manifest says which happened.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import duckdb

from .s2_api import S2ApiError, S2Client
from .s2_download import download_all
from .versions import current_name, prune_versions, staged_version, switch_current

DATASETS = ("papers", "abstracts")
DATABASE = "s2.duckdb"
KEEP_RELEASES = 2
MEMORY_LIMIT = "2GB"
_COLUMNS = {
    "papers": {"corpusid": "BIGINT", "title": "VARCHAR", "year": "INTEGER", "publicationdate": "DATE",
               "citationcount": "BIGINT", "venue": "VARCHAR", "externalids": "JSON", "s2fieldsofstudy": "JSON",
               "publicationtypes": "JSON"},
    "abstracts": {"corpusid": "BIGINT", "abstract": "VARCHAR"},
}
PAPERS_WITH_ABSTRACTS = """
CREATE OR REPLACE VIEW papers_with_abstracts AS
WITH chosen AS (
    SELECT corpusid, abstract FROM abstracts WHERE trim(coalesce(abstract, '')) <> ''
    QUALIFY row_number() OVER (PARTITION BY corpusid ORDER BY length(trim(abstract)) DESC, abstract) = 1
)
SELECT p.corpusid, p.title, c.abstract,
       coalesce(p.publicationdate, make_date(p.year, 1, 1)) AS publication_date,
       p.publicationdate IS NULL AND p.year IS NOT NULL AS date_from_year,
       p.citationcount AS citation_count, p.venue
FROM papers p JOIN chosen c USING (corpusid)
"""


@dataclass
class ReleaseManifest:
    release: str
    built_from: str  # "full download" | "diffs from <release>"
    papers: int = 0
    abstracts: int = 0
    papers_with_abstracts: int = 0
    diff_steps: list[str] = field(default_factory=list)
    updated: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)
    filter: str = ""


def release_record(root: Path, release: str) -> dict | None:
    """The manifest of a complete release in ``root``: how it was built, its counts and filter (None if absent)."""
    path = root / release / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _json_scan(files: list[Path], dataset: str) -> str:
    names = "[" + ", ".join("'" + str(f).replace("'", "''") + "'" for f in files) + "]"
    columns = "{" + ", ".join(f"'{k}': '{v}'" for k, v in _COLUMNS[dataset].items()) + "}"
    return f"read_json({names}, format='newline_delimited', compression='auto', columns={columns})"


def _create_tables(conn: duckdb.DuckDBPyConnection) -> None:
    for dataset, columns in _COLUMNS.items():
        conn.execute(f"CREATE TABLE {dataset} ({', '.join(f'{k} {v}' for k, v in columns.items())})")


def _keep(dataset: str, where: str) -> str:
    return f"corpusid IS NOT NULL AND ({where})" if dataset == "papers" and where else "corpusid IS NOT NULL"


def _load_full(conn, files: dict[str, list[Path]], where: str) -> None:
    _create_tables(conn)
    for dataset in DATASETS:
        if files[dataset]:
            conn.execute(f"INSERT INTO {dataset} SELECT * FROM {_json_scan(files[dataset], dataset)} "
                         f"WHERE {_keep(dataset, where)}")


def _apply_diff(conn, dataset: str, updates: list[Path], deletes: list[Path], where: str) -> tuple[int, int]:
    """Upsert the update files' records by corpusid, then delete the delete files' ids; (updated, deleted)."""
    updated = deleted = 0
    if updates:
        conn.execute(f"CREATE OR REPLACE TEMP TABLE incoming AS SELECT * FROM {_json_scan(updates, dataset)} "
                     "WHERE corpusid IS NOT NULL")
        conn.execute(f"DELETE FROM {dataset} WHERE corpusid IN (SELECT corpusid FROM incoming)")
        conn.execute(f"INSERT INTO {dataset} SELECT * FROM incoming WHERE {_keep(dataset, where)}")
        updated = conn.execute("SELECT count(DISTINCT corpusid) FROM incoming").fetchone()[0]
    if deletes:
        gone = "[" + ", ".join("'" + str(f).replace("'", "''") + "'" for f in deletes) + "]"
        deleted = conn.execute(
            f"DELETE FROM {dataset} WHERE corpusid IN (SELECT corpusid FROM read_json({gone}, "
            "format='newline_delimited', compression='auto', columns={'corpusid': 'BIGINT'}))").fetchone()[0]
    return int(updated), int(deleted)


class S2Release:
    """Brings ``root`` (``<local home>/s2``) to an S2 release and names its source database."""

    def __init__(self, root: Path, client: S2Client, download_workers: int = 4, where: str = "",
                 log: Callable[[str], None] = lambda _: None):
        self.root, self.client, self.workers, self.where, self.log = root, client, download_workers, where, log

    def current(self) -> str | None:
        return current_name(self.root, "release")

    def database(self, release: str) -> Path:
        return self.root / release / DATABASE

    def ensure(self, release: str) -> Path:
        """The source database of ``release``, built from the current one by diffs where S2 serves them."""
        self.root.mkdir(parents=True, exist_ok=True)
        if "/" in release or release.startswith("."):
            raise S2ApiError(f"S2 release id {release!r} cannot name a folder")
        previous = self.current()
        if previous == release and self._same_filter(release):
            return self.database(release)
        steps = None
        if previous is not None and previous < release and self._same_filter(previous):
            try:
                steps = {d: self.client.diffs(previous, release, d) for d in DATASETS}
            except S2ApiError as err:
                if "HTTP 404" not in str(err):
                    raise
                self.log(f"S2 serves no diffs from {previous} to {release}; downloading {release} whole")
        with staged_version(self.root, release) as staging:
            manifest = (self._from_diffs(staging, previous, release, steps) if steps
                        else self._full(staging, release))
            shutil.rmtree(staging / "tmp", ignore_errors=True)
            (staging / "manifest.json").write_text(json.dumps(asdict(manifest), indent=1), encoding="utf-8")
        switch_current(self.root, "release", release)
        prune_versions(self.root, KEEP_RELEASES, keep={release})
        shutil.rmtree(self.root / "downloads" / release, ignore_errors=True)
        return self.database(release)

    def _same_filter(self, release: str) -> bool:
        return (release_record(self.root, release) or {}).get("filter", "") == self.where

    def _fetch(self, urls: list[str], folder: Path) -> list[Path]:
        done = download_all(urls, folder, self.workers)
        fetched = sum(d.bytes - d.resumed_from for d in done if not d.reused)
        self.log(f"  {folder.relative_to(self.root)}: {len(done)} file(s), {fetched:,} bytes fetched")
        return [d.path for d in done]

    def _full(self, staging: Path, release: str) -> ReleaseManifest:
        downloads = self.root / "downloads" / release
        files = {d: self._fetch(self.client.dataset_files(release, d), downloads / d) for d in DATASETS}
        with self._connect(staging) as conn:
            _load_full(conn, files, self.where)
            manifest = ReleaseManifest(release=release, built_from="full download", filter=self.where)
            self._finish(conn, manifest)
        return manifest

    def _from_diffs(self, staging: Path, previous: str, release: str, steps: dict) -> ReleaseManifest:
        shutil.copy2(self.database(previous), staging / DATABASE)
        manifest = ReleaseManifest(release=release, built_from=f"diffs from {previous}", filter=self.where,
                                   updated=dict.fromkeys(DATASETS, 0), deleted=dict.fromkeys(DATASETS, 0))
        with self._connect(staging) as conn:
            for dataset in DATASETS:
                for step in steps[dataset]:
                    folder = self.root / "downloads" / release / f"{step.from_release}_to_{step.to_release}"
                    updates = self._fetch(list(step.update_files), folder / dataset / "update")
                    deletes = self._fetch(list(step.delete_files), folder / dataset / "delete")
                    updated, deleted = _apply_diff(conn, dataset, updates, deletes, self.where)
                    manifest.updated[dataset] += updated
                    manifest.deleted[dataset] += deleted
                    if dataset == DATASETS[0]:
                        manifest.diff_steps.append(f"{step.from_release} -> {step.to_release}")
            self._finish(conn, manifest)
        return manifest

    def _connect(self, staging: Path) -> duckdb.DuckDBPyConnection:
        conn = duckdb.connect(str(staging / DATABASE))
        conn.execute(f"SET memory_limit = '{MEMORY_LIMIT}'")
        conn.execute(f"SET temp_directory = '{staging / 'tmp'}'")
        return conn

    @staticmethod
    def _finish(conn, manifest: ReleaseManifest) -> None:
        conn.execute(PAPERS_WITH_ABSTRACTS)
        manifest.papers = conn.execute("SELECT count(*) FROM papers").fetchone()[0]
        manifest.abstracts = conn.execute("SELECT count(*) FROM abstracts").fetchone()[0]
        manifest.papers_with_abstracts = conn.execute("SELECT count(*) FROM papers_with_abstracts").fetchone()[0]
        conn.execute("CHECKPOINT")
