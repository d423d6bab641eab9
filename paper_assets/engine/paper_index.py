"""The similar-paper index: every embedded paper ordered by publication date, and an HNSW graph where needed.

Novelty needs "the K nearest papers published before date D" for every month. Papers are stored in
(publication_date, corpusid) order, so position == FAISS id and "published before D" is the range ``[0, first
position dated >= D)``: no per-month index is built. Undated papers come last: ``similar`` finds them, no month
counts them as prior papers.

Layout under ``<home>/index/``::

    <build>/papers.parquet   position order: corpusid int64, publication_date date32 (null: undated)
    <build>/vectors.npy      L2-normalised float32 vectors in position order (memory-mapped by readers)
    <build>/hnsw.faiss       IndexHNSWFlat (L2 metric, as the authors'), absent when built for exact search only
    <build>/manifest.json    fingerprint, parameters, month -> [start, end) positions and content hashes
    current.json             {"build": ...}: switched after a build is complete; the previous build is kept

Only embeddings partitions that passed their blocking checks are indexed, and all must come from one model
fingerprint (vectors of two models are not comparable).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import gate
from .errors import UserError
from .fs import HomePath, atomic_path, is_local, read_parquet
from .home import ProjectHome
from .novelty_params import IndexParams
from .ranges import parse_range
from .schemas import file_metadata, vectors_of
from .snapshot import Snapshot
from .versions import current_name, local_version, prune_versions, staged_version, switch_current

UNDATED = np.iinfo(np.int32).max  # sort key of papers without a publication date: after every real date
KEEP_BUILDS = 2
EXACT_BLOCK_PRIORS = 131_072
BLAS_FROM_QUERIES = 20  # FAISS 1.15's default, 128,000, makes a 64-query recall sample 4.5x slower on 2 cores
MAX_EF_SEARCH = 4096


class IndexError_(UserError):
    """The index cannot be built or used as asked (the message says why)."""


@dataclass
class IndexManifest:
    build: str
    fingerprint: str
    dim: int
    papers: int
    dated: int
    params: dict
    source_release: str
    months: dict[str, list] = field(default_factory=dict)  # "YYYY-MM" -> [start, end, content hash]
    skipped: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)  # embeddings range -> file sha256
    build_seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> IndexManifest:
        return cls(**json.loads(text))

    def month_range(self, first_month: str = "") -> list[str]:
        """Every calendar month from the earliest dated paper (or ``first_month``, if later) to the latest."""
        last = max(self.months) if self.months else ""
        return months_between(max(min(self.months), first_month), last) if last >= first_month and last else []

    def month_bounds(self, month: str) -> tuple[int, int]:
        """Positions ``[start, end)`` of the month's papers; an empty month starts where the next one does."""
        if month in self.months:
            start, end, _ = self.months[month]
            return int(start), int(end)
        later = [self.months[m][0] for m in sorted(self.months) if m > month]
        position = int(later[0]) if later else self.dated
        return position, position

    def cumulative_hash(self, month: str) -> str:
        """A hash of every paper (id + vector) published up to the end of ``month``: what the month's metrics
        depend on. It changes exactly when a paper of this month or an earlier one changed."""
        digest = hashlib.sha256(self.fingerprint.encode())
        for name in (m for m in sorted(self.months) if m <= month):
            digest.update(f"{name}:{self.months[name][2]}".encode())
        return digest.hexdigest()[:16]


def month_of(days: np.ndarray) -> np.ndarray:
    """``YYYY-MM`` strings of date32 day numbers."""
    return np.datetime_as_string(days.astype("datetime64[D]").astype("datetime64[M]"), unit="M")


def month_start_day(month: str) -> int:
    return int(np.datetime64(f"{month}-01", "D").astype(np.int64))


def months_between(first: str, last: str) -> list[str]:
    start, stop = np.datetime64(first, "M"), np.datetime64(last, "M")
    return [str(m) for m in np.arange(start, stop + 1, dtype="datetime64[M]")]


def normalise(vectors: np.ndarray, in_place: bool = False, rows: int = 1 << 16) -> np.ndarray:
    """Unit rows as float32 (``in_place``: ``vectors`` itself), ``rows`` at a time: small temporaries."""
    out = vectors if in_place else np.empty_like(vectors)
    for start in range(0, len(vectors), rows):
        part = vectors[start:start + rows]
        np.divide(part, np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12), out=out[start:start + rows])
    return out.astype(np.float32, copy=False)


def index_inputs(layout: ProjectHome, verify: bool = True) -> dict[str, str]:
    """Embeddings range -> file sha256 ("" for an emptied range) of every partition that passed its checks: what a
    build indexes. ``verify=False`` trusts the quality-gate records' hashes instead of hashing the files (sensors)."""
    keys = gate.embedded_ranges(layout)
    if not keys:
        raise IndexError_("no embeddings partitions in the home yet: materialise paper_embeddings first")
    if not verify:
        inputs = {}
        for key in keys:
            record = gate.read_gate(layout, parse_range(key))
            if record is None or not record.passed:
                raise IndexError_(f"{key}: the embeddings have no passing quality-gate record")
            inputs[key] = record.file_sha256 if record.rows else ""
        return inputs
    try:
        shards = gate.collect_shards(layout, keys)
    except gate.PublishRefused as err:
        raise IndexError_("cannot index partitions that did not pass their checks: " + "; ".join(err.refused)) from err
    return {s.range_key: s.sha256 or "" for s in shards}


def _gather(layout: ProjectHome, snapshot: Snapshot) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, dict, dict]:
    """Ids, date32 days (UNDATED when missing) and vectors of every checked embeddings partition."""
    inputs = index_inputs(layout)
    files = [layout.embeddings_file(parse_range(key)) for key, sha in sorted(inputs.items()) if sha]
    fingerprints: dict[str, list[str]] = {}
    for path in files:
        fingerprint = file_metadata(path).get("model", {}).get("fingerprint", "unknown")
        fingerprints.setdefault(fingerprint, []).append(path.name)
    if len(fingerprints) > 1:
        detail = "; ".join(f"{fp}: {', '.join(names[:3])}{' …' if len(names) > 3 else ''}"
                           for fp, names in sorted(fingerprints.items()))
        raise IndexError_(f"embeddings of {len(fingerprints)} model fingerprints in the home ({detail}); "
                          "re-embed the odd ranges with the configured model before indexing")
    if not files:
        raise IndexError_("every embeddings partition is empty: nothing to index")
    tables = [read_parquet(path, columns=["corpusid", "embedding"]) for path in files]
    table = pa.concat_tables(tables)
    ids = table.column("corpusid").to_numpy()
    vectors = vectors_of(table)
    source = read_parquet(snapshot.papers_file, columns=["corpusid", "publication_date"])
    source_ids = source.column("corpusid").to_numpy()  # the snapshot is sorted by corpusid
    source_days = source.column("publication_date").cast(pa.int32()).fill_null(UNDATED).to_numpy()
    where = np.searchsorted(source_ids, ids)
    found = (where < len(source_ids)) & (source_ids[np.minimum(where, len(source_ids) - 1)] == ids)
    skipped = {"not_in_source_release": int((~found).sum())}
    ids, vectors, where = ids[found], vectors[found], where[found]
    days = source_days[where]
    skipped["no_publication_date"] = int((days == UNDATED).sum())
    return ids, days, vectors, next(iter(fingerprints)), skipped, inputs


def build_index(layout: ProjectHome, snapshot: Snapshot, params: IndexParams = IndexParams()) -> IndexManifest:
    """Build the index of the home's embeddings (dates from the snapshot) and make it the current build."""
    started = time.perf_counter()
    ids, days, vectors, fingerprint, skipped, inputs = _gather(layout, snapshot)
    return write_index(layout.index_dir, ids, days, vectors, fingerprint, snapshot.version, params, skipped,
                       started, inputs)


def _month_bounds(ids: np.ndarray, days: np.ndarray, vectors: np.ndarray, dated: int) -> dict[str, list]:
    """Month (YYYY-MM) -> [first position, end position, digest of its ids and vectors], dated papers in order."""
    months: dict[str, list] = {}
    if dated:
        names, starts = np.unique(month_of(days[:dated]), return_index=True)
        ends = list(starts[1:]) + [dated]
        for name, start, end in zip(names, starts, ends, strict=True):
            digest = hashlib.sha256(ids[start:end].tobytes())
            digest.update(vectors[start:end].tobytes())
            months[str(name)] = [int(start), int(end), digest.hexdigest()[:16]]
    return months


def _write_build(root: HomePath, manifest: IndexManifest, ids: np.ndarray, days: np.ndarray, vectors: np.ndarray,
                 params: IndexParams, started: float) -> None:
    """A new build's files under ``root/<build>/``, manifest last (staged, then renamed into place)."""
    import faiss

    with staged_version(root, manifest.build) as staging:
        dates = pa.array(days, pa.int32(), mask=days == UNDATED).cast(pa.date32())
        pq.write_table(pa.table({"corpusid": pa.array(ids, pa.int64()), "publication_date": dates}),
                       staging / "papers.parquet", compression="zstd")
        np.save(staging / "vectors.npy", vectors)
        from .device_knn import device_search_pays
        largest_month_pairs = max(((end - start) * start for start, end, _ in manifest.months.values()), default=0)
        if params.builds_graph(len(ids), largest_month_pairs, device_search=device_search_pays()):
            graph = faiss.IndexHNSWFlat(manifest.dim, params.hnsw_m)
            graph.hnsw.efConstruction = params.ef_construction
            graph.add(vectors)
            faiss.write_index(graph, str(staging / "hnsw.faiss"))
        manifest.build_seconds = round(time.perf_counter() - started, 3)
        (staging / "manifest.json").write_text(manifest.to_json(), encoding="utf-8")


def write_index(root: HomePath, ids: np.ndarray, days: np.ndarray, vectors: np.ndarray, fingerprint: str,
                source_release: str, params: IndexParams = IndexParams(), skipped: dict | None = None,
                started: float | None = None, inputs: dict[str, str] | None = None,
                latest_day: int | None = None) -> IndexManifest:
    """Order papers by (date, id), normalise, build the graph under ``root/<build>/`` and switch ``current``.

    A publication date after ``latest_day`` (default: today) is a data error, not a month to compute (one paper
    dated 2099 would add 900 empty partitions): such papers are indexed as undated and counted."""
    started = time.perf_counter() if started is None else started
    if latest_day is None:
        latest_day = int(np.datetime64(datetime.date.today(), "D").astype(np.int64))
    future = (days != UNDATED) & (days > latest_day)
    skipped = {**(skipped or {}), "future_publication_date": int(future.sum())}
    days = np.where(future, UNDATED, days).astype(np.int32)
    order = np.lexsort((ids, days))
    ids, days, vectors = ids[order], days[order], normalise(vectors[order], in_place=True)  # a copy, by `order`
    dated = int((days != UNDATED).sum())
    months = _month_bounds(ids, days, vectors, dated)
    content = hashlib.sha256(fingerprint.encode() + json.dumps(asdict(params), sort_keys=True).encode())
    content.update(ids.tobytes())
    content.update(days.tobytes())
    content.update(vectors.data)
    build = content.hexdigest()[:16]
    folder = root / build
    manifest = IndexManifest(build=build, fingerprint=fingerprint, dim=int(vectors.shape[1]), papers=len(ids),
                             dated=dated, params=asdict(params), source_release=source_release, months=months,
                             skipped=skipped, inputs=inputs or {})
    if not (folder / "manifest.json").exists():
        _write_build(root, manifest, ids, days, vectors, params, started)
    else:
        # Same papers and vectors as an existing build (e.g. a range re-embedded to identical vectors): reuse it, but
        # record what it was built from now, or the sensor would keep asking for a rebuild.
        stored = IndexManifest.from_json((folder / "manifest.json").read_text(encoding="utf-8"))
        if (stored.inputs, stored.source_release, stored.skipped) != (manifest.inputs, manifest.source_release,
                                                                      manifest.skipped):
            stored.inputs, stored.source_release, stored.skipped = (manifest.inputs, manifest.source_release,
                                                                    manifest.skipped)
            with atomic_path(folder / "manifest.json") as tmp:
                tmp.write_text(stored.to_json(), encoding="utf-8")
        manifest = stored
    switch_current(root, "build", build)
    prune_versions(root, KEEP_BUILDS, keep={build})
    return manifest


@dataclass
class Neighbours:
    """Per query row: positions of up to k neighbours (-1: none) and their cosines, best first."""

    positions: np.ndarray
    cosines: np.ndarray


class PaperIndex:
    """A complete index build: ids and dates by position, memory-mapped vectors, the HNSW graph on first use."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.manifest = IndexManifest.from_json((folder / "manifest.json").read_text(encoding="utf-8"))
        papers = pq.read_table(folder / "papers.parquet")
        self.ids = papers.column("corpusid").to_numpy()
        self.days = papers.column("publication_date").cast(pa.int32()).fill_null(UNDATED).to_numpy()
        self.vectors = np.load(folder / "vectors.npy", mmap_mode="r")
        self._graph = self._by_id = None
        self.prior_blocks = None  # device_knn.PriorBlocks, made by the first device search
        self.device_search_stats = None  # DeviceKnnStats summed over this index's device searches

    @property
    def has_graph(self) -> bool:
        return (self.folder / "hnsw.faiss").exists()

    def graph(self):
        if self._graph is None:
            import faiss

            if not self.has_graph:
                raise IndexError_(f"index build {self.manifest.build} has no HNSW graph (built for exact search)")
            self._graph = faiss.read_index(str(self.folder / "hnsw.faiss"))
        return self._graph

    def position_of(self, corpusid: int) -> int | None:
        if self._by_id is None:
            self._by_id = np.argsort(self.ids, kind="stable")
        where = np.searchsorted(self.ids, corpusid, sorter=self._by_id)
        if where < len(self.ids) and self.ids[self._by_id[where]] == corpusid:
            return int(self._by_id[where])
        return None

    def prior_end(self, before_day: int) -> int:
        """Number of dated papers published strictly before ``before_day`` (date32 day number)."""
        return int(np.searchsorted(self.days[: self.manifest.dated], before_day, side="left"))

    def search_exact(self, queries: np.ndarray, k: int, end: int) -> Neighbours:
        """The true k nearest among positions ``[0, end)`` by cosine (FAISS's BLAS k-NN over blocks of priors)."""
        import faiss

        n = len(queries)
        k_eff = min(k, end)
        positions = np.full((n, k), -1, dtype=np.int64)
        cosines = np.zeros((n, k), dtype=np.float32)
        if k_eff == 0 or n == 0:
            return Neighbours(positions, cosines)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        faiss.cvar.distance_compute_blas_threshold = BLAS_FROM_QUERIES
        best_sim, best_pos = np.full((n, 0), -np.inf, dtype=np.float32), np.zeros((n, 0), dtype=np.int64)
        for p0 in range(0, end, EXACT_BLOCK_PRIORS):
            block = np.ascontiguousarray(self.vectors[p0 : min(end, p0 + EXACT_BLOCK_PRIORS)])
            sims, found = faiss.knn(queries, block, min(k_eff, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
            best_sim = np.concatenate([best_sim, sims], axis=1)
            best_pos = np.concatenate([best_pos, found + p0], axis=1)
            if best_sim.shape[1] > k_eff:
                keep = np.argsort(-best_sim, axis=1, kind="stable")[:, :k_eff]
                best_sim, best_pos = np.take_along_axis(best_sim, keep, 1), np.take_along_axis(best_pos, keep, 1)
        positions[:, :k_eff], cosines[:, :k_eff] = best_pos, best_sim
        return Neighbours(positions, cosines)

    def search_device(self, queries: np.ndarray, k: int, end: int) -> Neighbours:
        """The true k nearest among ``[0, end)`` on the embedding device (``device_knn``)."""
        from .device_knn import DeviceKnnStats, PriorBlocks, device_knn, knn_device, search_dtype

        device, low_precision = knn_device()
        if self.prior_blocks is None:  # kept across months: they read the same leading blocks again
            self.prior_blocks = PriorBlocks(self.vectors, search_dtype(low_precision), device)
            self.device_search_stats = DeviceKnnStats()
        positions, cosines = device_knn(queries, self.vectors, end, k, device, low_precision=low_precision,
                                        stats=self.device_search_stats, blocks=self.prior_blocks)
        return Neighbours(positions, cosines)

    def search_hnsw(self, queries: np.ndarray, k: int, end: int, ef_search: int) -> Neighbours:
        """Approximate k nearest among positions ``[0, end)`` through the graph (an id-range filter)."""
        import faiss

        n = len(queries)
        if end == 0 or n == 0:
            return Neighbours(np.full((n, k), -1, dtype=np.int64), np.zeros((n, k), dtype=np.float32))
        graph = self.graph()
        params = faiss.SearchParametersHNSW()
        # The filter drops the graph's later papers from the results, not from the walk: widen the beam by the
        # share filtered out, so about ef allowed papers are still collected (measured in BENCHMARKS.md).
        params.efSearch = min(MAX_EF_SEARCH, int(np.ceil(max(ef_search, k) * graph.ntotal / end)))
        selector = None
        if end < graph.ntotal:
            selector = faiss.IDSelectorRange(0, end)
            params.sel = selector
        distances, labels = graph.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        # FAISS's L2 distances are squared: cosine = 1 - d^2 / 2 on unit vectors.
        cosines = np.where(labels >= 0, 1.0 - distances / 2.0, 0.0).astype(np.float32)
        del selector
        return Neighbours(labels.astype(np.int64), cosines)


def current_manifest(root: HomePath) -> IndexManifest | None:
    """The current build's manifest without loading ids or vectors (cheap enough for a sensor tick)."""
    build = current_name(root, "build")
    return IndexManifest.from_json((root / build / "manifest.json").read_text(encoding="utf-8")) if build else None


def current_index(root: HomePath, cache: Path | None = None) -> PaperIndex | None:
    """The current build under ``root`` (``<home>/index``), or None before the first one. On object storage the
    build is read from a local copy under ``cache`` (ProjectHome.index_cache)."""
    build = current_name(root, "build")
    if not build:
        return None
    if not is_local(root) and cache is None:
        raise ValueError("an object-storage index needs a local cache folder")
    return PaperIndex(local_version(root / build, cache))


def similar_papers(index: PaperIndex, corpusid: int, k: int = 10, before_day: int | None = None,
                   exact_max_papers: int = 200_000) -> list[tuple[int, float]]:
    """(position, cosine) of the k papers nearest to ``corpusid``, best first, optionally only those published
    before ``before_day``. The paper itself is never its own neighbour."""
    position = index.position_of(corpusid)
    if position is None:
        raise IndexError_(f"corpusid {corpusid} is not in paper_index (build {index.manifest.build}, "
                          f"{index.manifest.papers:,} papers): it is not embedded, or its range was not indexed yet")
    end = len(index.ids) if before_day is None else index.prior_end(before_day)
    query = np.asarray(index.vectors[position : position + 1])
    if end <= exact_max_papers or not index.has_graph:
        found = index.search_exact(query, k + 1, end)
    else:
        found = index.search_hnsw(query, k + 1, end, ef_search=max(64, 2 * k))
    pairs = [(int(p), float(c)) for p, c in zip(found.positions[0], found.cosines[0], strict=True)
             if p >= 0 and p != position]
    return pairs[:k]
