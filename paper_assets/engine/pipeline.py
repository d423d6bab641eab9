"""The two partition steps: source range -> papers Parquet, papers Parquet -> embeddings Parquet."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import text as text_rules
from .encoder import Encoder, EncodeStats
from .ranges import IdRange
from .source import SourceInfo, read_range
from .storage import (
    DEFAULT_CHUNK_ROWS,
    EMBEDDING_ROW_GROUP,
    METADATA_KEY,
    PAPERS_SCHEMA,
    ChunkCheckpoints,
    atomic_parquet_writer,
    embeddings_batch,
    embeddings_schema,
    sha256_file,
)

Progress = Callable[[int, int, float], None]  # rows done, rows total, seconds elapsed


@dataclass
class PapersReport:
    rows: int = 0
    source_rows: int = 0
    duplicate_corpusid: int = 0
    rules: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    content_hash: str = ""
    source_version: str = ""

    def as_metadata(self) -> dict:
        return {"source_version": self.source_version, "rows": self.rows, "source_rows": self.source_rows,
                "duplicate_corpusid": self.duplicate_corpusid, "rules": dict(self.rules),
                "skipped": dict(self.skipped), "content_hash": self.content_hash}


def build_papers(
    info: SourceInfo, rng: IdRange, out_path: Path, sep_token: str = "[SEP]", batch_rows: int = 8192
) -> PapersReport:
    """Write the range's embeddable rows (id, text, text hash, rule) to ``out_path`` atomically."""
    report = PapersReport(source_version=info.version)
    read_stats, batches = read_range(info, rng, batch_rows)
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

    @property
    def papers_per_second(self) -> float:
        computed = self.rows - self.resumed_rows
        return computed / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.encode.real_tokens / self.seconds if self.seconds else 0.0


def _papers_chunks(papers_path: Path, chunk_rows: int) -> Iterator[pa.RecordBatch]:
    parquet = pq.ParquetFile(papers_path)
    yield from parquet.iter_batches(batch_size=chunk_rows, columns=["corpusid", "text", "text_sha256"])


def embed_papers(
    papers_path: Path,
    out_path: Path,
    encoder: Encoder,
    checkpoint_dir: Path,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    file_metadata: dict | None = None,
    progress: Progress | None = None,
) -> EmbedReport:
    """Embed every row of a papers file into ``out_path`` (atomically), checkpointing each finished chunk."""
    started = time.perf_counter()
    report = EmbedReport()
    total = pq.ParquetFile(papers_path).metadata.num_rows
    papers_digest = sha256_file(papers_path)[:16]
    loaded = encoder.loaded
    checkpoints = ChunkCheckpoints(
        checkpoint_dir,
        {"papers_sha256": papers_digest, "model": loaded.fingerprint, "chunk_rows": chunk_rows,
         "precision": loaded.precision},
    )
    schema = embeddings_schema(loaded.hidden_size)
    done = 0

    def todo() -> Iterator[tuple[tuple[int, pa.RecordBatch], list[str]]]:
        nonlocal done
        for index, chunk in enumerate(_papers_chunks(papers_path, chunk_rows)):
            if checkpoints.has(index):
                report.resumed_chunks += 1
                report.resumed_rows += chunk.num_rows
                done += chunk.num_rows
                continue
            # The payload waits in the tokenizer queue: keep only the columns written back, not the texts.
            yield (index, chunk.select(["corpusid", "text_sha256"])), chunk.column("text").to_pylist()

    for (index, chunk), vectors, stats in encoder.encode_stream(todo()):
        checkpoints.write(index, embeddings_batch(chunk.column("corpusid").to_numpy(), vectors,
                                                  chunk.column("text_sha256"), schema))
        report.encode.add(stats)
        done += chunk.num_rows
        if progress:
            progress(done, total, time.perf_counter() - started)

    with atomic_parquet_writer(out_path, embeddings_schema(loaded.hidden_size, file_metadata)) as writer:
        for chunk_file in checkpoints.chunks():
            table = pq.read_table(chunk_file)
            writer.write_table(table.cast(writer.schema), row_group_size=EMBEDDING_ROW_GROUP)
            report.rows += table.num_rows
            report.chunks += 1
        if report.rows != total:  # raised inside the writer: the previous good file stays in place
            raise RuntimeError(f"embedded {report.rows} rows but {papers_path} has {total}; checkpoints inconsistent")
    checkpoints.clear()
    report.seconds = time.perf_counter() - started
    return report
