"""hub_shards[range]: the embeddings Parquet published to a Hub dataset repo (or a local folder like one)."""


import json

import pyarrow.parquet as pq
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    BackfillPolicy,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from ..engine.card import dataset_card
from ..engine.publish import Shard, publish_shards, shard_path
from ..engine.ranges import parse_range
from ..engine.storage import ProjectHome, file_metadata, sha256_file
from .embeddings import gate_file
from .partitions import corpusid_ranges
from .resources import ProjectHomeResource, ShardPublisherResource


def collect_shards(layout: ProjectHome, range_keys: list[str]) -> list[Shard]:
    """The shards to publish for these ranges; refuses ranges whose embeddings failed their blocking checks."""
    shards, refused = [], []
    for key in range_keys:
        rng = parse_range(key)
        path = layout.embeddings_file(rng)
        if not path.exists():
            refused.append(f"{key}: paper_embeddings not materialised")
            continue
        gate_path = gate_file(layout, rng)
        gate = json.loads(gate_path.read_text(encoding="utf-8")) if gate_path.exists() else None
        if gate is None or gate.get("file_sha256") != sha256_file(path):
            refused.append(f"{key}: no quality-gate record for the current embeddings file (re-materialise it)")
            continue
        if not gate["passed"]:
            refused.append(f"{key}: blocking checks failed ({', '.join(gate['failed'])})")
            continue
        rows = pq.read_metadata(path).num_rows
        shards.append(Shard(rng.key, path if rows else None, rows))
    if refused:
        raise Failure("refusing to publish: " + "; ".join(refused), metadata={"refused": "\n".join(refused)})
    return shards


def card_builder(layout: ProjectHome):
    def build(present: list[str]) -> str:
        rows, model, dim, release = {}, {}, 768, "unknown"
        for path in sorted(layout.embeddings_dir.glob("embeddings-*.parquet")):
            key = path.stem.removeprefix("embeddings-")
            meta = pq.read_metadata(path)
            if meta.num_rows:
                rows[shard_path(key)] = meta.num_rows
                model = file_metadata(path).get("model", model)
                dim = pq.read_schema(path).field("embedding").type.list_size
        manifest = layout.root / "source_manifest.json"
        if manifest.exists():
            release = json.loads(manifest.read_text(encoding="utf-8")).get("version", release)
        return dataset_card(present, rows, model, release, dim)

    return build


@asset(
    partitions_def=corpusid_ranges,
    deps=["paper_embeddings"],
    group_name="publishing",
    backfill_policy=BackfillPolicy.single_run(),
    check_specs=[AssetCheckSpec(
        "published_matches_local", asset="hub_shards",
        description="every published shard has the local file's sha256; removed ranges are gone")],
    description="One Parquet shard per range in a Hub dataset repo, many ranges per commit, with a dataset card.",
)
def hub_shards(context: AssetExecutionContext, publisher: ShardPublisherResource,
               home: ProjectHomeResource) -> MaterializeResult:
    layout = home.layout()
    keys = list(context.partition_keys)
    shards = collect_shards(layout, keys)
    target = publisher.target()
    report = publish_shards(target, shards, card_builder(layout), message=f"paper_assets: publish {len(keys)} "
                            f"range(s) {keys[0]}..{keys[-1]}")
    mismatched = []
    for shard in shards:
        remote = report.remote.get(shard.path_in_repo)
        if shard.local is None:
            if remote is not None:
                mismatched.append(f"{shard.path_in_repo} still present remotely")
        elif remote is None or remote.sha256 != sha256_file(shard.local):
            mismatched.append(f"{shard.path_in_repo} differs remotely")
    return MaterializeResult(
        metadata={
            "target": target.description,
            "commit_sha": report.commit_sha or "none (nothing changed)",
            "commit_url": MetadataValue.url(report.commit_url) if report.commit_url else "none",
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
            description="every published shard has the local file's sha256 (and removed ranges are gone)",
            metadata={"checked": len(shards), "mismatched": "\n".join(mismatched) or "none"},
        )],
    )
