"""The raw cleaned source database as an asset; registers the corpusid ranges it holds as partitions."""


import json

import pyarrow.parquet as pq
from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, asset

from ..engine.ranges import IdRange
from ..engine.source import invalid_id_rows, range_stats
from ..engine.storage import atomic_path
from .partitions import CORPUSID_RANGES
from .resources import ProjectHomeResource, S2SourceResource


@asset(group_name="s2", description="The cleaned Semantic Scholar DuckDB (papers_with_abstracts), opened read-only.")
def s2_source(context: AssetExecutionContext, source: S2SourceResource, home: ProjectHomeResource) -> MaterializeResult:
    info = source.resolve()
    layout = home.layout()
    stats, invalid = range_stats(info, source.range_width)
    keys = {IdRange(lo, lo + source.range_width - 1).key: s for lo, s in stats.items()}
    known = set(context.instance.get_dynamic_partitions(CORPUSID_RANGES))
    new_keys = sorted(set(keys) - known)
    if new_keys:
        context.instance.add_dynamic_partitions(CORPUSID_RANGES, new_keys)
    quarantine = layout.quarantine_dir / "invalid_corpusid.parquet"
    if invalid:
        with atomic_path(quarantine) as tmp:
            pq.write_table(invalid_id_rows(info), tmp)
        context.log.warning(f"{invalid} row(s) have no valid corpusid; they are in {quarantine}")
    manifest = {"version": info.version, "path": info.path, "table": info.table, "range_width": source.range_width,
                "ranges": {k: {"rows": s.rows, "content_hash": s.content_hash} for k, s in keys.items()}}
    with atomic_path(layout.root / "source_manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    rows = sum(s.rows for s in stats.values())
    return MaterializeResult(
        metadata={
            "dagster/row_count": rows,
            "source_path": MetadataValue.path(info.path),
            "source_release": info.version,
            "corpusid_type": info.id_type,
            "size_bytes": info.size_bytes,
            "ranges": len(keys),
            "new_ranges": len(new_keys),
            "duplicate_corpusid_rows": sum(s.rows - s.distinct_ids for s in stats.values()),
            "invalid_corpusid_rows": invalid,
            "quarantine": MetadataValue.path(str(quarantine)) if invalid else "none",
        },
        data_version=DataVersion(info.version),
    )
