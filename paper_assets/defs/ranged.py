"""Many partitions in one run: one materialisation, its metadata and its check results per partition.

A run over a partition range (Dagster's ``BackfillPolicy.single_run()``, or the range tags on a run request) costs
one run launch, one step start and one resource set-up for all of its partitions, where a run per partition pays
each of them every time (seconds per run: BENCHMARKS.md). Dagster 1.13 records one materialisation per partition
of a ranged step, but all with the same metadata, and an ``AssetCheckResult`` has no partition: so a ranged step
logs an ``AssetMaterialization`` and ``AssetCheckEvaluation`` events of its own for each partition (the asset has
``output_required=False``, so Dagster adds none), then yields one ``AssetCheckResult`` per declared check for the
run as a whole (it resolves the run's planned check; it passes only where every partition passed). A run of one
partition returns its ``MaterializeResult`` as before.
"""

import warnings
from collections.abc import Iterable, Iterator, Mapping

from dagster import (
    AssetCheckEvaluation,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetMaterialization,
    BackfillPolicy,
    BetaWarning,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    RunRequest,
)
from dagster._core.definitions.data_version import DATA_VERSION_TAG
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from ..engine.quality import Outcome

# dagster 1.13 marks the `backfill_policy` parameter of `@asset` beta and warns once per asset at import, in every
# process that loads the definitions (the CLI included); the behaviour relied on here is tested.
warnings.filterwarnings("ignore", message="Parameter `backfill_policy` of function `asset`", category=BetaWarning)
ONE_RUN_PER_BACKFILL = BackfillPolicy.single_run()


def backfill_policy(partitions_per_run: int) -> BackfillPolicy:
    """``partitions_per_run`` partitions per backfill run; 0: the whole backfill in one run."""
    if partitions_per_run < 0:
        raise ValueError("partitions per run must be 0 (all in one run) or more")
    return BackfillPolicy.multi_run(partitions_per_run) if partitions_per_run else ONE_RUN_PER_BACKFILL


def run_partition_keys(context: AssetExecutionContext) -> list[str]:
    """The partitions this step materialises: its one partition, or every partition of its range."""
    return [context.partition_key] if context.has_partition_key else list(context.partition_keys)


def range_tags(first: str, last: str) -> dict[str, str]:
    return {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last}


def span(keys: list[str]) -> str:
    """Neighbouring partitions named in a run key: ``key`` or ``first..last``."""
    return keys[0] if len(keys) == 1 else f"{keys[0]}..{keys[-1]}"


def run_target(keys: list[str], tags: Mapping[str, str]) -> dict:
    """What a run over neighbouring partitions is given (a ``RunRequest`` or ``materialize``): one partition key,
    or the range's tags."""
    if len(keys) == 1:
        return {"partition_key": keys[0], "tags": dict(tags)}
    return {"tags": {**tags, **range_tags(keys[0], keys[-1])}}


def contiguous_runs(ordered: list[str], wanted: Iterable[str]) -> list[list[str]]:
    """``wanted`` keys grouped into runs of neighbours in ``ordered`` (a partition range must be contiguous)."""
    wanted = set(wanted)
    runs: list[list[str]] = []
    previous_wanted = False
    for key in ordered:
        if key in wanted:
            if not previous_wanted:
                runs.append([])
            runs[-1].append(key)
        previous_wanted = key in wanted
    return runs


def range_runs(ordered: list[str], wanted: Iterable[str], per_run: int = 0) -> list[list[str]]:
    """``wanted`` keys as runs: contiguous ranges of ``ordered``, cut into runs of at most ``per_run`` partitions
    (0: no limit)."""
    runs = []
    for group in contiguous_runs(ordered, wanted):
        size = per_run or len(group)
        runs += [group[start:start + size] for start in range(0, len(group), size)]
    return runs


def range_run_requests(ordered: list[str], wanted: Iterable[str], asset_selection: list, run_key_of,
                       tags_of=lambda keys: {}, per_run: int = 0) -> list[RunRequest]:
    """A run request per run of :func:`range_runs`; a single partition as a plain partition request."""
    return [RunRequest(run_key=run_key_of(keys), asset_selection=list(asset_selection),
                       **run_target(keys, tags_of(keys))) for keys in range_runs(ordered, wanted, per_run)]


def _check_result(outcome: Outcome, partition: str) -> dict:
    return {"check_name": outcome.name, "passed": outcome.passed, "severity": AssetCheckSeverity.ERROR,
            "description": outcome.description, "metadata": {"partition": partition, **outcome.metadata}}


def shared_result(context: AssetExecutionContext, results: Mapping[str, dict], table_columns: tuple[str, ...],
                  data_versions: Mapping[str, str]) -> MaterializeResult:
    """For an asset whose output a later step of the same run needs (Dagster skips the steps after an output that
    was not yielded): one result, which Dagster records for every partition of the run. A run of one partition
    gets its own metadata; a ranged run's metadata holds a table with each partition's figures."""
    if len(results) == 1 and context.has_partition_key:
        ((partition, metadata),) = results.items()
        return MaterializeResult(metadata=metadata, data_version=DataVersion(data_versions[partition]))
    lines = ["| partition | " + " | ".join(table_columns) + " |", "|---|" + "---:|" * len(table_columns)]
    lines += [f"| {key} | " + " | ".join(str(meta.get(c, "")) for c in table_columns) + " |"
              for key, meta in results.items()]
    total = sum(int(meta.get("dagster/row_count", 0)) for meta in results.values())
    return MaterializeResult(metadata={"partitions_in_run": len(results), "rows_in_run": total,
                                       "per_partition": MetadataValue.md("\n".join(lines))})


def partition_results(context: AssetExecutionContext, results: Mapping[str, tuple[dict, list[Outcome]]],
                      check_names: Iterable[str], data_versions: Mapping[str, str]
                      ) -> Iterator[MaterializeResult | AssetCheckResult]:
    """What a step that processed ``results`` (partition -> (metadata, check outcomes)) reports."""
    if len(results) == 1 and context.has_partition_key:
        ((partition, (metadata, outcomes)),) = results.items()
        yield MaterializeResult(metadata=metadata, data_version=DataVersion(data_versions[partition]))
        for outcome in outcomes:
            yield AssetCheckResult(**_check_result(outcome, partition))
        return
    for partition, (metadata, outcomes) in results.items():
        context.log_event(AssetMaterialization(asset_key=context.asset_key, partition=partition, metadata=metadata,
                                               tags={DATA_VERSION_TAG: data_versions[partition]}))
        for outcome in outcomes:
            context.log_event(AssetCheckEvaluation(asset_key=context.asset_key, partition=partition,
                                                   **_check_result(outcome, partition)))
    for name in check_names:
        failed = [p for p, (_, outcomes) in results.items() if any(o.name == name and not o.passed for o in outcomes)]
        yield run_check_result(name, list(results), failed, AssetCheckSeverity.ERROR)


def run_check_result(check_name: str, keys: list[str], failed: list[str],
                     severity: AssetCheckSeverity) -> AssetCheckResult:
    """The one result that resolves a ranged run's planned check: passed where no partition failed."""
    return AssetCheckResult(check_name=check_name, passed=not failed, severity=severity,
                            description="every partition of the run; each partition's own result is recorded with it",
                            metadata={"partitions": f"{keys[0]} .. {keys[-1]}" if keys else "none",
                                      "partition_count": len(keys), "failed_partitions": ", ".join(failed) or "none"})
