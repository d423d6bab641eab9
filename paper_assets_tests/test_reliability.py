"""Fault injection: kill -9 at precise points, dirty rows, broken sources, concurrent runs, full disks, secrets."""

import dataclasses
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, instance_for_test, materialize

from paper_assets.definitions import build_definitions
from paper_assets.defs import embeddings, shards, source
from paper_assets.defs.partitions import CORPUSID_RANGES
from paper_assets.demo_kit import sample_source
from paper_assets.engine.home import ProjectHome
from paper_assets.engine.ranges import parse_range
from paper_assets.engine.snapshot import current_snapshot
from paper_assets.settings import Settings

from .conftest import HUB, REPO, make_source
from .hub_server import TOKEN

QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
KEY = "000000000-000999999"


@pytest.fixture()
def setup(tmp_path, home, tiny_model, generated_papers):
    base, adapter = tiny_model
    papers = [dict(p, corpusid=1000 + i * 7) for i, p in enumerate(generated_papers[:400])]
    papers += [dict(p, corpusid=1_000_000 + i * 11) for i, p in enumerate(generated_papers[400:520])]
    src = make_source(tmp_path / "source.duckdb", papers)
    settings = Settings(home=str(home), source=str(src), base_model=base, adapter=adapter, chunk_rows=50)
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with instance_for_test(temp_dir=str(dagster_home)) as instance:
        defs = build_definitions(settings)
        assert materialize([source.s2_source], resources=defs.resources, instance=instance, run_config=QUIET).success
    return settings, dagster_home


def child(mode, settings, dagster_home, key=KEY, extra_env=None):
    env = dict(os.environ, DAGSTER_HOME=str(dagster_home), **(extra_env or {}))
    return subprocess.run([sys.executable, "-m", "paper_assets_tests.fault_child", mode,
                           json.dumps(dataclasses.asdict(settings)), key], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def visible_parquet(folder):
    return sorted(p.name for p in folder.glob("*.parquet"))


def assert_partition_complete(settings, key=KEY):
    layout = ProjectHome(settings.home)
    rng = parse_range(key)
    papers = pq.read_table(layout.papers_file(rng))
    embedded = pq.read_table(layout.embeddings_file(rng))
    ids = embedded.column("corpusid").to_numpy()
    assert len(ids) == len(np.unique(ids)) == papers.num_rows
    assert set(ids) == set(papers.column("corpusid").to_numpy())
    return embedded


def last_metadata(dagster_home, asset="paper_embeddings", key=KEY):
    from dagster import AssetKey

    instance = DagsterInstance.from_config(str(dagster_home))
    try:
        records = instance.fetch_materializations(AssetKey(asset), limit=1).records
        event = records[0].asset_materialization if records else None
        return {k: v.value for k, v in event.metadata.items()} if event else {}
    finally:
        instance.dispose()


def test_kill_during_embedding_resumes_from_checkpoints(setup):
    settings, dagster_home = setup
    killed = child("kill-during-embedding", settings, dagster_home)
    assert killed.returncode == -9, killed.stderr[-2000:]
    layout = ProjectHome(settings.home)
    assert visible_parquet(layout.embeddings_dir) == []  # nothing half-done visible to readers
    assert len(list(layout.checkpoint_dir(parse_range(KEY)).glob("chunk-*.parquet"))) == 2
    again = child("run", settings, dagster_home)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_partition_complete(settings)
    meta = last_metadata(dagster_home)
    assert meta["resumed_rows_from_checkpoint"] == 100  # two chunks of 50 were not redone
    assert not layout.checkpoint_dir(parse_range(KEY)).exists()


def test_kill_during_parquet_write_leaves_the_previous_file(setup):
    settings, dagster_home = setup
    assert child("run", settings, dagster_home).returncode == 0
    layout = ProjectHome(settings.home)
    target = layout.embeddings_file(parse_range(KEY))
    good = target.read_bytes()
    target.touch()
    papers = layout.papers_file(parse_range(KEY))
    os.utime(papers)  # nothing changed: a rerun rewrites the same content
    killed = child("kill-during-parquet-write", settings, dagster_home)
    assert killed.returncode == -9
    assert target.read_bytes() == good  # readers still see the last complete version
    assert visible_parquet(layout.embeddings_dir) == [target.name]
    assert child("run", settings, dagster_home).returncode == 0
    assert_partition_complete(settings)
    leftovers = [p.name for p in layout.embeddings_dir.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) <= 1  # at most the killed run's temp file, never matched by readers' globs


def test_kill_during_publish_then_rerun_publishes_everything_once(setup):
    settings, dagster_home = setup
    for key in (KEY, "001000000-001999999"):
        assert child("run", settings, dagster_home, key).returncode == 0
    layout = ProjectHome(settings.home)
    killed = child("kill-during-publish", settings, dagster_home)
    assert killed.returncode == -9
    assert not (layout.hub_folder / ".commits.jsonl").exists()
    published = layout.hub_folder / "data" / f"embeddings-{KEY}.parquet"
    assert published.read_bytes() == layout.embeddings_file(parse_range(KEY)).read_bytes()
    assert child("publish", settings, dagster_home).returncode == 0
    assert len((layout.hub_folder / ".commits.jsonl").read_text().splitlines()) == 1
    # The shard that landed before the kill is not uploaded again; the one that did not, and the card, are.
    assert json.loads((layout.hub_folder / ".commits.jsonl").read_text())["added"] == [
        "README.md", "data/embeddings-001000000-001999999.parquet"]


def test_kill_during_hub_publish_leaves_no_partial_commit(setup, monkeypatch):
    settings, dagster_home = setup
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub = HUB.reset()
    assert child("run", settings, dagster_home).returncode == 0
    env = {"PUBLISH_ENDPOINT": hub.endpoint, "PUBLISH_REPO": "user/emb", "HF_TOKEN": TOKEN}
    hub.state.inject("POST", r"/commit/", 503, times=50)  # the commit never lands while we are killed
    proc = subprocess.Popen([sys.executable, "-m", "paper_assets_tests.fault_child", "publish",
                             json.dumps(dataclasses.asdict(settings)), KEY], cwd=REPO,
                            env=dict(os.environ, DAGSTER_HOME=str(dagster_home), **env))
    import time

    deadline = time.time() + 120
    while time.time() < deadline and not any("/commit/" in p for _, p in hub.state.requests):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert hub.state.commit_count("user/emb") == 1  # only the repo's initial commit: nothing partial
    hub.state.faults.clear()
    assert child("publish", settings, dagster_home, extra_env=env).returncode == 0
    assert hub.state.commit_count("user/emb") == 2
    assert f"data/embeddings-{KEY}.parquet" in hub.state.files("user/emb")


def test_disk_full_fails_cleanly_and_keeps_last_good_version(setup):
    settings, dagster_home = setup
    assert child("run", settings, dagster_home).returncode == 0
    layout = ProjectHome(settings.home)
    target = layout.embeddings_file(parse_range(KEY))
    good = target.read_bytes()
    failed = child("disk-full", settings, dagster_home)
    assert failed.returncode == 3
    assert target.read_bytes() == good
    assert not [p for p in layout.embeddings_dir.iterdir() if p.name.endswith(".tmp")]


def test_dirty_rows_each_follow_a_counted_rule(tmp_path, home, tiny_model):
    base, adapter = tiny_model
    jsonl = tmp_path / "dirty.jsonl"
    rows = [
        {"corpus_id": 1, "title": None, "abstract": None},
        {"corpus_id": 2, "title": "", "abstract": "   "},
        {"corpus_id": 3, "title": "   ", "abstract": "Only an abstract"},
        {"corpus_id": 4, "title": "Control\x00chars\x07here", "abstract": "Tab\tand\x1bescape"},
        {"corpus_id": 5, "title": "Lone \ud800 surrogate", "abstract": "fine"},
        {"corpus_id": 6, "title": "Huge", "abstract": "word " * 20_000},
        {"corpus_id": 7, "title": "Duplicate short", "abstract": None},
        {"corpus_id": 7, "title": "Duplicate kept", "abstract": "the most complete row wins"},
        {"corpus_id": "not-a-number", "title": "Bad id", "abstract": "x"},
        {"corpus_id": -3, "title": "Negative id", "abstract": "x"},
        {"corpus_id": "8", "title": "String id", "abstract": "mixed id types"},
    ]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    src = sample_source.write_source(tmp_path / "dirty.duckdb", sample_source.read_jsonl_papers(jsonl), "VARCHAR")
    settings = Settings(home=str(home), source=str(src), base_model=base, adapter=adapter)
    defs = build_definitions(settings)
    with instance_for_test() as instance:
        result = materialize([source.s2_source], resources=defs.resources, instance=instance, run_config=QUIET)
        meta = result.asset_materializations_for_node("s2_source")[0].metadata
        assert meta["invalid_corpusid_rows"].value == 2
        assert meta["duplicate_corpusid_rows"].value == 1
        quarantine = pq.read_table(current_snapshot(ProjectHome(home).source_dir).quarantine_file)
        assert sorted(quarantine.column("corpusid_raw").to_pylist()) == ["-3", "not-a-number"]
        assert set(quarantine.column("source_file").to_pylist()) == {str(src)}
        assert instance.get_dynamic_partitions(CORPUSID_RANGES) == [KEY]
        result = materialize([embeddings.papers, embeddings.paper_embeddings], partition_key=KEY,
                             resources=defs.resources, instance=instance, run_config=QUIET)
        assert result.success and all(c.passed for c in result.get_asset_check_evaluations())
        papers_meta = result.asset_materializations_for_node("papers")[0].metadata
        assert papers_meta["skipped_no_text"].value == 2
        assert papers_meta["rule_abstract_only"].value == 1
        assert papers_meta["source_rows"].value == 8
        assert papers_meta["dagster/row_count"].value == 6
    papers = {r["corpusid"]: r["text"] for r in
              pq.read_table(ProjectHome(home).papers_file(parse_range(KEY))).to_pylist()}
    assert papers[4] == "Controlcharshere [SEP] Tab andescape"  # deleted as the BERT tokenizer deletes them
    assert papers[5] == "Lone surrogate [SEP] fine" and papers[7].startswith("Duplicate kept")
    assert sorted(papers) == [3, 4, 5, 6, 7, 8]
    # 9 source rows with valid ids = 6 embedded + 2 without text + 1 duplicate (dropped by the snapshot); 2 more
    # quarantined.


def test_bad_source_fails_before_work_and_leaves_outputs(setup):
    settings, dagster_home = setup
    assert child("run", settings, dagster_home).returncode == 0
    layout = ProjectHome(settings.home)
    before = layout.papers_file(parse_range(KEY)).read_bytes()
    release = current_snapshot(layout.source_dir).version
    with open(settings.source, "r+b") as handle:
        handle.write(b"garbage!" * 512)
    defs = build_definitions(settings)
    instance = DagsterInstance.from_config(str(dagster_home))
    try:
        result = materialize([source.s2_source], resources=defs.resources, instance=instance, run_config=QUIET,
                             raise_on_error=False)
        assert not result.success
        failure = result.get_step_failure_events()[0].step_failure_data.error
        assert "not a readable DuckDB database" in failure.cause.message
        # The last good snapshot stays current: ranges still read it.
        assert current_snapshot(layout.source_dir).version == release
        again = materialize([embeddings.papers], partition_key=KEY, resources=defs.resources, instance=instance,
                            run_config=QUIET)
        assert again.success
    finally:
        instance.dispose()
    assert layout.papers_file(parse_range(KEY)).read_bytes() == before


def test_four_partition_runs_at_once(tmp_path, home, tiny_model, generated_papers):
    base, adapter = tiny_model
    papers = [dict(p, corpusid=p_i % 4 * 1_000_000 + p_i) for p_i, p in enumerate(generated_papers[:480])]
    src = make_source(tmp_path / "source.duckdb", papers)
    settings = Settings(home=str(home), source=str(src), base_model=base, adapter=adapter, chunk_rows=40)
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    with instance_for_test(temp_dir=str(dagster_home)) as instance:
        defs = build_definitions(settings)
        assert materialize([source.s2_source], resources=defs.resources, instance=instance, run_config=QUIET).success
        keys = sorted(instance.get_dynamic_partitions(CORPUSID_RANGES))
    assert len(keys) == 4
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda k: child("run", settings, dagster_home, k), keys))
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "lock" not in result.stderr.lower()
    layout = ProjectHome(home)
    with duckdb.connect(str(layout.warehouse), read_only=True) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT corpusid) FROM embeddings").fetchone() == (480, 480)
    for key in keys:
        assert_partition_complete(settings, key)


def test_two_publishers_at_once_keep_each_others_shards(tmp_path, monkeypatch):
    from paper_assets.engine.publish import Shard, publish_shards
    from paper_assets.engine.publish_targets import HubTarget

    from .test_hub import card, write_shard

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub = HUB.reset()
    shard_sets = [[Shard(f"00{i}000000-00{i}999999", write_shard(tmp_path / f"{i}.parquet", i * 10**6, 20, i), 20)
                   for i in group] for group in ((0, 1, 2), (3, 4, 5))]

    def publish(group):
        return publish_shards(HubTarget("user/race", endpoint=hub.endpoint, backoff_seconds=0.01), group, card,
                              "race")

    HubTarget("user/race", endpoint=hub.endpoint).head()  # create the repo first
    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(publish, shard_sets))
    files = hub.state.files("user/race")
    assert all(s.path_in_repo in files for group in shard_sets for s in group)
    assert hub.state.commit_count("user/race") == 3 and sum(r.conflicts for r in reports) <= 5


def test_token_never_reaches_logs_or_metadata(setup, monkeypatch):
    settings, _ = setup
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub = HUB.reset()
    defs = build_definitions(settings)
    from paper_assets.defs.resources import ShardPublisherResource

    resources = dict(defs.resources, publisher=ShardPublisherResource(hub_repo="user/secret", endpoint=hub.endpoint))
    hub.state.inject("POST", r"/preupload/", 403, times=1)
    with instance_for_test() as instance:
        assert materialize([source.s2_source], resources=resources, instance=instance, run_config=QUIET).success
        assert materialize([embeddings.papers, embeddings.paper_embeddings], partition_key=KEY, resources=resources,
                           instance=instance, run_config=QUIET).success
        failed = materialize([shards.hub_shards], resources=resources, instance=instance, run_config=QUIET,
                             raise_on_error=False)
        assert not failed.success
        ok = materialize([shards.hub_shards], resources=resources, instance=instance, run_config=QUIET)
        assert ok.success
        logs = instance.all_logs(failed.run_id) + instance.all_logs(ok.run_id)
        text = "\n".join(str(entry) for entry in logs)
        assert "refused the token" in text and TOKEN not in text
