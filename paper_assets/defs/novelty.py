"""paper_index (every embedded paper by publication date, one HNSW graph), paper_novelty[month] and hub_novelty."""

import numpy as np
from dagster import (
    AssetCheckSpec,
    AssetExecutionContext,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableSchema,
    asset,
)
from dagster_duckdb import DuckDBResource

from ..engine import gate, novelty, quality
from ..engine.paper_index import build_index, current_index
from ..engine.publish import Shard, novelty_path, publish_shards
from ..engine.snapshot import current_snapshot
from . import catalog as catalog_views
from .partitions import PUBLICATION_MONTHS, publication_months
from .ranged import ONE_RUN_PER_BACKFILL, partition_results, run_partition_keys
from .resources import NoveltyResource, ProjectHomeResource, ShardPublisherResource

NOVELTY_CHECKS = {
    "recall_at_k": "recall@K of the month's search against exact search on a sample >= min_recall",
    "metrics_in_unit_interval": "every novelty metric finite and in [0, 1]",
    "one_row_per_paper": "exactly one row per paper of the month in the index",
}


@asset(
    deps=["paper_embeddings", "s2_source"],
    group_name="novelty",
    code_version="1",
    description="Every embedded paper that passed its checks, ordered by publication date (from the source "
    "snapshot), L2-normalised, in one FAISS HNSW graph (built from graph_min_papers papers on): answers 'K nearest "
    "among papers published before D' with an id-range filter. Registers the publication_months partitions.",
)
def paper_index(context: AssetExecutionContext, home: ProjectHomeResource,
                novelty_config: NoveltyResource) -> MaterializeResult:
    layout = home.layout()
    snapshot = current_snapshot(layout.source_dir)
    if snapshot is None:
        raise Failure("no source snapshot in the home yet: materialise s2_source first")
    manifest = build_index(layout, snapshot, novelty_config.index_params())
    months = manifest.month_range(novelty_config.params().first_month)
    known = set(context.instance.get_dynamic_partitions(PUBLICATION_MONTHS))
    new_months = [m for m in months if m not in known]
    if new_months:
        context.instance.add_dynamic_partitions(PUBLICATION_MONTHS, new_months)
    stale = novelty.stale_months(layout, manifest, months, novelty_config.params())
    return MaterializeResult(
        metadata={
            "dagster/row_count": manifest.papers,
            "dated_papers": manifest.dated,
            **{f"skipped_{k}": v for k, v in sorted(manifest.skipped.items())},
            "model_fingerprint": manifest.fingerprint,
            "dimension": manifest.dim,
            "build": manifest.build,
            "hnsw_graph": (layout.index_dir / manifest.build / "hnsw.faiss").exists(),
            "build_seconds": manifest.build_seconds,
            "months": len(months),
            "first_month": months[0] if months else "none",
            "last_month": months[-1] if months else "none",
            "new_months": len(new_months),
            "stale_novelty_months": MetadataValue.md(", ".join(stale) or "none"),
            "source_release": manifest.source_release,
            "path": MetadataValue.path(str(layout.index_dir / manifest.build)),
        },
        data_version=DataVersion(manifest.build),
    )


@asset(
    partitions_def=publication_months,
    deps=["paper_index"],
    group_name="novelty",
    code_version="1",
    check_specs=[AssetCheckSpec(name, asset="paper_novelty", blocking=True, description=text)
                 for name, text in NOVELTY_CHECKS.items()],
    backfill_policy=ONE_RUN_PER_BACKFILL,
    output_required=False,
    description="Novelty of every paper of one publication month against all papers published before it (the "
    "metrics' authors' formulas: 1 − mean/max/min/median cosine of the K nearest earlier papers, and the harmonic "
    "form). Depends on dates, not on which months ran before: any month can be rematerialised alone. A backfill "
    "runs every selected month in one run, each month with its own materialisation and check results.",
)
def paper_novelty(context: AssetExecutionContext, home: ProjectHomeResource, novelty_config: NoveltyResource,
                  catalog: DuckDBResource):
    layout = home.layout()
    index = current_index(layout.index_dir, layout.index_cache)
    if index is None:
        raise Failure("paper_index is not materialised yet: materialise it first")
    params = novelty_config.params()
    results, versions = {}, {}
    for month in run_partition_keys(context):
        result = novelty.compute_month(index, month, params)
        outcomes = novelty.check_month(result, index, params)
        novelty.write_month(layout, result, index, params, outcomes)
        results[month] = (_month_metadata(layout, result, index, params, month), outcomes)
        versions[month] = result.input_hash
    catalog_views.refresh(catalog, layout)
    yield from partition_results(context, results, NOVELTY_CHECKS, versions)


def _month_metadata(layout, result, index, params, month: str) -> dict:
    means = result.table.column("novelty_mean").to_numpy()
    return {
        "dagster/row_count": result.papers,
        "prior_papers": result.prior_papers,
        "seconds": round(result.seconds, 3),
        "search": result.search,
        "recall_estimate": result.recall if result.recall is not None else "n/a (no prior papers)",
        "recall_sample": result.recall_sample,
        "ef_search": result.ef_search if result.ef_search is not None else "n/a (exact)",
        "k": params.k,
        "index_build": index.manifest.build,
        "input_hash": result.input_hash,
        "novelty_mean_median": float(np.median(means)) if len(means) else 0.0,
        "novelty_mean_histogram": MetadataValue.md(quality.markdown_histogram(means, title="novelty_mean")),
        "novelty_max_histogram": MetadataValue.md(quality.markdown_histogram(
            result.table.column("novelty_max").to_numpy(), title="novelty_max")),
        "path": MetadataValue.path(str(layout.novelty_file(month))),
        "duckdb_view": "paper_novelty",
        "dagster/column_schema": TableSchema(columns=[
            TableColumn(field.name, str(field.type)) for field in novelty.NOVELTY_SCHEMA]),
    }


@asset(
    deps=["paper_novelty"],
    group_name="publishing",
    description="The novelty months that passed their checks, as novelty/novelty-YYYY-MM.parquet beside the "
    "embeddings shards of the same dataset repo (the card describes the columns); unchanged files are skipped.",
)
def hub_novelty(context: AssetExecutionContext, publisher: ShardPublisherResource,
                home: ProjectHomeResource) -> MaterializeResult:
    layout = home.layout()
    present = gate.published_novelty(layout)
    refused = [m for m in novelty.novelty_months(layout) if m not in present]
    if refused:
        context.log.warning(f"not publishing month(s) whose checks failed: {', '.join(refused)}")
    files = [Shard(range_key=month, local=layout.novelty_file(month), rows=rows, repo_path=novelty_path(month))
             for month, rows in sorted(present.items())]
    snapshot = current_snapshot(layout.source_dir)
    release = snapshot.version if snapshot else "unknown"
    report = publish_shards(publisher.target(), files, gate.card_builder(layout, release),
                            message=f"paper_assets: novelty metrics, {len(files)} month(s)",
                            max_files_per_commit=publisher.max_files_per_commit)
    return MaterializeResult(metadata={
        "target": report.target,
        "commit_url": MetadataValue.url(report.commit_url) if report.commit_url else "none",
        "files_uploaded": len(report.uploaded),
        "files_skipped_unchanged": len(report.skipped),
        "months_refused_failed_checks": len(refused),
        "dagster/row_count": sum(present.values()),
    })
