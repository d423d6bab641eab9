"""Several partitions in one run: each keeps its own materialisation, metadata and check results."""

from __future__ import annotations

import pyarrow.parquet as pq
from dagster import AssetCheckKey, AssetKey, instance_for_test, materialize
from dagster._core.definitions.backfill_policy import BackfillPolicyType

from paper_assets.backfill import run_partitions
from paper_assets.definitions import build_definitions
from paper_assets.defs import embeddings, source
from paper_assets.defs.partitions import CORPUSID_RANGES
from paper_assets.defs.ranged import backfill_policy, contiguous_runs, range_tags
from paper_assets.engine.home import ProjectHome
from paper_assets.engine.ranges import parse_range
from paper_assets.settings import Settings

from .conftest import make_source

QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


def test_contiguous_runs_and_policies():
    assert contiguous_runs(list("abcdefg"), "gabdf") == [["a", "b"], ["d"], ["f", "g"]]
    assert contiguous_runs(list("abc"), []) == []
    assert backfill_policy(0).policy_type == BackfillPolicyType.SINGLE_RUN
    assert backfill_policy(4).max_partitions_per_run == 4
    assert embeddings.paper_embeddings.backfill_policy == embeddings.papers.backfill_policy


def test_a_run_of_several_ranges_records_each_range_by_itself(tmp_path, home, tiny_model, generated_papers):
    base, adapter = tiny_model
    src = make_source(tmp_path / "source.duckdb", generated_papers[:400])
    settings = Settings(home=str(home), source=str(src), base_model=base, adapter=adapter, chunk_rows=64,
                        novelty=False, range_width=200_000)
    defs = build_definitions(settings)
    layout = ProjectHome(settings.home)
    with instance_for_test() as instance:
        assert materialize([source.s2_source], resources=defs.resources, instance=instance, run_config=QUIET).success
        keys = instance.get_dynamic_partitions(CORPUSID_RANGES)
        assert len(keys) >= 3
        tags = range_tags(keys[0], keys[-1])
        result = materialize([embeddings.papers, embeddings.paper_embeddings], resources=defs.resources,
                             instance=instance, run_config=QUIET, tags=tags)
        assert result.success and run_partitions(instance, tags) == keys

        files = {k: pq.read_metadata(layout.embeddings_file(parse_range(k))).num_rows for k in keys}
        records = instance.fetch_materializations(AssetKey("paper_embeddings"), limit=100).records
        assert sorted(r.partition_key for r in records) == sorted(keys)  # one materialisation per range
        for record in records:
            meta = record.asset_materialization.metadata
            assert meta["dagster/row_count"].value == files[record.partition_key]
            assert meta["path"].value.endswith(f"embeddings-{record.partition_key}.parquet")
        assert len({r.asset_materialization.metadata["dagster/row_count"].value for r in records}) > 1
        assert set(instance.get_materialized_partitions(AssetKey("papers"))) == set(keys)
        for name in embeddings.EMBEDDING_CHECKS:
            history = instance.event_log_storage.get_asset_check_execution_history(
                AssetCheckKey(AssetKey("paper_embeddings"), name), limit=100)
            by_range = {h.evaluation.partition: h.evaluation.passed for h in history
                        if getattr(h.evaluation, "partition", None)}
            assert by_range == dict.fromkeys(keys, True), name
            summary = [h for h in history if not getattr(h.evaluation, "partition", None)]
            assert len(summary) == 1 and summary[0].evaluation.passed  # the run's own: every range passed
            assert summary[0].evaluation.metadata["partition_count"].value == len(keys)
