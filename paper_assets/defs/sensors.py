"""Following source releases, in two cheap steps.

1. ``s2_source_release_sensor`` looks only at the release id (file identities, or the Hub revision's sha) and
   requests an ``s2_source`` snapshot when it differs from the home's current snapshot. Nothing is read or
   downloaded in the tick; a home that is already on the current release gets no request at all.
2. ``s2_release_ranges_sensor`` reads the current snapshot's manifest and asks the release planner
   (``engine/planner.py``, the same one `paper-assets update` uses) which ranges are new, changed or emptied: it
   requests ``papers`` + ``paper_embeddings`` for exactly those, then, once none is pending, ``hub_shards`` if the
   Hub is behind. Run keys carry the release and range hash, so a range is requested once per change.
3. ``novelty_sensor`` rebuilds ``paper_index`` when the checked embeddings changed, then requests ``paper_novelty``
   for the months whose inputs (papers of that month or earlier) changed: a month's input hash chains the content
   hashes of every month up to it, so a change in month M makes M and the later months stale, never earlier ones.
   Stale months that are neighbours go in one run (a partition range), each month with its own results.
"""

import hashlib

from dagster import (
    AssetKey,
    AssetSelection,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from ..engine import novelty
from ..engine.errors import UserError
from ..engine.planner import plan_release
from ..engine.snapshot import current_snapshot
from .embeddings import RANGES_PER_RUN
from .partitions import CORPUSID_RANGES, PUBLICATION_MONTHS, corpusid_ranges, publication_months
from .ranged import range_run_requests, span
from .resources import NoveltyResource, ProjectHomeResource, S2SourceResource, ShardPublisherResource

RANGE_ASSETS = [AssetKey("papers"), AssetKey("paper_embeddings")]


@sensor(
    name="s2_source_release_sensor",
    description="Watches the source's release id (file identity or Hub revision) and requests an s2_source "
    "snapshot of a new release; reads no data.",
    asset_selection=AssetSelection.assets(AssetKey("s2_source")),
    minimum_interval_seconds=300,
    default_status=DefaultSensorStatus.STOPPED,
)
def s2_source_release_sensor(context: SensorEvaluationContext, source: S2SourceResource,
                             home: ProjectHomeResource):
    version = source.current_version()
    snapshot = current_snapshot(home.layout().source_dir)
    if snapshot is not None and snapshot.version == version:
        return SensorResult(skip_reason=SkipReason(f"the home is on the current release {version}"), cursor=version)
    if context.cursor == version:
        return SkipReason(f"snapshot of release {version} already requested")
    request = RunRequest(run_key=f"s2_source:{version}", asset_selection=[AssetKey("s2_source")])
    return SensorResult(run_requests=[request], cursor=version)


@sensor(
    name="s2_release_ranges_sensor",
    description="After a new s2_source snapshot: requests papers + paper_embeddings for new, changed and emptied "
    "ranges only, then hub_shards once the release is embedded.",
    asset_selection=AssetSelection.assets(*RANGE_ASSETS, AssetKey("hub_shards")),
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.STOPPED,
)
def s2_release_ranges_sensor(context: SensorEvaluationContext, home: ProjectHomeResource,
                             publisher: ShardPublisherResource):
    layout = home.layout()
    snapshot = current_snapshot(layout.source_dir)
    if snapshot is None:
        return SkipReason("no s2_source snapshot yet")
    known = context.instance.get_dynamic_partitions(CORPUSID_RANGES)
    plan = plan_release(layout, snapshot, set(known), publisher.description())
    if plan.ranges:
        in_flight = context.instance.get_runs_count(RunsFilter(statuses=IN_FLIGHT, tags={RELEASE_TAG: plan.release}))
        if in_flight:  # their ranges are still in the plan until they finish: wait rather than request them twice
            return SkipReason(f"release {plan.release}: {in_flight} run(s) in flight")
        requests = _range_requests(plan, snapshot.manifest.ranges, [*known, *plan.new_ranges])
        context.log.info(f"release {plan.release}: {len(plan.ranges)} range(s) to run in {len(requests)} run(s) "
                         f"({len(plan.new_ranges)} new, {len(plan.emptied_ranges)} emptied)")
        return SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=[corpusid_ranges.build_add_request(plan.new_ranges)] if plan.new_ranges
            else [],
        )
    if plan.publish:
        return SensorResult(run_requests=[RunRequest(run_key=f"{plan.release}:hub:{plan.publish_key}",
                                                     asset_selection=[AssetKey("hub_shards")])])
    return SkipReason(f"release {plan.release} is embedded and published")


IN_FLIGHT = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
             DagsterRunStatus.STARTED]
RELEASE_TAG = "paper_assets/release"


def _range_requests(plan, hashes: dict, ordered: list[str]) -> list[RunRequest]:
    """Neighbouring ranges grouped as a backfill groups them (the assets' backfill policy); a run key names the
    release, the ranges and their content, so one content is requested once."""

    def run_key(keys: list[str]) -> str:
        content = "|".join(hashes.get(k, {}).get("content_hash", "empty") for k in keys)
        return f"{plan.release}:{span(keys)}:{hashlib.sha256(content.encode()).hexdigest()[:16]}"

    def tags(keys: list[str]) -> dict:
        return {RELEASE_TAG: plan.release, "paper_assets/reason": "; ".join(sorted({plan.reasons[k] for k in keys}))}

    return range_run_requests(ordered, plan.ranges, RANGE_ASSETS, run_key, tags,
                              RANGES_PER_RUN.max_partitions_per_run or 0)


@sensor(
    name="novelty_sensor",
    description="Rebuilds paper_index when the checked embeddings differ from what it indexed (once no range is "
    "pending), then requests paper_novelty for exactly the months whose papers, or earlier papers, changed.",
    asset_selection=AssetSelection.assets(AssetKey("paper_index"), AssetKey("paper_novelty")),
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.STOPPED,
)
def novelty_sensor(context: SensorEvaluationContext, home: ProjectHomeResource, novelty_config: NoveltyResource):
    if not novelty_config.enabled:
        return SkipReason("novelty is switched off (PAPER_ASSETS_NOVELTY=0)")
    params = novelty_config.params()
    try:
        plan = novelty.plan_novelty(home.layout(), params)
    except UserError as err:
        return SkipReason(f"paper_index cannot be built yet: {err}")
    if plan.manifest is None:
        return SensorResult(run_requests=[RunRequest(run_key=f"paper_index:{plan.inputs_key}",
                                                     asset_selection=[AssetKey("paper_index")])])
    if not plan.stale:
        return SkipReason(f"every novelty month is current with index build {plan.manifest.build}")
    known = context.instance.get_dynamic_partitions(PUBLICATION_MONTHS)
    new_months = [m for m in plan.months if m not in set(known)]

    def run_key(months: list[str]) -> str:
        return f"paper_novelty:{span(months)}:{novelty.month_input_hash(plan.manifest, months[-1], params)}"

    return SensorResult(
        run_requests=range_run_requests([*known, *new_months], plan.stale, [AssetKey("paper_novelty")], run_key),
        dynamic_partitions_requests=[publication_months.build_add_request(new_months)] if new_months else [],
    )
