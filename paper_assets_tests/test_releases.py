"""New source releases: snapshots, the cheap sensor, the planner, row-level reuse, deletions, `paper-assets update`."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from dagster import AssetKey, DagsterRunStatus, build_sensor_context, instance_for_test, materialize
from dagster._core.test_utils import create_run_for_test

from paper_assets import cli
from paper_assets.definitions import build_definitions
from paper_assets.defs import embeddings, shards, source
from paper_assets.defs.partitions import CORPUSID_RANGES
from paper_assets.defs.release import recover_abandoned_runs
from paper_assets.defs.resources import S2SourceResource, Specter2Resource
from paper_assets.defs.run_worker import PID_TAG, PROCESS_START_TAG, this_process_tags
from paper_assets.defs.sensors import s2_release_ranges_sensor, s2_source_release_sensor
from paper_assets.demo_kit import sample_source
from paper_assets.engine.home import ProjectHome
from paper_assets.engine.ranges import parse_range
from paper_assets.engine.schemas import vectors_of
from paper_assets.engine.snapshot import build_snapshot, current_snapshot
from paper_assets.engine.source import inspect_source
from paper_assets.processes import process_start
from paper_assets.settings import Settings

from .conftest import REPO, make_source

QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


def v1_papers() -> list[dict]:
    papers = sample_source.generate_papers(2000, seed=3)
    for i, paper in enumerate(papers):
        paper["abstract"] = paper["abstract"] or f"Abstract number {i}."
    return papers


def v2_papers(v1: list[dict]) -> tuple[list[dict], dict]:
    """50 abstracts changed, 20 rows deleted, 30 added (10 of them in a range v1 did not have), spread over every
    range of v1 so every range is re-run and its unchanged rows are reused."""
    papers = [dict(p) for p in v1]
    changed = list(range(0, 2000, 40))[:50]
    for i in changed:
        papers[i]["abstract"] += " Revised."
    deleted = {7 + 100 * i for i in range(20)}
    added = [dict(papers[13 + 100 * i], corpusid=papers[13 + 100 * i]["corpusid"] + 1, title=f"Added {i}")
             for i in range(20)]
    added += [{"corpusid": 9_000_000 + i, "title": f"Far {i}", "abstract": "In a new range."} for i in range(10)]
    kept = [p for i, p in enumerate(papers) if i not in deleted]
    return kept + added, {"changed": [papers[i]["corpusid"] for i in changed],
                          "deleted": [papers[i]["corpusid"] for i in deleted]}


@pytest.fixture()
def release_home(tmp_path, home, tiny_model, monkeypatch):
    base, adapter = tiny_model
    src = make_source(tmp_path / "source.duckdb", v1_papers())
    # Novelty is off here (its own tests cover it) except where a test switches it on: it adds ~20 s per update.
    settings = Settings(home=str(home), source=str(src), base_model=base, adapter=adapter, chunk_rows=64,
                        precision="fp32", novelty=False)
    settings.save()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    return settings


def update(capsys, *flags) -> dict:
    assert cli.main(["update", *flags]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def home_vectors(layout: ProjectHome, column: str = "embedding") -> dict[int, np.ndarray]:
    found = {}
    for path in layout.embeddings_dir.glob("embeddings-*.parquet"):
        table = pq.read_table(path)
        values = vectors_of(table) if column == "embedding" else table.column(column).to_pylist()
        found.update(zip(table.column("corpusid").to_pylist(), values, strict=True))
    return found


def write_release(settings: Settings, papers: list[dict]) -> None:
    os.remove(settings.source)
    make_source(settings.source, papers)


def test_update_embeds_only_what_changed_and_deletes_what_left(release_home, capsys, monkeypatch):
    monkeypatch.setenv("PAPER_ASSETS_NOVELTY", "1")
    settings = release_home
    layout = ProjectHome(settings.home)
    first = update(capsys, "--publish")
    assert first["rows_embedded"] == 2000 and first["rows_reused"] == 0
    before, hashes_before = home_vectors(layout), home_vectors(layout, "text_sha256")

    v2, changes = v2_papers(v1_papers())
    write_release(settings, v2)
    second = update(capsys, "--publish")
    assert {k: second[k] for k in ("ranges_changed", "rows_embedded", "rows_reused", "rows_deleted")} == {
        "ranges_changed": 6, "rows_embedded": 80, "rows_reused": 1930, "rows_deleted": 20}
    after = home_vectors(layout)
    assert set(after) == {int(p["corpusid"]) for p in v2}
    untouched = set(before) - set(changes["changed"]) - set(changes["deleted"])
    assert len(untouched) == 1930
    assert all(after[i].tobytes() == before[i].tobytes() for i in untouched)  # bit for bit
    hashes_after = home_vectors(layout, "text_sha256")
    assert all(hashes_after[i] != hashes_before[i] for i in changes["changed"])  # stored with the new text
    with duckdb.connect(str(layout.warehouse), read_only=True) as conn:
        ids = {r[0] for r in conn.execute("SELECT corpusid FROM embeddings").fetchall()}
    assert ids == {int(p["corpusid"]) for p in v2}
    published = {p.name for p in (layout.hub_folder / "data").glob("*.parquet")}
    assert "embeddings-009000000-009999999.parquet" in published
    card = (layout.hub_folder / "README.md").read_text()
    assert second["release"] in card
    commits = [json.loads(line) for line in (layout.hub_folder / ".commits.jsonl").read_text().splitlines()]
    shard_commits = [c for c in commits if any(p.startswith("data/") for p in c["added"] + c["deleted"])]
    assert len(shard_commits) == 2  # one per release
    # Novelty: every month at first; after the change, the months from the earliest changed paper's on.
    assert first["novelty_months"] == 24 and 0 < second["novelty_months"] <= 24
    assert len(commits) == 4

    again = update(capsys, "--publish")
    assert again == {"release": second["release"], "ranges_changed": 0, "rows_embedded": 0, "rows_reused": 0,
                     "rows_deleted": 0, "novelty_months": 0}
    assert len((layout.hub_folder / ".commits.jsonl").read_text().splitlines()) == 4


def run_sensor_requests(result, defs, instance) -> int:
    """Do what the daemon does with a sensor's result; returns how many runs were launched."""
    for request in getattr(result, "dynamic_partitions_requests", None) or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    requests = getattr(result, "run_requests", None) or []
    for request in requests:
        selection = [{"s2_source": source.s2_source, "papers": embeddings.papers,
                      "paper_embeddings": embeddings.paper_embeddings, "hub_shards": shards.hub_shards}[
                          key.to_user_string()] for key in request.asset_selection]
        assert materialize(selection, partition_key=request.partition_key, resources=defs.resources,
                           instance=instance, run_config=QUIET, tags=request.tags).success
    return len(requests)


def covered_ranges(result, instance) -> list[str]:
    """The ranges a sensor result's run requests cover (several neighbouring ranges go in one run)."""
    keys = [*instance.get_dynamic_partitions(CORPUSID_RANGES)]
    for request in getattr(result, "dynamic_partitions_requests", None) or []:
        keys += [k for k in request.partition_keys if k not in keys]
    covered = []
    for request in result.run_requests:
        if request.partition_key:
            covered.append(request.partition_key)
        elif request.partition_key_range:
            span = request.partition_key_range
            covered += keys[keys.index(span.start):keys.index(span.end) + 1]
    return covered


def tick(sensor, defs, instance, cursor=None):
    resources = {k: defs.resources[k] for k in ("source", "home", "publisher")}
    context = build_sensor_context(instance=instance, resources=resources, cursor=cursor)
    return sensor(context)


def test_the_sensors_follow_a_release_and_request_nothing_on_a_current_home(release_home):
    settings = release_home
    defs = build_definitions(settings)
    with instance_for_test() as instance:
        first = tick(s2_source_release_sensor, defs, instance)
        assert [r.asset_selection for r in first.run_requests] == [[AssetKey("s2_source")]]
        run_sensor_requests(first, defs, instance)
        ranges = tick(s2_release_ranges_sensor, defs, instance)
        assert len(covered_ranges(ranges, instance)) == 5 and len(ranges.run_requests) == 2  # 4 ranges a run
        run_sensor_requests(ranges, defs, instance)
        hub = tick(s2_release_ranges_sensor, defs, instance)
        assert [r.asset_selection for r in hub.run_requests] == [[AssetKey("hub_shards")]]
        run_sensor_requests(hub, defs, instance)

        # A complete, current home: turning the sensors on (empty cursors) requests nothing.
        assert not tick(s2_source_release_sensor, defs, instance).run_requests
        assert run_sensor_requests(tick(s2_release_ranges_sensor, defs, instance), defs, instance) == 0

        v2, _ = v2_papers(v1_papers())
        write_release(settings, v2)
        snapshot = tick(s2_source_release_sensor, defs, instance)
        assert len(snapshot.run_requests) == 1
        run_sensor_requests(snapshot, defs, instance)
        assert "009000000-009999999" in instance.get_dynamic_partitions(CORPUSID_RANGES)  # added by s2_source
        ranges = tick(s2_release_ranges_sensor, defs, instance)
        assert len(set(covered_ranges(ranges, instance))) == 6
        assert "009000000-009999999" in covered_ranges(ranges, instance)
        run_sensor_requests(ranges, defs, instance)
        totals = {"rows_embedded": 0, "rows_reused": 0, "rows_deleted": 0}
        records = instance.fetch_materializations(AssetKey("paper_embeddings"), limit=100).records  # newest first
        for key in instance.get_dynamic_partitions(CORPUSID_RANGES):
            latest = next(r for r in records if r.partition_key == key)
            for name in totals:
                totals[name] += latest.asset_materialization.metadata[name].value
        assert totals == {"rows_embedded": 80, "rows_reused": 1930, "rows_deleted": 20}
        run_sensor_requests(tick(s2_release_ranges_sensor, defs, instance), defs, instance)  # hub_shards
        assert run_sensor_requests(tick(s2_release_ranges_sensor, defs, instance), defs, instance) == 0


def test_sensor_tick_reads_no_data(release_home, monkeypatch):
    settings = release_home
    defs = build_definitions(settings)
    import paper_assets.engine.snapshot as snapshot_module

    def forbidden(*args, **kwargs):
        raise AssertionError("the release sensor must not read or snapshot the source")

    monkeypatch.setattr(snapshot_module, "build_snapshot", forbidden)
    monkeypatch.setattr(duckdb, "connect", forbidden)
    with instance_for_test() as instance:
        result = tick(s2_source_release_sensor, defs, instance)
    assert len(result.run_requests) == 1


def test_a_model_change_re_embeds_everything(release_home, capsys):
    settings = release_home
    update(capsys)
    defs = build_definitions(settings)
    key = "000000000-000999999"
    # max_length is part of the fingerprint: a new model as far as stored vectors are concerned.
    changed = Specter2Resource(base_model=settings.base_model, adapter=settings.adapter, precision="fp32",
                               max_length=256, chunk_rows=64)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(CORPUSID_RANGES, [key])
        result = materialize([embeddings.paper_embeddings], partition_key=key,
                             resources=dict(defs.resources, specter2=changed), instance=instance, run_config=QUIET)
    meta = result.asset_materializations_for_node("paper_embeddings")[0].metadata
    assert meta["rows_reused"].value == 0 and meta["rows_embedded"].value == meta["dagster/row_count"].value > 0


def test_an_emptied_range_ends_with_no_rows_locally_and_on_the_hub(release_home, capsys):
    settings = release_home
    layout = ProjectHome(settings.home)
    update(capsys, "--publish")
    last = "004000000-004999999"
    assert (layout.hub_folder / "data" / f"embeddings-{last}.parquet").exists()
    write_release(settings, [p for p in v1_papers() if parse_range(last).lo > p["corpusid"]])
    summary = update(capsys, "--publish")
    assert summary["ranges_changed"] == 1 and summary["rows_deleted"] > 0 and summary["rows_embedded"] == 0
    assert pq.read_metadata(layout.embeddings_file(parse_range(last))).num_rows == 0  # the partition is kept
    assert not (layout.hub_folder / "data" / f"embeddings-{last}.parquet").exists()
    assert update(capsys, "--publish")["ranges_changed"] == 0


def test_a_hub_source_with_a_new_revision_is_a_new_release(tmp_path, home, monkeypatch):
    from huggingface_hub import HfApi

    from .conftest import HUB
    from .hub_server import TOKEN

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub = HUB.reset()
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo("user/s2", repo_type="dataset")

    def upload(papers, name):
        path = make_source(tmp_path / name, papers)
        api.upload_file(path_or_fileobj=str(path), path_in_repo="S2_papers_cleaned.db", repo_id="user/s2",
                        repo_type="dataset")

    upload([{"corpusid": 1, "title": "One", "abstract": "A"}], "v1.duckdb")
    settings = Settings(home=str(home), source="", source_hub_repo="user/s2")
    defs = build_definitions(settings)
    resources = dict(defs.resources, source=S2SourceResource(hub_repo="user/s2", hub_endpoint=hub.endpoint))
    with instance_for_test() as instance:
        context = build_sensor_context(instance=instance, resources={k: resources[k] for k in ("source", "home")})
        first = s2_source_release_sensor(context)
        assert len(first.run_requests) == 1
        assert materialize([source.s2_source], resources=resources, instance=instance, run_config=QUIET).success
        assert current_snapshot(ProjectHome(home).source_dir).manifest.rows == 1
        current = s2_source_release_sensor(build_sensor_context(instance=instance, resources={
            k: resources[k] for k in ("source", "home")}, cursor=first.cursor))
        assert not current.run_requests
        upload([{"corpusid": i, "title": "T", "abstract": "A"} for i in range(1, 4)], "v2.duckdb")
        second = s2_source_release_sensor(build_sensor_context(instance=instance, resources={
            k: resources[k] for k in ("source", "home")}, cursor=first.cursor))
        assert len(second.run_requests) == 1 and second.cursor != first.cursor
        assert materialize([source.s2_source], resources=resources, instance=instance, run_config=QUIET).success
        snapshot = current_snapshot(ProjectHome(home).source_dir)
        assert snapshot.manifest.rows == 3 and snapshot.version == second.cursor


def test_varchar_and_integer_ids_give_identical_snapshots(tmp_path):
    papers = v1_papers()[:300] + [{"corpusid": "x12", "title": "bad", "abstract": None}]
    tables, manifests = [], []
    for id_type in ("BIGINT", "VARCHAR"):
        rows = papers if id_type == "VARCHAR" else papers[:-1]
        info = inspect_source(make_source(tmp_path / f"{id_type}.duckdb", rows, id_type))
        manifest = build_snapshot([info], tmp_path / id_type, "r1", 1_000_000)
        tables.append(pq.read_table(tmp_path / id_type / "r1" / "papers.parquet").drop(["source_file"]))
        manifests.append(manifest)
    assert tables[0].to_pylist() == tables[1].to_pylist()
    assert manifests[0].ranges == manifests[1].ranges
    assert manifests[1].invalid_corpusid == 1 and manifests[0].invalid_corpusid == 0


def test_several_input_files_merge_by_corpusid_with_the_duplicate_rule(tmp_path):
    main = make_source(tmp_path / "main.duckdb", [
        {"corpusid": 1, "title": "Main one", "abstract": "short"},
        {"corpusid": 2, "title": "Main two", "abstract": "the longer abstract wins"},
        {"corpusid": 3, "title": "Tie", "abstract": "same"},
        {"corpusid": 3, "title": "Tie", "abstract": "same"},
    ], "VARCHAR")
    extra = make_source(tmp_path / "extra.duckdb", [
        {"corpusid": 1, "title": "Extra one", "abstract": "a longer abstract"},
        {"corpusid": 2, "title": "Extra two", "abstract": "short"},
        {"corpusid": 3, "title": "Tie", "abstract": "same"},
        {"corpusid": 4, "title": "Only extra", "abstract": None},
        {"corpusid": "bad", "title": "No id", "abstract": "x"},
    ], "VARCHAR")
    manifest = build_snapshot([inspect_source(main), inspect_source(extra)], tmp_path / "snap", "r", 1_000_000)
    rows = {r["corpusid"]: r for r in pq.read_table(tmp_path / "snap" / "r" / "papers.parquet").to_pylist()}
    assert sorted(rows) == [1, 2, 3, 4]
    assert rows[1]["source_file"] == str(extra) and rows[2]["source_file"] == str(main)
    assert rows[3]["source_file"] == str(extra)  # a tie goes to the later file
    by_file = {i.path: i for i in manifest.inputs}
    assert (by_file[str(main)].rows, by_file[str(main)].kept, by_file[str(main)].duplicates_dropped) == (4, 1, 3)
    assert (by_file[str(extra)].invalid_corpusid, by_file[str(extra)].kept) == (1, 3)
    quarantine = pq.read_table(tmp_path / "snap" / "r" / "invalid_corpusid.parquet").to_pylist()
    assert [(q["corpusid_raw"], q["source_file"]) for q in quarantine] == [("bad", str(extra))]
    assert manifest.rows == 4 and manifest.duplicates_dropped == 4 and manifest.invalid_corpusid == 1


def test_source_setting_takes_several_files(tmp_path, home, tiny_model, monkeypatch, capsys):
    base, adapter = tiny_model
    first = make_source(tmp_path / "a.duckdb", v1_papers()[:100])
    second = make_source(tmp_path / "b.duckdb", v1_papers()[100:150])
    Settings(home=str(home), source=f"{first},{second}", base_model=base, adapter=adapter).save()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    assert update(capsys)["rows_embedded"] == 150


def test_kill_during_update_then_update_again_reaches_the_same_state(release_home, capsys, tmp_path):
    settings = release_home
    layout = ProjectHome(settings.home)
    update(capsys, "--publish")
    before = home_vectors(layout)
    v2, changes = v2_papers(v1_papers())
    write_release(settings, v2)
    env = dict(os.environ, PAPER_ASSETS_HOME=settings.home)
    killed = subprocess.run([sys.executable, "-m", "paper_assets_tests.fault_child", "kill-during-update",
                             json.dumps(dataclasses.asdict(settings)), "12"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    summary = update(capsys, "--publish")
    assert summary["rows_embedded"] <= 80  # what the killed run finished is not redone
    after = home_vectors(layout)
    assert set(after) == {int(p["corpusid"]) for p in v2}
    untouched = set(before) - set(changes["changed"]) - set(changes["deleted"])
    assert all(after[i].tobytes() == before[i].tobytes() for i in untouched)
    assert update(capsys, "--publish")["ranges_changed"] == 0
    with duckdb.connect(str(layout.warehouse), read_only=True) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT corpusid) FROM embeddings").fetchone() == (len(v2),
                                                                                                        len(v2))
    published = {p.name.removeprefix("embeddings-").removesuffix(".parquet")
                 for p in (layout.hub_folder / "data").glob("*.parquet")}
    assert published == {k for k in current_snapshot(layout.source_dir).manifest.ranges}


def test_runs_of_a_dead_update_are_recovered_even_when_their_pid_lives_again():
    """An update's runs carry its pid and start; a run is abandoned when that process is gone, is a zombie, or when
    its pid now belongs to another process (a restarted container hands the same pids out again)."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])  # exits and stays a zombie until waited for
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.time() + 30
        while process_start(ended.pid) is not None and time.time() < deadline:
            time.sleep(0.05)
        assert os.path.exists(f"/proc/{ended.pid}")  # ended, not yet waited for: a zombie
        mine = this_process_tags()
        sleeper_tags = {**mine, PID_TAG: str(sleeper.pid), PROCESS_START_TAG: process_start(sleeper.pid)}
        cases = {
            "this process": (mine, False),
            "a live process": (sleeper_tags, False),
            "a live process, legacy tags": ({**sleeper_tags, PROCESS_START_TAG: ""}, False),
            "a zombie": ({**mine, PID_TAG: str(ended.pid), PROCESS_START_TAG: ""}, True),
            "a reused pid": ({**sleeper_tags, PROCESS_START_TAG: mine[PROCESS_START_TAG] + "0"}, True),
            "this pid, an earlier process": ({**mine, PROCESS_START_TAG: "another-boot/1"}, True),
        }
        with instance_for_test() as instance:
            run_ids = {name: create_run_for_test(instance, status=DagsterRunStatus.STARTED, tags=tags).run_id
                       for name, (tags, _) in cases.items()}
            assert recover_abandoned_runs(instance, lambda _: None) == 3
            for name, (_, abandoned) in cases.items():
                status = instance.get_run_by_id(run_ids[name]).status
                assert status == (DagsterRunStatus.FAILURE if abandoned else DagsterRunStatus.STARTED), name
    finally:
        sleeper.kill()
        sleeper.wait()
        ended.wait()
