"""hub_shards: every range's embeddings published to a Hub dataset repo (or a local folder laid out like one).

One asset, not one per range: a release is published as one commit (a few when more than ~100 files changed),
unchanged shards are skipped by sha256, ranges that lost every row are deleted, and the card is updated last.
"""

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from ..engine import gate
from ..engine.home import ProjectHome
from ..engine.publish import PublishReport, Shard, publish_shards
from ..engine.snapshot import current_snapshot
from .resources import ProjectHomeResource, ShardPublisherResource
from .transient import retry_transient_errors


def publish_home(layout: ProjectHome, publisher: ShardPublisherResource, range_keys: list[str] | None = None,
                 ) -> tuple[list[Shard], PublishReport]:
    """Publish these ranges (default: every embedded range of the home) through the quality gate."""
    keys = gate.embedded_ranges(layout) if range_keys is None else range_keys
    shards = gate.collect_shards(layout, keys)
    snapshot = current_snapshot(layout.source_dir)
    release = snapshot.version if snapshot else "unknown"
    target = publisher.target()
    report = publish_shards(target, shards, gate.card_builder(layout, release),
                            message=f"paper_assets: release {release}, {len(shards)} range(s)",
                            max_files_per_commit=publisher.max_files_per_commit)
    if range_keys is None:
        gate.record_published(layout, publisher.description(), {
            s.path_in_repo: report.remote[s.path_in_repo].sha256 if s.path_in_repo in report.remote else None
            for s in shards})
    return shards, report


def mismatches(shards: list[Shard], report: PublishReport) -> list[str]:
    found = []
    for shard in shards:
        remote = report.remote.get(shard.path_in_repo)
        if shard.local is None:
            if remote is not None:
                found.append(f"{shard.path_in_repo} still present remotely")
        elif remote is None or remote.sha256 != shard.local_sha256():
            found.append(f"{shard.path_in_repo} differs remotely")
    return found


@asset(
    deps=["paper_embeddings"],
    group_name="publishing",
    check_specs=[AssetCheckSpec(
        "published_matches_local", asset="hub_shards",
        description="every published shard has the local file's sha256; emptied ranges are gone")],
    description="Every range's embeddings as one Parquet shard in a Hub dataset repo, with a dataset card naming "
    "the source release; only changed shards are uploaded, emptied ranges are deleted.",
)
@retry_transient_errors
def hub_shards(context: AssetExecutionContext, publisher: ShardPublisherResource,
               home: ProjectHomeResource) -> MaterializeResult:
    shards, report = publish_home(home.layout(), publisher)
    mismatched = mismatches(shards, report)
    snapshot = current_snapshot(home.layout().source_dir)
    return MaterializeResult(
        metadata={
            "target": report.target,
            "source_release": snapshot.version if snapshot else "unknown",
            "commit_sha": report.commit_sha or "none (nothing changed)",
            "commit_url": MetadataValue.url(report.commit_url) if report.commit_url else "none",
            "commits": len(report.commits),
            "files_uploaded": len(report.uploaded),
            "files_skipped_unchanged": len(report.skipped),
            "files_deleted": len(report.deleted),
            "bytes_uploaded": report.bytes_uploaded,
            "conflicts_412_retried": report.conflicts,
            "transient_errors_retried": report.transient_retries,
            "dagster/row_count": sum(s.rows for s in shards),
            "shards": MetadataValue.md("\n".join(f"- `{s.path_in_repo}`: {s.rows:,} rows" for s in shards)),
        },
        check_results=[AssetCheckResult(
            check_name="published_matches_local", passed=not mismatched, severity=AssetCheckSeverity.ERROR,
            description="every published shard has the local file's sha256 (and emptied ranges are gone)",
            metadata={"checked": len(shards), "mismatched": "\n".join(mismatched) or "none"},
        )],
    )
