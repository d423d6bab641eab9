"""`paper-assets backfill`: what the UI's backfill button does, from a shell. It asks the running webserver
(`paper-assets ui`, or any Dagster webserver serving this code location) to launch a partition backfill through its
GraphQL API, so the daemon, run queue, executor and workers are exactly the UI's; with ``--wait`` it follows the
backfill and reports each partition from the instance (run status, and the worker, device and rows that
``paper_embeddings`` recorded, or for a failed run the error that ended it)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from .engine.errors import UserError

DEFAULT_ASSETS = ("papers", "paper_embeddings")
FINISHED = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}
SUCCEEDED = {"COMPLETED", "COMPLETED_SUCCESS"}

_LAUNCH = """mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on Error { message } } }"""
_STATUS = """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
  __typename ... on PartitionBackfill { status } ... on Error { message } } }"""


class BackfillError(UserError, RuntimeError):
    pass


class WebserverUnavailable(BackfillError):
    """The webserver did not answer (nothing listening, connection dropped) or answered with a server error (5xx),
    as it does while it or its database restarts: worth asking again."""


def webserver_up(url: str) -> bool:
    """Whether the Dagster webserver at ``url`` answers."""
    try:
        with urllib.request.urlopen(f"{url}/server_info", timeout=5):
            return True
    except OSError:
        return False


def graphql(url: str, query: str, variables: dict) -> dict:
    request = urllib.request.Request(f"{url.rstrip('/')}/graphql", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"query": query, "variables": variables}).encode())
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = json.loads(response.read())
    except urllib.error.HTTPError as err:
        if err.code >= 500:
            raise WebserverUnavailable(f"the Dagster webserver at {url} answered HTTP {err.code}") from None
        raise BackfillError(f"the Dagster webserver at {url} refused the request: HTTP {err.code}") from None
    except (urllib.error.URLError, OSError) as err:
        raise WebserverUnavailable(f"no Dagster webserver answering at {url} ({getattr(err, 'reason', err)}); "
                                   "start one with `paper-assets ui` or pass --url") from None
    if payload.get("errors"):
        raise BackfillError(f"the webserver refused the request: {payload['errors'][0].get('message')}")
    return payload["data"]


def launch(url: str, partition_keys: list[str] | None, assets: list[str]) -> str:
    """Launch a backfill of ``assets`` over ``partition_keys`` (``None``: every partition); its id."""
    params: dict = {"assetSelection": [{"path": [asset]} for asset in assets], "fromFailure": False}
    if partition_keys is None:
        params["allPartitions"] = True
    else:
        params["partitionNames"] = partition_keys
    result = graphql(url, _LAUNCH, {"params": params})["launchPartitionBackfill"]
    if result["__typename"] != "LaunchBackfillSuccess":
        raise BackfillError(f"backfill not launched ({result['__typename']}): {result.get('message', '')}")
    return result["backfillId"]


def wait(url: str, backfill_id: str, timeout: float, poll: float = 3.0,
         on_status: Callable[[str], None] | None = None, retry_for: float = 600.0) -> str:
    """The backfill's final status (raises after ``timeout`` seconds without one). A webserver that does not answer,
    or answers with a server error, is asked again with a growing pause until it has failed for ``retry_for``
    seconds in a row: a head that restarts, or a database that fails over, does not end the wait."""
    deadline, last = time.time() + timeout, None
    failing_since, pause = None, poll
    while True:
        try:
            result = graphql(url, _STATUS, {"id": backfill_id})["partitionBackfillOrError"]
        except WebserverUnavailable as err:
            now = time.time()
            failing_since = failing_since or now
            if now - failing_since > retry_for or now > deadline:
                raise WebserverUnavailable(f"{err}; gave up after {now - failing_since:.0f} s of retries") from None
            if on_status:
                on_status(f"{last or 'unknown'} ({err}; asking again in {pause:.0f} s)")
            time.sleep(pause)
            pause = min(pause * 2, 30.0)
            continue
        failing_since, pause = None, poll
        if result["__typename"] != "PartitionBackfill":
            raise BackfillError(f"backfill {backfill_id}: {result.get('message', result['__typename'])}")
        status = result["status"]
        if status != last and on_status:
            on_status(status)
        last = status
        if status in FINISHED:
            return status
        if time.time() > deadline:
            raise BackfillError(f"backfill {backfill_id} still {status} after {timeout:.0f} s")
        time.sleep(poll)


def run_failure(instance, run_id: str) -> str | None:
    """Why a run failed, from its event log: the first failed step's error (step key and message), else the run's
    own failure message (a run can fail before any step starts: launch, executor or worker loss)."""
    from dagster import DagsterEventType

    for record in instance.all_logs(run_id, of_type=DagsterEventType.STEP_FAILURE):
        event = record.dagster_event
        return f"{event.step_key}: {_innermost(event.step_failure_data.error) or event.message or 'step failed'}"
    for record in instance.all_logs(run_id, of_type=DagsterEventType.RUN_FAILURE):
        event = record.dagster_event
        data = event.event_specific_data
        return _innermost(getattr(data, "error", None)) or event.message or record.message or "run failed"
    return None


def _innermost(error) -> str | None:
    """The message of the exception at the bottom of a SerializableErrorInfo chain (Dagster wraps a step's own
    exception, and an executor's error wraps the worker's)."""
    while error is not None and error.cause is not None:
        error = error.cause
    return error.message.strip() if error is not None else None


def run_partitions(instance, tags: dict) -> list[str]:
    """The corpus-id ranges a run covers: its partition, or each range of its partition range (a backfill puts
    ``PAPER_ASSETS_PARTITIONS_PER_RUN`` ranges in one run)."""
    from .defs.partitions import CORPUSID_RANGES
    from .defs.ranged import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    if ASSET_PARTITION_RANGE_START_TAG not in tags:
        return [tags.get("dagster/partition", "")]
    keys = instance.get_dynamic_partitions(CORPUSID_RANGES)
    first, last = keys.index(tags[ASSET_PARTITION_RANGE_START_TAG]), keys.index(tags[ASSET_PARTITION_RANGE_END_TAG])
    return keys[first:last + 1]


def partition_reports(instance, backfill_id: str) -> list[dict]:
    """One entry per partition the backfill ran: range, the status of its latest run (a run that failed and was
    retried counts by its retry), how many runs it took, what paper_embeddings recorded, and for a partition that
    did not succeed, the error that ended its latest run."""
    from dagster import AssetKey, AssetRecordsFilter, DagsterRunStatus, RunsFilter

    reports = []
    attempts: dict[str, list] = {}  # a partition's runs, newest first: the first try and its automatic retries
    for run in instance.get_runs(RunsFilter(tags={"dagster/backfill": backfill_id})):
        for key in run_partitions(instance, run.tags):
            attempts.setdefault(key, []).append(run)
    for key in sorted(attempts):
        run = attempts[key][0]
        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey("paper_embeddings"), asset_partitions=[key]), limit=20).records
        meta = next(({k: v.value for k, v in r.asset_materialization.metadata.items()} for r in records
                     if r.run_id == run.run_id), {})
        # In a run of several ranges, a range that was embedded and passed its checks succeeded, whatever ended
        # the run afterwards (another range's failure).
        succeeded = run.status == DagsterRunStatus.SUCCESS or meta.get("quality_gate") == "passed"
        reports.append({"range": key, "status": "SUCCESS" if succeeded else run.status.value, "run_id": run.run_id,
                        "worker": meta.get("worker"), "device": meta.get("device"),
                        "rows": meta.get("dagster/row_count"), "runs": len(attempts[key])})
        if not succeeded:
            reports[-1]["error"] = run_failure(instance, run.run_id)
    return reports
