"""papers[range] and paper_embeddings[range]: the cleaned text of a range and its SPECTER2 vectors."""


import json
import os
import socket
import time

import numpy as np
from dagster import (
    AssetCheckSpec,
    AssetExecutionContext,
    Failure,
    MetadataValue,
    TableColumn,
    TableSchema,
    asset,
)
from dagster_duckdb import DuckDBResource

from ..engine import quality
from ..engine.embed_home import RangeToEmbed, embed_ranges
from ..engine.fs import parquet_metadata
from ..engine.pipeline import build_papers
from ..engine.quality import Outcome
from ..engine.ranges import IdRange, parse_range
from ..engine.schemas import METADATA_KEY
from ..engine.snapshot import current_snapshot
from ..settings import load_settings
from . import catalog as catalog_views
from .executor import CELERY_QUEUE_TAG, EMBED_QUEUE, K8S_CONFIG_TAG, K8S_GPU_STEP
from .partitions import corpusid_ranges
from .ranged import backfill_policy, partition_results, run_partition_keys, shared_result
from .resources import ProjectHomeResource, Specter2Resource
from .transient import mark_not_retriable, retry_transient_errors

EMBEDDING_CHECKS = {
    "row_count": "one embedding per eligible source row of the range (skipped rows reported by reason)",
    "vectors_valid": "no NaN/Inf or all-zero vectors; dimension equals the model's hidden size",
    "corpusid_unique_in_range": "every corpusid unique and inside the partition's range",
    "norms_in_band": "L2 norms within median ± k·MAD learned across partitions (or a configured band)",
    "adapter_canary": "a fixed text reproduces its fingerprinted reference vector and the adapter changes it",
}


RANGES_PER_RUN = backfill_policy(load_settings().partitions_per_run)


def partition_ranges(context: AssetExecutionContext) -> list[IdRange]:
    """The ranges of this run: one, or every range of a backfill run (``RANGES_PER_RUN``)."""
    return [parse_range(key) for key in run_partition_keys(context)]


@asset(
    partitions_def=corpusid_ranges,
    deps=["s2_source"],
    group_name="embeddings",
    # 2: fields normalised like the BERT tokenizer (control characters deleted, not spaced); 3: read from the snapshot
    code_version="3",
    backfill_policy=RANGES_PER_RUN,
    description="Embeddable rows of one corpusid range: id, text (title [SEP] abstract), text sha256, text rule.",
)
@retry_transient_errors
def papers(
    context: AssetExecutionContext,
    specter2: Specter2Resource,
    home: ProjectHomeResource,
    catalog: DuckDBResource,
):
    layout = home.layout()
    snapshot = current_snapshot(layout.source_dir)
    if snapshot is None:
        raise Failure("no source snapshot in the home yet: materialise s2_source first")
    results, versions = {}, {}
    for rng in partition_ranges(context):
        out = layout.papers_file(rng)
        range_hash = snapshot.manifest.ranges.get(rng.key, {}).get("content_hash", "")
        report = build_papers(snapshot, rng, out, sep_token=specter2.sep_token, source_range_hash=range_hash)
        results[rng.key] = _papers_metadata(report, snapshot, out)
        versions[rng.key] = report.content_hash
    catalog_views.refresh(catalog, layout)
    return shared_result(context, results, ("dagster/row_count", "source_rows", "path"), versions)


def _papers_metadata(report, snapshot, out) -> dict:
    return {
            "dagster/row_count": report.rows,
            "source_rows": report.source_rows,
            **{f"rule_{k}": v for k, v in sorted(report.rules.items())},
            **{f"skipped_{k}": v for k, v in sorted(report.skipped.items())},
            "source_release": snapshot.version,
            "path": MetadataValue.path(str(out)),
            "duckdb_view": "papers",
            "dagster/column_schema": TableSchema(columns=[
                TableColumn("corpusid", "int64"), TableColumn("text", "string"),
                TableColumn("text_sha256", "string"), TableColumn("text_rule", "string")]),
    }


class _ProgressLog:
    def __init__(self, context: AssetExecutionContext, every_seconds: float = 30.0):
        self.context, self.every, self.last = context, every_seconds, 0.0

    def __call__(self, done: int, total: int, elapsed: float) -> None:
        if elapsed - self.last < self.every and done < total:
            return
        self.last = elapsed
        rate = done / elapsed if elapsed else 0.0
        eta = (total - done) / rate if rate else float("nan")
        self.context.log.info(f"embedded {done:,}/{total:,} papers ({done / max(total, 1):.1%}), "
                              f"{rate:,.1f} papers/s, ETA {eta:,.0f} s")


@asset(
    partitions_def=corpusid_ranges,
    deps=["papers"],
    group_name="embeddings",
    code_version="1",
    pool="gpu",
    # Celery: embedding steps go to the workers bound to a device (`paper-assets worker`); k8s: a pod with a GPU.
    op_tags={CELERY_QUEUE_TAG: EMBED_QUEUE, K8S_CONFIG_TAG: K8S_GPU_STEP},
    check_specs=[AssetCheckSpec(name, asset="paper_embeddings", blocking=True, description=text)
                 for name, text in EMBEDDING_CHECKS.items()],
    backfill_policy=RANGES_PER_RUN,  # the same as papers': both steps of a backfill run cover the same ranges
    output_required=False,
    description="Embeddings (CLS, float32) per corpusid of one range from the configured SPECTER2-architecture "
    "model (allenai/specter2_base + the proximity adapter unless configured otherwise; the offline demo's stand-in "
    "makes 384-d vectors, SPECTER2 768-d), with text hash and model fingerprint. A backfill embeds its ranges in "
    "one run, each range with its own materialisation and check results.",
)
@retry_transient_errors
def paper_embeddings(
    context: AssetExecutionContext,
    specter2: Specter2Resource,
    home: ProjectHomeResource,
    catalog: DuckDBResource,
):
    layout = home.layout()
    todo, rows = [], 0
    for rng in partition_ranges(context):
        papers_file = layout.papers_file(rng)
        if not papers_file.exists():
            raise Failure(f"papers[{rng.key}] is not materialised ({papers_file} missing): materialise papers first")
        papers_parquet = parquet_metadata(papers_file)
        rows += papers_parquet.num_rows
        todo.append(RangeToEmbed(rng, papers_file, json.loads((papers_parquet.metadata or {}).get(METADATA_KEY,
                                                                                                 b"{}"))))
    load_started = time.perf_counter()
    model_was_loaded = specter2.is_loaded()
    encoder = specter2.get_encoder(expected_rows=rows)
    loaded = encoder.loaded
    load_seconds = time.perf_counter() - load_started
    worker = f"{socket.gethostname()}:{os.getpid()}"
    # Names the ranges in the worker's own log too: an operator (or a test) can tell which partition it holds.
    context.log.info(f"embedding {', '.join(t.rng.key for t in todo)}: {rows:,} papers on {loaded.device} "
                     f"({loaded.precision}) in {worker}")
    embedded = list(embed_ranges(todo, layout, encoder, specter2.gate_policy(), chunk_rows=specter2.chunk_rows,
                                 progress=_ProgressLog(context)))
    catalog_views.refresh(catalog, layout)
    results, versions = {}, {}
    for item, done in zip(todo, embedded, strict=True):
        verdict = done.verdict
        if not verdict.gate.passed:  # a blocking check fails the step: the same vectors would fail it again
            mark_not_retriable(context)
        metadata = _embedding_metadata(done.report, verdict, encoder, specter2, item.papers_meta, done.out_file,
                                       worker, load_seconds, model_was_loaded)
        outcomes = [Outcome(o.name, o.passed, o.description, _check_metadata(o.metadata)) for o in verdict.outcomes]
        results[item.rng.key] = (metadata, outcomes)
        versions[item.rng.key] = f"{loaded.fingerprint}-{item.papers_meta.get('content_hash')}"
    yield from partition_results(context, results, EMBEDDING_CHECKS, versions)


def _embedding_metadata(report, verdict, encoder, specter2: Specter2Resource, papers_meta: dict, out,
                        worker: str, load_seconds: float, model_was_loaded: bool) -> dict:
    """What a partition's materialisation shows in the UI."""
    scan, norm_stats, decision, loaded, stats = (verdict.scan, verdict.norm_stats, verdict.gate, encoder.loaded,
                                                 report.encode)
    return {
        "dagster/row_count": scan.rows,
        "dagster/column_schema": TableSchema(columns=[
            TableColumn("corpusid", "int64"), TableColumn("embedding", f"fixed_size_list<float32>[{scan.dim}]"),
            TableColumn("text_sha256", "string")]),
        "papers_per_second": round(report.papers_per_second, 2),
        "tokens_per_second": round(report.tokens_per_second, 1),
        "token_efficiency": round(stats.token_efficiency, 4),
        "forward_batches": stats.batches,
        "truncated_rows_512": stats.truncated_rows,
        "nan_batches_recomputed": stats.nan_batches_recomputed,
        "oom_splits": stats.oom_splits,
        "resumed_rows_from_checkpoint": report.resumed_rows,
        "rows_embedded": report.rows_embedded,
        "rows_reused": report.rows_reused,
        "rows_deleted": report.rows_deleted,
        "seconds": round(report.seconds, 2),
        "model_load_seconds": round(load_seconds, 2),
        # Which process embedded this partition, and whether it had to load the model (a long-lived worker
        # loads it once and keeps it for every later step).
        "worker": worker,
        "model_loaded_in_this_step": not model_was_loaded,
        "device": str(loaded.device),
        "precision": loaded.precision,
        "attn_implementation": loaded.config.attn_implementation,
        "compiled": encoder.compiled,
        "token_budget": encoder.token_budget,
        "model_base": specter2.base_model,
        "model_adapter": specter2.adapter,
        "model_fingerprint": loaded.fingerprint,
        "adapter": f"{specter2.adapter_name} active",
        "dimension": scan.dim,
        "source_release": str(papers_meta.get("source_version")),
        "source_papers_content_hash": str(papers_meta.get("content_hash")),
        **{f"norm_{k}": round(v, 6) for k, v in norm_stats.items() if k != "count"},
        "norm_histogram": MetadataValue.md(quality.markdown_histogram(scan.norms)),
        "path": MetadataValue.path(str(out)),
        "duckdb_view": "embeddings",
        "quality_gate": "passed" if decision.passed else f"FAILED: {', '.join(decision.failed)}",

    }


def _check_metadata(values: dict) -> dict:
    return {k: (float(v) if isinstance(v, float | np.floating) else v) for k, v in values.items()}
