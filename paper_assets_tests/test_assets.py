import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, instance_for_test, materialize

from paper_assets.definitions import build_definitions
from paper_assets.defs import embeddings, shards, source
from paper_assets.defs.partitions import CORPUSID_RANGES
from paper_assets.engine.home import ProjectHome
from paper_assets.engine.partition_gate import canary_vectors
from paper_assets.engine.ranges import parse_range
from paper_assets.engine.schemas import vectors_of
from paper_assets.settings import Settings

from .conftest import REPO, make_source

QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


@pytest.fixture()
def project(tmp_path, home, tiny_model, generated_papers):
    base, adapter = tiny_model
    src = make_source(tmp_path / "source.duckdb", generated_papers[:300], "VARCHAR")
    settings = Settings(home=str(home), source=str(src), base_model=base, adapter=adapter, chunk_rows=64)
    return settings, build_definitions(settings)


def run(assets, defs, instance, **kwargs):
    result = materialize(assets, resources=defs.resources, instance=instance, run_config=QUIET, **kwargs)
    assert result.success
    return result


def test_definitions_validate_from_the_workspace(tmp_path):
    env = dict(os.environ, PAPER_ASSETS_HOME=str(tmp_path / "home"), DAGSTER_HOME=str(tmp_path))
    dagster = str(Path(sys.executable).parent / "dagster")
    out = subprocess.run([dagster, "definitions", "validate", "-w", "workspace.yaml"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_the_code_location_loads_without_the_model_libraries(tmp_path):
    """The code server, the daemon, run coordinators and the steps that do not embed load the definitions: they
    import neither torch nor transformers (the embedding step imports them when it loads the model)."""
    env = dict(os.environ, PAPER_ASSETS_HOME=str(tmp_path / "home"), DAGSTER_HOME=str(tmp_path))
    code = ("import sys\nfrom paper_assets.definitions import defs\n"
            "assert len(defs.resolve_asset_graph().get_all_asset_keys()) == 7\n"
            "print(sorted(m for m in ('torch', 'transformers', 'adapters') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-3000:]


def test_asset_graph_lineage(project):
    _, defs = project
    graph = defs.resolve_asset_graph()
    parents = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys}
               for k in graph.get_all_asset_keys()}
    assert parents == {"s2_source": set(), "papers": {"s2_source"}, "paper_embeddings": {"papers"},
                       "hub_shards": {"paper_embeddings"}, "paper_index": {"paper_embeddings", "s2_source"},
                       "paper_novelty": {"paper_index"}, "hub_novelty": {"paper_novelty"}}
    checks = {c.name for c in graph.asset_check_keys}
    assert {"row_count", "vectors_valid", "corpusid_unique_in_range", "norms_in_band", "adapter_canary",
            "published_matches_local", "recall_at_k", "metrics_in_unit_interval", "one_row_per_paper"} <= checks


def test_one_partition_of_each_asset(project):
    settings, defs = project
    layout = ProjectHome(settings.home)
    with instance_for_test() as instance:
        run([source.s2_source], defs, instance)
        keys = sorted(instance.get_dynamic_partitions(CORPUSID_RANGES))
        assert keys and all(parse_range(k).hi - parse_range(k).lo + 1 == 1_000_000 for k in keys)
        key = keys[0]
        result = run([embeddings.papers, embeddings.paper_embeddings], defs, instance, partition_key=key)
        meta = result.asset_materializations_for_node("paper_embeddings")[0].metadata
        rows = meta["dagster/row_count"].value
        for name in ("papers_per_second", "tokens_per_second", "token_efficiency", "device", "precision",
                     "model_fingerprint", "norm_median", "norm_histogram", "path", "duckdb_view", "source_release",
                     "dagster/column_schema"):
            assert name in meta, name
        assert meta["attn_implementation"].value == "sdpa" and meta["token_budget"].value > 0
        assert isinstance(meta["compiled"].value, bool)
        checks = result.get_asset_check_evaluations()
        assert len(checks) == 5 and all(c.passed for c in checks)
        assert all(c.metadata["partition"].value == key for c in checks)  # readable check history in the UI
        histogram = meta["norm_histogram"].value
        assert histogram.splitlines()[1] == "|---:|---:|---:|:---|" and histogram.count("\n") >= 2
        table = pq.read_table(layout.embeddings_file(parse_range(key)))
        assert table.schema.field("embedding").type.list_size == 64
        assert table.num_rows == rows == pq.read_metadata(layout.papers_file(parse_range(key))).num_rows
        assert np.isfinite(vectors_of(table)).all()

        run([shards.hub_shards], defs, instance)
        published = layout.hub_folder / "data" / f"embeddings-{key}.parquet"
        assert published.read_bytes() == layout.embeddings_file(parse_range(key)).read_bytes()
        card = (layout.hub_folder / "README.md").read_text()
        assert "configs:" in card and "data/*.parquet" in card and "ODC-BY" in card

        with duckdb.connect(str(layout.warehouse), read_only=True) as conn:
            assert conn.execute("SELECT count(*) FROM embeddings").fetchone()[0] == rows
            similarity = conn.execute(
                "SELECT array_cosine_similarity(a.embedding, b.embedding) FROM embeddings a, embeddings b "
                "WHERE a.corpusid = b.corpusid LIMIT 1").fetchone()[0]
            assert similarity == pytest.approx(1.0, abs=1e-5)
            assert conn.execute("SELECT count(*) FROM papers").fetchone()[0] == rows


def test_failing_blocking_check_stops_hub_shards(project):
    settings, defs = project
    with instance_for_test() as instance:
        run([source.s2_source], defs, instance)
        key = sorted(instance.get_dynamic_partitions(CORPUSID_RANGES))[0]
        run([embeddings.papers], defs, instance, partition_key=key)
        # Switch the adapter off in this process's loaded model: the canary must notice.
        encoder = defs.resources["specter2"].get_encoder()
        canary_vectors(encoder, ProjectHome(settings.home))  # reference recorded while active
        encoder.loaded.model.set_active_adapters(None)
        try:
            result = materialize([embeddings.paper_embeddings], resources=defs.resources,
                                 instance=instance, partition_key=key, run_config=QUIET, raise_on_error=False)
        finally:
            encoder.loaded.model.set_active_adapters("proximity")
        canary = [c for c in result.get_asset_check_evaluations() if c.check_name == "adapter_canary"][0]
        assert not canary.passed
        gate = json.loads(ProjectHome(settings.home).gate_file(parse_range(key)).read_text())
        assert gate["failed"] == ["adapter_canary"]
        # Deterministic: the instance's run retries must not relaunch it.
        assert instance.get_run_by_id(result.run_id).tags["dagster/retry_on_asset_or_op_failure"] == "false"
        # The publishing run refuses the range whose blocking check failed.
        later = materialize([shards.hub_shards], resources=defs.resources, instance=instance,
                            run_config=QUIET, raise_on_error=False)
        assert not later.success
        error = later.get_step_failure_events()[0].step_failure_data.error
        assert "adapter_canary" in error.cause.message
        assert not (ProjectHome(settings.home).hub_folder / "data").exists()


def test_demo_end_to_end_in_a_temporary_home(tmp_path):
    env = dict(os.environ, PAPER_ASSETS_HOME=str(tmp_path / "demo-home"))
    env.pop("DAGSTER_HOME", None)
    out = subprocess.run([sys.executable, "-m", "paper_assets.cli", "demo", "--papers", "400"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "done:" in out.stdout and "400 papers embedded" in out.stdout
    assert "none are activated" not in out.stdout + out.stderr
    assert out.stdout.count("adapter proximity active") == 1
    assert "Warning" not in out.stderr, out.stderr[-2000:]
    assert "\n\n" not in out.stdout
    layout = ProjectHome(tmp_path / "demo-home")
    embedded = sum(pq.read_metadata(p).num_rows for p in layout.embeddings_dir.glob("embeddings-*.parquet"))
    eligible = sum(pq.read_metadata(p).num_rows for p in layout.papers_dir.glob("papers-*.parquet"))
    assert embedded == eligible > 350
    published = list((layout.hub_folder / "data").glob("*.parquet"))
    assert len(published) == len(list(layout.embeddings_dir.glob("*.parquet")))
    commits = [json.loads(line) for line in (layout.hub_folder / ".commits.jsonl").read_text().splitlines()]
    # Every embeddings partition in one commit, every novelty month in another.
    shard_commits = [c for c in commits if any(p.startswith("data/") for p in c["added"])]
    assert len(shard_commits) == 1 and len([p for p in shard_commits[0]["added"] if p.startswith("data/")]) == \
        len(published)
    novelty_files = list((layout.hub_folder / "novelty").glob("novelty-*.parquet"))
    assert len(commits) == 2 and len(novelty_files) == 24
    assert "paper_index" in out.stdout and "novelty of 24 month(s)" in out.stdout
    instance = DagsterInstance.from_config(str(layout.dagster_home))
    try:
        keys = instance.get_dynamic_partitions(CORPUSID_RANGES)
        from dagster import AssetKey

        for asset in ("papers", "paper_embeddings"):
            materialized = instance.get_materialized_partitions(AssetKey(asset))
            assert set(keys) == set(materialized), asset
        assert len(instance.get_materialized_partitions(AssetKey("paper_novelty"))) == 24
    finally:
        instance.dispose()
