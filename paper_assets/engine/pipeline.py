"""The two partition steps: source range -> papers Parquet, papers Parquet -> embeddings Parquet."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import text as text_rules
from .checkpoints import ChunkCheckpoints
from .encode_stats import EncodeStats
from .fs import atomic_parquet_writer, parquet_file, read_parquet, sha256_file
from .ranges import IdRange
from .schemas import (
    DEFAULT_CHUNK_ROWS,
    EMBEDDING_ROW_GROUP,
    METADATA_KEY,
    PAPERS_SCHEMA,
    embeddings_batch,
    embeddings_schema,
    vectors_of,
)
from .source import RangeReadStats

if TYPE_CHECKING:
    from .encoder import Encoder

Progress = Callable[[int, int, float], None]  # rows done, rows total, seconds elapsed


class RangeReader(Protocol):
    """A source of one range's rows: a source database (:class:`SourceInfo`) or a release snapshot."""

    version: str

    def read(self, rng: IdRange, batch_rows: int = 8192) -> tuple[RangeReadStats, Iterator[pa.RecordBatch]]: ...


@dataclass
class PapersReport:
    rows: int = 0
    source_rows: int = 0
    duplicate_corpusid: int = 0
    rules: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    content_hash: str = ""
    source_version: str = ""
    source_range_hash: str = ""

    def as_metadata(self) -> dict:
        return {"source_version": self.source_version, "rows": self.rows, "source_rows": self.source_rows,
                "duplicate_corpusid": self.duplicate_corpusid, "rules": dict(self.rules),
                "skipped": dict(self.skipped), "content_hash": self.content_hash,
                "source_range_hash": self.source_range_hash}


def build_papers(
    reader: RangeReader, rng: IdRange, out_path: Path, sep_token: str = "[SEP]", batch_rows: int = 8192,
    source_range_hash: str = "",
) -> PapersReport:
    """Write the range's embeddable rows (id, text, text hash, rule) to ``out_path`` atomically.

    ``source_range_hash`` (the snapshot's hash of the range) is recorded so a planner can tell whether the papers
    file is current without reading the source."""
    report = PapersReport(source_version=reader.version, source_range_hash=source_range_hash)
    read_stats, batches = reader.read(rng, batch_rows)
    report.source_rows, report.duplicate_corpusid = read_stats.source_rows, read_stats.duplicate_corpusid
    content = hashlib.sha256(f"sep={sep_token}".encode())
    with atomic_parquet_writer(out_path, PAPERS_SCHEMA) as writer:
        for batch in batches:
            texts, rules = text_rules.paper_texts(batch.column("title"), batch.column("abstract"), sep_token)
            for rule, count in zip(*_counts(rules), strict=True):
                (report.skipped if rule == text_rules.SKIP_NO_TEXT else report.rules)[rule] += count
            keep = pc.is_valid(texts)
            ids, texts, rules = (pc.filter(column, keep) for column in (batch.column("corpusid"), texts, rules))
            if not len(ids):
                continue
            hashes = [text_rules.text_sha256(text) for text in texts.to_pylist()]
            content.update("".join(f"{i}:{h};" for i, h in zip(ids.to_pylist(), hashes, strict=True)).encode())
            writer.write_batch(
                pa.RecordBatch.from_arrays([pc.cast(ids, pa.int64()), texts, pa.array(hashes), rules],
                                           schema=PAPERS_SCHEMA)
            )
            report.rows += len(ids)
        report.content_hash = content.hexdigest()[:16]
        writer.add_key_value_metadata({METADATA_KEY: json.dumps(report.as_metadata(), sort_keys=True)})
    return report


def _counts(values: pa.Array) -> tuple[list[str], list[int]]:
    counted = pc.value_counts(values)
    return counted.field("values").to_pylist(), counted.field("counts").to_pylist()


@dataclass
class EmbedReport:
    rows: int = 0
    resumed_rows: int = 0
    chunks: int = 0
    resumed_chunks: int = 0
    seconds: float = 0.0
    encode: EncodeStats = field(default_factory=EncodeStats)
    rows_embedded: int = 0  # run through the model (in this run or in a resumed chunk of it)
    rows_reused: int = 0  # copied bit for bit from the previous file: same corpusid, text_sha256, model
    rows_deleted: int = 0  # in the previous file, no longer in the papers file

    @property
    def papers_per_second(self) -> float:
        return self.encode.rows / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.encode.real_tokens / self.seconds if self.seconds else 0.0


_REUSED_KEY = b"paper_assets_rows_reused"
# Checkpoint writes queued behind the writer thread before the embedding waits: bounds memory to a few chunks.
MAX_PENDING_WRITES = 2


def _heap_trimmer() -> Callable[[], object] | None:
    """glibc's ``malloc_trim``, or None on another C library."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _heap_trimmer()


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc; a no-op elsewhere, ~0.1 ms).

    Each chunk frees tens of MB of tensors and Arrow buffers of sizes that vary with its padded widths; glibc keeps
    the freed pages, scattered between live blocks, so a long partition's RSS crept up by ~15% over 200k papers
    without it (peak 965 MB, 893 MB with a trim after each chunk)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _write_checkpoint(checkpoints: ChunkCheckpoints, index: int, batch: pa.RecordBatch) -> None:
    checkpoints.write(index, batch)
    release_free_heap()


class PreviousVectors:
    """The vectors of a partition's previous embeddings file, looked up by (corpusid, text_sha256).

    Reuse needs the same model fingerprint and precision; anything else re-embeds every row. Lookups read only the
    row groups whose corpusid statistics overlap the asked ids (the file is id-sorted like the papers file), so
    memory stays bounded by a chunk however large the partition is.
    """

    def __init__(self, path: Path, fingerprint: str, precision: str):
        self.path = path
        self.parquet: pq.ParquetFile | None = None
        self.ids = np.zeros(0, dtype=np.int64)
        if not path.exists():
            return
        parquet = parquet_file(path)
        self.ids = parquet.read(columns=["corpusid"]).column("corpusid").to_numpy()
        meta = json.loads((parquet.schema_arrow.metadata or {}).get(METADATA_KEY, b"{}"))
        model = meta.get("model", {})
        if model.get("fingerprint") == fingerprint and model.get("precision") == precision:
            self.parquet = parquet
            column = parquet.schema_arrow.get_field_index("corpusid")
            self._bounds = []
            for group in range(parquet.num_row_groups):
                stats = parquet.metadata.row_group(group).column(column).statistics
                has = stats is not None and stats.has_min_max
                self._bounds.append((stats.min, stats.max) if has else (None, None))

    def deleted(self, current_ids: np.ndarray) -> int:
        return int(np.count_nonzero(~np.isin(self.ids, current_ids)))

    def lookup(self, ids: np.ndarray, hashes: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
        """(mask of rows that can reuse a stored vector, their vectors in row order) for one chunk."""
        reuse = np.zeros(len(ids), dtype=bool)
        if self.parquet is None or not len(ids):
            return reuse, None
        lo, hi = int(ids.min()), int(ids.max())
        groups = [g for g, (gmin, gmax) in enumerate(self._bounds)
                  if gmin is None or (gmin <= hi and gmax >= lo)]
        if not groups:
            return reuse, None
        stored = self.parquet.read_row_groups(groups, columns=["corpusid", "embedding", "text_sha256"])
        stored_ids = stored.column("corpusid").to_numpy()
        order = np.argsort(stored_ids, kind="stable")
        positions = np.searchsorted(stored_ids, ids, sorter=order)
        positions = np.minimum(positions, len(stored_ids) - 1)
        candidates = order[positions]
        same_id = stored_ids[candidates] == ids
        stored_hashes = np.asarray(stored.column("text_sha256").to_pylist(), dtype=object)
        same_text = stored_hashes[candidates] == np.asarray(hashes.to_pylist(), dtype=object)
        reuse = same_id & same_text
        return reuse, vectors_of(stored)[candidates[reuse]]


def _papers_chunks(papers_path: Path, chunk_rows: int) -> Iterator[pa.RecordBatch]:
    parquet = parquet_file(papers_path)
    yield from parquet.iter_batches(batch_size=chunk_rows, columns=["corpusid", "text", "text_sha256"])


@dataclass
class EmbedJob:
    """One partition to embed: its papers file, where its vectors go, and where its chunk checkpoints live.
    ``context`` is the caller's, handed back with the report (e.g. the range and its papers report)."""

    papers_path: Path
    out_path: Path
    checkpoint_dir: Path
    file_metadata: dict | None = None
    context: object = None


@dataclass
class _JobState:
    job: EmbedJob
    report: EmbedReport
    checkpoints: ChunkCheckpoints
    previous: PreviousVectors
    total: int
    done: int = 0


@dataclass
class _JobEnd:
    state: _JobState


def embed_papers(
    papers_path: Path,
    out_path: Path,
    encoder: Encoder,
    checkpoint_dir: Path,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    file_metadata: dict | None = None,
    progress: Progress | None = None,
) -> EmbedReport:
    """Embed every row of a papers file into ``out_path`` (atomically), checkpointing each finished chunk.

    Rows whose (corpusid, text_sha256) already have a vector from the same model in the current ``out_path``
    reuse it bit for bit; only new or changed rows go through the model, and rows that left the papers file are
    dropped (counted in the report)."""
    [(_, report)] = embed_partitions([EmbedJob(papers_path, out_path, checkpoint_dir, file_metadata)], encoder,
                                     chunk_rows, progress)
    return report


def _chunks_to_encode(jobs: Iterable[EmbedJob], encoder: Encoder, chunk_rows: int
                      ) -> Iterator[tuple[object, list[str]]]:
    """Per job, each chunk that still needs vectors as (payload, texts to embed), then its end marker: checkpointed
    chunks are skipped, rows whose vector can be reused are not embedded again."""
    for job in jobs:
        state = _open_job(job, encoder, chunk_rows)
        for index, chunk in enumerate(_papers_chunks(job.papers_path, chunk_rows)):
            if state.checkpoints.has(index):
                state.report.resumed_chunks += 1
                state.report.resumed_rows += chunk.num_rows
                state.done += chunk.num_rows
                continue
            reuse, reused = state.previous.lookup(chunk.column("corpusid").to_numpy(), chunk.column("text_sha256"))
            texts = chunk.column("text").filter(pa.array(~reuse)).to_pylist()
            # The payload waits in the tokenizer queue: keep only the columns written back, not the texts.
            yield (state, index, chunk.select(["corpusid", "text_sha256"]), reuse, reused), texts
        yield _JobEnd(state), []


def _chunk_batch(chunk: pa.Table, reuse: np.ndarray, embedded: np.ndarray, reused: np.ndarray | None,
                 schema: pa.Schema) -> pa.RecordBatch:
    """A chunk's checkpoint: its ids and hashes with the new vectors and the reused ones in row order."""
    vectors = np.empty((chunk.num_rows, schema.field("embedding").type.list_size), dtype=np.float32)
    vectors[~reuse] = embedded
    if reused is not None:
        vectors[reuse] = reused
    batch = embeddings_batch(chunk.column("corpusid").to_numpy(), vectors, chunk.column("text_sha256"), schema)
    return batch.replace_schema_metadata({_REUSED_KEY: str(int(reuse.sum())).encode()})


def embed_partitions(
    jobs: Iterable[EmbedJob], encoder: Encoder, chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: Progress | None = None,
) -> Iterator[tuple[EmbedJob, EmbedReport]]:
    """:func:`embed_papers` for several partitions through one encoder stream, yielding each partition's report
    as soon as its file is written.

    The stream does not drain between partitions: the next partition's first chunks are read and tokenised, and
    queued on the device, while this one's last chunk is collected and its file assembled, so a device that embeds
    a partition in seconds does not idle at every partition boundary. Checkpoints and partition files are written
    by one writer thread, in order, so the thread that launches kernels does not wait for a write and its fsync (a
    failed write is raised here; on an interruption the writes already handed over finish first). ``jobs`` is
    consumed lazily from the tokenizer thread (a job may wait there for its papers file to be built)."""
    hidden_size = encoder.loaded.hidden_size
    chunk_schema = embeddings_schema(hidden_size)
    last_finished = time.perf_counter()

    # Files are written by one writer thread, in order: a checkpoint's write and fsync (~0.1 s per 4,096-row chunk)
    # and a partition's assembly (~0.3 s per 20k rows) would otherwise hold up the thread that launches kernels.
    writer = ThreadPoolExecutor(1, thread_name_prefix="paper-assets-writer")
    writes: deque[Future] = deque()
    assembling: deque[tuple[_JobState, Future]] = deque()

    def assemble(state: _JobState) -> float:
        _assemble(state, hidden_size)
        return time.perf_counter()

    def written(wait: bool) -> Iterator[tuple[EmbedJob, EmbedReport]]:
        nonlocal last_finished
        while writes and (writes[0].done() or len(writes) > MAX_PENDING_WRITES):
            writes.popleft().result()  # a failed write is raised here, on the embedding's thread
        while assembling and (wait or assembling[0][1].done()):
            state, future = assembling.popleft()
            finished = future.result()
            state.report.seconds = finished - last_finished  # consecutive partitions: their times add up
            last_finished = finished
            yield state.job, state.report

    try:
        for payload, embedded, stats in encoder.encode_stream(_chunks_to_encode(jobs, encoder, chunk_rows)):
            if isinstance(payload, _JobEnd):
                assembling.append((payload.state, writer.submit(assemble, payload.state)))
                yield from written(wait=False)
                continue
            state, index, chunk, reuse, reused = payload
            batch = _chunk_batch(chunk, reuse, embedded, reused, chunk_schema)
            writes.append(writer.submit(_write_checkpoint, state.checkpoints, index, batch))
            state.report.encode.add(stats)
            state.done += chunk.num_rows
            yield from written(wait=False)
            if progress:
                progress(state.done, state.total, time.perf_counter() - last_finished)
        yield from written(wait=True)
        while writes:
            writes.popleft().result()
    finally:
        writer.shutdown(wait=True)


def _open_job(job: EmbedJob, encoder: Encoder, chunk_rows: int) -> _JobState:
    loaded = encoder.loaded
    checkpoints = ChunkCheckpoints(
        job.checkpoint_dir,
        {"papers_sha256": sha256_file(job.papers_path)[:16], "model": loaded.fingerprint, "chunk_rows": chunk_rows,
         "precision": loaded.precision},
    )
    return _JobState(job, EmbedReport(), checkpoints, PreviousVectors(job.out_path, loaded.fingerprint,
                                                                      loaded.precision),
                     parquet_file(job.papers_path).metadata.num_rows)


def _assemble(state: _JobState, hidden_size: int) -> None:
    """Write the partition's file from its chunk checkpoints (atomically), then drop the checkpoints."""
    job, report = state.job, state.report
    with atomic_parquet_writer(job.out_path, embeddings_schema(hidden_size, job.file_metadata)) as writer:
        for chunk_file in state.checkpoints.chunks():
            table = read_parquet(chunk_file)
            reused = int((table.schema.metadata or {}).get(_REUSED_KEY, b"0"))
            report.rows_reused += reused
            report.rows_embedded += table.num_rows - reused
            writer.write_table(table.cast(writer.schema), row_group_size=EMBEDDING_ROW_GROUP)
            report.rows += table.num_rows
            report.chunks += 1
        if report.rows != state.total:  # raised inside the writer: the previous good file stays in place
            raise RuntimeError(f"embedded {report.rows} rows but {job.papers_path} has {state.total}; "
                               "checkpoints inconsistent")
        report.rows_deleted = state.previous.deleted(read_parquet(job.papers_path, columns=["corpusid"]).column(
            "corpusid").to_numpy())
    state.checkpoints.clear()
