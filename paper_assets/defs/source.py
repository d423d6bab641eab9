"""s2_source: the release's cleaned DuckDB file(s) snapshotted into the home; registers the ranges it holds."""

from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, asset

from ..engine.snapshot import build_snapshot, current_snapshot
from .partitions import CORPUSID_RANGES
from .resources import ProjectHomeResource, S2SourceResource


def _ranges_table(ranges: dict[str, dict], limit: int = 400) -> str:
    lines = ["| range | rows | content hash |", "|---|---:|---|"]
    lines += [f"| {key} | {info['rows']:,} | `{info['content_hash']}` |"
              for key, info in sorted(ranges.items())[:limit]]
    if len(ranges) > limit:
        lines.append(f"| … {len(ranges) - limit} more in manifest.json | | |")
    return "\n".join(lines)


def _inputs_table(inputs) -> str:
    lines = ["| input file | rows | invalid corpusid (quarantined) | duplicates dropped | kept |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| `{i.path}` | {i.rows:,} | {i.invalid_corpusid:,} | {i.duplicates_dropped:,} | {i.kept:,} |"
              for i in inputs]
    return "\n".join(lines)


def _s2_metadata(record: dict) -> dict:
    """An S2 Datasets API release: how the home got it (a full download, or S2's diffs) and what it holds."""
    if not record:
        return {}
    return {"s2_built_from": record["built_from"], "s2_diff_steps": ", ".join(record["diff_steps"]) or "none",
            "s2_papers": record["papers"], "s2_abstracts": record["abstracts"],
            "s2_papers_with_abstracts": record["papers_with_abstracts"],
            "s2_updated": MetadataValue.json(record["updated"]), "s2_deleted": MetadataValue.json(record["deleted"]),
            "s2_filter": record["filter"] or "none"}


@asset(
    group_name="s2",
    code_version="2",  # 2: snapshot per release (int64 ids, duplicates resolved, several input files)
    description="The cleaned Semantic Scholar DuckDB file(s) of one release (papers_with_abstracts), snapshotted "
    "into the home: int64 ids, invalid ids quarantined, duplicates resolved, id-sorted Parquet with per-range row "
    "counts and content hashes.",
)
def s2_source(context: AssetExecutionContext, source: S2SourceResource, home: ProjectHomeResource) -> MaterializeResult:
    layout = home.layout()
    version = source.current_version()
    snapshot = current_snapshot(layout.source_dir)
    if snapshot is not None and snapshot.version == version and snapshot.manifest.range_width == source.range_width:
        context.log.info(f"release {version} is already the current snapshot; nothing to rebuild")
        manifest = snapshot.manifest
    else:
        manifest = build_snapshot(source.resolve(context.log.info), layout.source_dir, version, source.range_width)
        snapshot = current_snapshot(layout.source_dir)
    known = set(context.instance.get_dynamic_partitions(CORPUSID_RANGES))
    new_keys = sorted(set(manifest.ranges) - known)
    if new_keys:
        context.instance.add_dynamic_partitions(CORPUSID_RANGES, new_keys)
    if manifest.invalid_corpusid:
        context.log.warning(f"{manifest.invalid_corpusid} row(s) have no valid corpusid; they are in "
                            f"{snapshot.quarantine_file}")
    return MaterializeResult(
        metadata={
            "dagster/row_count": manifest.rows,
            "source_release": manifest.release,
            "inputs": MetadataValue.md(_inputs_table(manifest.inputs)),
            "snapshot": MetadataValue.path(str(snapshot.papers_file)),
            "ranges": len(manifest.ranges),
            "new_ranges": len(new_keys),
            "range_rows_and_hashes": MetadataValue.md(_ranges_table(manifest.ranges)),
            "duplicate_corpusid_rows": manifest.duplicates_dropped,
            "invalid_corpusid_rows": manifest.invalid_corpusid,
            "quarantine": MetadataValue.path(str(snapshot.quarantine_file)) if manifest.invalid_corpusid else "none",
            **_s2_metadata(source.s2_release_record(manifest.release)),
        },
        data_version=DataVersion(manifest.release),
    )
