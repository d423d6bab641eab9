"""matches_s2_specter2: a partition's vectors against the SPECTER2 vectors S2 serves (non-blocking).

Defined only where the code location starts with ``S2_API_KEY`` set (``definitions.py``): it asks S2's Graph API,
one batch request per 500 papers, at the key's rate."""

from dagster import AssetCheckExecutionContext, AssetCheckResult, AssetCheckSeverity, ConfigurableResource, asset_check
from pydantic import Field

from ..engine.s2_api import S2Client
from ..engine.s2_verify import verify_home
from ..settings import from_setting
from .resources import ProjectHomeResource

CHECK_NAME = "matches_s2_specter2"


class S2GraphResource(ConfigurableResource):
    """S2's Graph API with a key (``EnvVar("S2_API_KEY")``)."""

    api: str = from_setting("s2_api")
    api_key: str = Field(description="S2 API key: EnvVar('S2_API_KEY'), never a literal")
    min_interval: float = from_setting("s2_min_interval")
    sample: int = Field(default=100, description="papers of the partition compared per run")

    def client(self) -> S2Client:
        return S2Client(self.api, self.api_key, min_interval=self.min_interval)


@asset_check(asset="paper_embeddings", name=CHECK_NAME, blocking=False,
             description="A sample of the partition's vectors (the whole home outside a partitioned run) against "
             "S2's own SPECTER2 vectors: passes when >= 95% of the compared papers reach cosine 0.99.")
def matches_s2_specter2(context: AssetCheckExecutionContext, home: ProjectHomeResource,
                        s2_graph: S2GraphResource) -> AssetCheckResult:
    partition = context.partition_key if context.has_partition_key else None
    report = verify_home(home.layout(), s2_graph.client(), s2_graph.sample, partition)
    metadata = {k: v for k, v in report.to_dict().items() if v is not None}
    return AssetCheckResult(passed=report.passed, severity=AssetCheckSeverity.WARN,
                            metadata={**metadata, "partition": partition or "all", "summary": report.summary()})
