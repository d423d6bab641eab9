"""Embed ranges into a home, gated: the partition step that ``paper_embeddings`` (one range per run) and
``paper-assets embed`` (every range through one encoder stream) share.

Each range's papers file is embedded into the home's ``embeddings-<range>.parquet`` (chunk checkpoints, row-level
reuse, an atomic write: ``pipeline.embed_partitions``), then its blocking checks run and their verdict is recorded
beside the file (``partition_gate.evaluate_partition``), where every publisher reads it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .fs import HomePath
from .home import ProjectHome
from .partition_gate import PartitionVerdict, evaluate_partition
from .pipeline import EmbedJob, EmbedReport, Progress, embed_partitions
from .quality import GatePolicy
from .ranges import IdRange
from .schemas import DEFAULT_CHUNK_ROWS

if TYPE_CHECKING:  # the model libraries load in the step that embeds, not with the definitions
    from .encoder import Encoder


@dataclass
class RangeToEmbed:
    """A range and its papers file, with that file's metadata (rows, skipped, content hash, source release);
    ``context`` is the caller's, handed back with the result."""

    rng: IdRange
    papers_file: HomePath
    papers_meta: dict
    context: object = None


@dataclass
class EmbeddedRange:
    rng: IdRange
    out_file: HomePath
    report: EmbedReport
    verdict: PartitionVerdict
    context: object = None


def embedding_file_metadata(model_meta: dict, rng: IdRange, papers_meta: dict) -> dict:
    """What an embeddings file records about how it was made (Parquet file metadata, key ``paper_assets``)."""
    return {"model": model_meta, "range": rng.key, "papers_content_hash": papers_meta.get("content_hash"),
            "source_release": papers_meta.get("source_version")}


def embed_ranges(ranges: Iterable[RangeToEmbed], layout: ProjectHome, encoder: Encoder, policy: GatePolicy,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, progress: Progress | None = None) -> Iterator[EmbeddedRange]:
    """Embed and gate each range in turn (``ranges`` is read lazily: a papers file may still be in the making);
    yields each range's result as soon as its verdict is recorded."""
    model_meta = encoder.loaded.metadata()

    def jobs() -> Iterator[EmbedJob]:
        for item in ranges:
            yield EmbedJob(item.papers_file, layout.embeddings_file(item.rng), layout.checkpoint_dir(item.rng),
                           embedding_file_metadata(model_meta, item.rng, item.papers_meta), context=item)

    for job, report in embed_partitions(jobs(), encoder, chunk_rows, progress):
        item: RangeToEmbed = job.context
        verdict = evaluate_partition(layout, item.rng, job.out_path, encoder, item.papers_meta, model_meta, policy)
        yield EmbeddedRange(item.rng, job.out_path, report, verdict, item.context)
