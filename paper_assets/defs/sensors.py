"""Picks up new source releases: new ranges become partitions, only ranges whose content changed are re-run."""


import json

from dagster import (
    AssetKey,
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from ..engine.ranges import IdRange
from ..engine.source import range_stats
from .partitions import CORPUSID_RANGES, corpusid_ranges
from .resources import S2SourceResource

RANGE_ASSETS = AssetSelection.assets(AssetKey("papers"), AssetKey("paper_embeddings"))


def changed_ranges(previous: dict[str, str], current: dict[str, str]) -> list[str]:
    """Ranges that are new, whose content hash changed, or that lost every row."""
    return sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))


@sensor(
    name="s2_source_release_sensor",
    description="Watches the source (file identity or Hub revision); on a new release registers new corpusid "
    "ranges and requests papers + paper_embeddings for ranges whose content changed.",
    asset_selection=AssetSelection.assets(AssetKey("s2_source")) | RANGE_ASSETS,
    minimum_interval_seconds=300,
    default_status=DefaultSensorStatus.STOPPED,
)
def s2_source_release_sensor(context: SensorEvaluationContext, source: S2SourceResource):
    cursor = json.loads(context.cursor) if context.cursor else {"version": None, "ranges": {}}
    version = source.current_version()
    if version == cursor["version"]:
        return SkipReason(f"source release {version} already seen")
    info = source.resolve()
    stats, invalid = range_stats(info, source.range_width)
    current = {IdRange(lo, lo + source.range_width - 1).key: s.content_hash for lo, s in stats.items()}
    changed = changed_ranges(cursor["ranges"], current)
    known = set(context.instance.get_dynamic_partitions(CORPUSID_RANGES))
    new_keys = sorted(set(current) - known)
    run_requests = [RunRequest(run_key=f"{version}:s2_source", asset_selection=[AssetKey("s2_source")])]
    run_requests += [
        RunRequest(run_key=f"{version}:{key}", partition_key=key,
                   asset_selection=[AssetKey("papers"), AssetKey("paper_embeddings")])
        for key in changed if key in current or key in known
    ]
    context.log.info(f"release {version}: {len(changed)} changed range(s), {len(new_keys)} new, "
                     f"{invalid} invalid id row(s)")
    return SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[corpusid_ranges.build_add_request(new_keys)] if new_keys else [],
        cursor=json.dumps({"version": version, "ranges": current}),
    )
