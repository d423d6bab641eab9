"""Applying the current source release in this process, through the same definitions and planner as the sensors:
s2_source (when the release is new), then papers + paper_embeddings for the planned ranges, then hub_shards.
Used by `paper-assets update` (cron users without the daemon) and `paper-assets demo`."""

import socket
from collections.abc import Callable

from dagster import AssetSelection, DagsterInstance, DagsterRunStatus, Definitions, RunsFilter, materialize

from ..engine.errors import UserError
from ..engine.novelty import plan_novelty
from ..engine.planner import plan_release
from ..engine.snapshot import current_snapshot
from . import embeddings, novelty, shards, source, verification
from .partitions import CORPUSID_RANGES, PUBLICATION_MONTHS
from .ranged import contiguous_runs, range_runs, run_target
from .run_worker import HOST_TAG, PID_TAG, run_worker_alive, this_process_tags

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def recover_abandoned_runs(instance: DagsterInstance, log: Callable[[str], None]) -> int:
    """In-process runs of an update that was killed (kill -9, OOM) stay STARTED for ever and keep their slot in the
    'gpu' pool, so the next update would wait for it without end: mark the runs of dead processes on this host
    failed and free their slots."""
    runs = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED, DagsterRunStatus.STARTING],
                                        tags={HOST_TAG: socket.gethostname()}))
    recovered = 0
    for run in runs:
        pid = int(run.tags.get(PID_TAG, "0") or 0)
        if pid and run_worker_alive(run.tags) is False:
            instance.report_run_failed(run, f"the process that ran it (pid {pid}) is gone")
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            log(f"  run {run.run_id} of a killed update (pid {pid}) marked failed; its pool slot freed")
            recovered += 1
    return recovered


def apply_release(defs: Definitions, instance: DagsterInstance, publish: bool,
                  log: Callable[[str], None] = lambda _: None) -> dict:
    resources = defs.resources
    summary, plan_ranges = embed_release(defs, instance, log)
    tags = this_process_tags()
    summary["novelty_months"] = refresh_novelty(resources, instance, tags, publish, log)
    if publish:
        publish_shards(resources, instance, tags, log, changed=bool(plan_ranges))
    return summary


def embed_release(defs: Definitions, instance: DagsterInstance, log: Callable[[str], None] = lambda _: None,
                  on_partition: Callable[[str, dict], None] = lambda key, meta: None) -> tuple[dict, list[str]]:
    """s2_source when the release is new, then papers + paper_embeddings for the planned ranges, neighbouring
    ranges together in runs of the assets' backfill policy (``PAPER_ASSETS_PARTITIONS_PER_RUN``); the summary and
    the ranges run. ``on_partition`` gets each range's paper_embeddings metadata."""
    resources = defs.resources
    layout = resources["home"].layout()
    recover_abandoned_runs(instance, log)
    tags = this_process_tags()
    version = resources["source"].current_version()
    snapshot = current_snapshot(layout.source_dir)
    if snapshot is None or snapshot.version != version \
            or snapshot.manifest.range_width != resources["source"].range_width:
        materialize([source.s2_source], resources=resources, instance=instance, run_config=QUIET, tags=tags)
        snapshot = current_snapshot(layout.source_dir)
    known = set(instance.get_dynamic_partitions(CORPUSID_RANGES))
    plan = plan_release(layout, snapshot, known, resources["publisher"].description())
    if plan.new_ranges:
        instance.add_dynamic_partitions(CORPUSID_RANGES, plan.new_ranges)
    summary = {"release": plan.release, "ranges_changed": len(plan.ranges), "rows_embedded": 0, "rows_reused": 0,
               "rows_deleted": 0}
    model: dict = {}
    checks = [c for c in defs.asset_checks or [] if c is verification.matches_s2_specter2]
    per_run = embeddings.RANGES_PER_RUN.max_partitions_per_run or 0
    for keys in range_runs(instance.get_dynamic_partitions(CORPUSID_RANGES), plan.ranges, per_run):
        reasons = ", ".join(sorted({plan.reasons[key] for key in keys}))
        steps, run_tags = [embeddings.papers, embeddings.paper_embeddings], {**tags, "paper_assets/reason": reasons}
        if len(keys) == 1 or not checks:
            result = materialize([*steps, *checks], resources=resources, instance=instance, run_config=QUIET,
                                 **run_target(keys, run_tags))
        else:  # a ranged paper_embeddings step yields no output: the check runs alone after it, as the sensor does
            result = materialize(steps, resources=resources, instance=instance, run_config=QUIET,
                                 **run_target(keys, {**run_tags, verification.CHECKED_BY_LAUNCHER_TAG: "update"}))
            materialize([*steps, *checks], selection=AssetSelection.checks(*checks), resources=resources,
                        instance=instance, run_config=QUIET, **run_target(keys, run_tags))
        for materialization in result.asset_materializations_for_node("paper_embeddings"):
            key = materialization.partition
            meta = {k: v.value for k, v in materialization.metadata.items()}
            on_partition(key, meta)
            for name in ("rows_embedded", "rows_reused", "rows_deleted"):
                summary[name] += int(meta[name])
            if not model:
                model = {k: meta[k] for k in ("adapter", "model_fingerprint", "precision", "device", "dimension")}
                log(f"  adapter {model['adapter']} (fingerprint {model['model_fingerprint']}, {model['precision']} "
                    f"on {model['device']}, {model['dimension']}-d vectors)")
            log(f"  {key}: {meta['dagster/row_count']:,} papers ({meta['rows_embedded']:,} embedded, "
                f"{meta['rows_reused']:,} reused, {meta['rows_deleted']:,} deleted; {plan.reasons[key]})")
    return {**summary, "model": model}, plan.ranges


def publish_shards(resources: dict, instance: DagsterInstance, tags: dict, log: Callable[[str], None],
                   changed: bool = True) -> None:
    """hub_shards, where ranges changed or the planner finds the Hub behind the home."""
    layout = resources["home"].layout()
    snapshot = current_snapshot(layout.source_dir)
    if not changed and not plan_release(layout, snapshot, None, resources["publisher"].description()).publish:
        return
    result = materialize([shards.hub_shards], resources=resources, instance=instance, run_config=QUIET, tags=tags)
    meta = result.asset_materializations_for_node("hub_shards")[0].metadata
    log(f"  published to {meta['target'].value}: {meta['files_uploaded'].value} uploaded, "
        f"{meta['files_deleted'].value} deleted, {meta['files_skipped_unchanged'].value} unchanged")


def refresh_novelty(resources: dict, instance: DagsterInstance, tags: dict, publish: bool,
                    log: Callable[[str], None],
                    on_month: Callable[[str, dict], None] = lambda month, meta: None) -> int:
    """paper_index when the checked embeddings changed, then paper_novelty for the stale months only (what
    ``novelty_sensor`` requests), then hub_novelty; returns the months computed. ``on_month`` gets each month's
    paper_novelty metadata."""
    layout, params = resources["home"].layout(), resources["novelty_config"].params()
    if not resources["novelty_config"].enabled:
        return 0
    try:
        plan = plan_novelty(layout, params)
    except UserError as err:
        log(f"  novelty skipped: {err}")
        return 0
    if plan.manifest is None:
        materialize([novelty.paper_index], resources=resources, instance=instance, run_config=QUIET, tags=tags)
        plan = plan_novelty(layout, params)
        if plan.manifest is None:
            log("  the embeddings changed while paper_index was built: the next update rebuilds it")
            return 0
    manifest, months, stale = plan.manifest, plan.months, plan.stale
    for keys in contiguous_runs(instance.get_dynamic_partitions(PUBLICATION_MONTHS), stale):
        result = materialize([novelty.paper_novelty], resources=resources, instance=instance, run_config=QUIET,
                             **run_target(keys, tags))
        for materialization in result.asset_materializations_for_node("paper_novelty"):
            on_month(materialization.partition, {k: v.value for k, v in materialization.metadata.items()})
    if stale:
        log(f"  paper_index {manifest.build}: {manifest.papers:,} papers; novelty of {len(stale)} month(s) "
            f"computed ({stale[0]} .. {stale[-1]}), {len(months) - len(stale)} already current")
        if publish:
            materialize([novelty.hub_novelty], resources=resources, instance=instance, run_config=QUIET, tags=tags)
    return len(stale)
