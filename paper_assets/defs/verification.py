"""matches_s2_specter2: a partition's vectors against the SPECTER2 vectors S2 serves (non-blocking).

Defined only where the code location starts with ``S2_API_KEY`` set (``definitions.py``): it asks S2's Graph API,
one batch request per 500 papers, at the key's rate. The check is partitioned like ``paper_embeddings``. A run of
one partition runs it after the partition's step. A run over a range of partitions skips it: the ranged
``paper_embeddings`` step records each partition's materialisation as an event and yields no output, and Dagster
skips the steps after an output that was not yielded. ``update`` therefore checks each ranged run's partitions in a
check-only run over the same range, where the check records one evaluation per partition (as ``paper_embeddings``
does for its own checks) and resolves the run's planned check with one result that passes where every partition
passed. ``s2_check_sensor`` does the same after every other successful ranged run of ``paper_embeddings`` (a UI
backfill's, the release sensor's).
"""

import datetime
import warnings

from dagster import (
    AssetCheckEvaluation,
    AssetCheckExecutionContext,
    AssetCheckKey,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetKey,
    AssetSelection,
    ConfigurableResource,
    DagsterEventType,
    DagsterRunStatus,
    DefaultSensorStatus,
    PreviewWarning,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    asset_check,
    sensor,
)
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from pydantic import Field

from ..engine.s2_api import S2Client
from ..engine.s2_verify import verify_home
from ..settings import from_setting
from .partitions import corpusid_ranges
from .ranged import range_tags, run_check_result
from .resources import ProjectHomeResource

CHECK_NAME = "matches_s2_specter2"
CHECK_KEY = AssetCheckKey(AssetKey("paper_embeddings"), CHECK_NAME)
# On a ranged run whose launcher runs the check itself afterwards (`update`): the sensor leaves that run alone.
CHECKED_BY_LAUNCHER_TAG = "paper_assets/s2_check_by_launcher"
# dagster 1.13 marks partitioned asset checks "preview" and warns at import; the behaviour relied on is tested.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=PreviewWarning)


class S2GraphResource(ConfigurableResource):
    """S2's Graph API with a key (``EnvVar("S2_API_KEY")``)."""

    api: str = from_setting("s2_api")
    api_key: str = Field(description="S2 API key: EnvVar('S2_API_KEY'), never a literal")
    min_interval: float = from_setting("s2_min_interval")
    sample: int = Field(default=100, description="papers of each partition compared per run")

    def client(self) -> S2Client:
        return S2Client(self.api, self.api_key, min_interval=self.min_interval)


def _evaluation(home: ProjectHomeResource, client: S2Client, sample: int, partition: str | None) -> dict:
    report = verify_home(home.layout(), client, sample, partition)
    metadata = {k: v for k, v in report.to_dict().items() if v is not None}
    return {"check_name": CHECK_NAME, "passed": report.passed, "severity": AssetCheckSeverity.WARN,
            "metadata": {**metadata, "partition": partition or "all", "summary": report.summary()}}


@asset_check(asset="paper_embeddings", name=CHECK_NAME, blocking=False, partitions_def=corpusid_ranges,
             description="A sample of each partition's vectors against S2's own SPECTER2 vectors: passes when "
             ">= 95% of the compared papers reach cosine 0.99.")
def matches_s2_specter2(context: AssetCheckExecutionContext, home: ProjectHomeResource,
                        s2_graph: S2GraphResource) -> AssetCheckResult:
    run = context.op_execution_context
    client = s2_graph.client()
    if run.has_partition_key or not run.has_partition_key_range:
        partition = run.partition_key if run.has_partition_key else None
        return AssetCheckResult(**_evaluation(home, client, s2_graph.sample, partition))
    keys = list(run.partition_keys)
    failed = []
    for key in keys:
        evaluation = _evaluation(home, client, s2_graph.sample, key)
        run.log_event(AssetCheckEvaluation(asset_key=AssetKey("paper_embeddings"), partition=key, **evaluation))
        if not evaluation["passed"]:
            failed.append(key)
    return run_check_result(CHECK_NAME, keys, failed, AssetCheckSeverity.WARN)


@sensor(
    name="s2_check_sensor",
    description="After a successful run that materialised paper_embeddings over a range of partitions (a UI or "
    "sensor backfill run), requests matches_s2_specter2 for the same range in a check-only run.",
    asset_selection=AssetSelection.checks(CHECK_KEY),
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.RUNNING,
)
def s2_check_sensor(context: SensorEvaluationContext) -> SensorResult:
    after = datetime.datetime.fromtimestamp(float(context.cursor or 0), tz=datetime.UTC)
    records = context.instance.get_run_records(
        RunsFilter(statuses=[DagsterRunStatus.SUCCESS], updated_after=after), limit=200,
        order_by="update_timestamp", ascending=True)
    requests = []
    for record in records:
        run = record.dagster_run
        first, last = run.tags.get(ASSET_PARTITION_RANGE_START_TAG), run.tags.get(ASSET_PARTITION_RANGE_END_TAG)
        if first and last and CHECKED_BY_LAUNCHER_TAG not in run.tags and any(
                event.dagster_event.asset_key == CHECK_KEY.asset_key
                for event in context.instance.all_logs(run.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION)):
            requests.append(RunRequest(run_key=f"{CHECK_NAME}:{run.run_id}", asset_selection=[],
                                       asset_check_keys=[CHECK_KEY], tags=range_tags(first, last)))
    cursor = str(records[-1].update_timestamp.timestamp()) if records else context.cursor
    return SensorResult(run_requests=requests, cursor=cursor)
