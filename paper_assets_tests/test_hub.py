"""Publishing against a Hub-protocol server on 127.0.0.1 with the real huggingface_hub client (no mocks of it)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import instance_for_test, materialize

from paper_assets.definitions import build_definitions
from paper_assets.defs import embeddings, shards, source
from paper_assets.defs.partitions import CORPUSID_RANGES
from paper_assets.defs.resources import S2SourceResource
from paper_assets.engine.card import dataset_card
from paper_assets.engine.fs import sha256_file
from paper_assets.engine.publish import PublishError, Shard, publish_shards
from paper_assets.engine.publish_targets import HubTarget
from paper_assets.engine.schemas import embeddings_batch, embeddings_schema
from paper_assets.settings import Settings

from .conftest import HUB, make_source
from .hub_server import TOKEN

REPO_ID = "user/specter2-embeddings"


@pytest.fixture()
def hub(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield HUB.reset()


def write_shard(path, lo, rows, seed=0, dim=16):
    rng = np.random.default_rng(seed)
    ids = np.arange(lo, lo + rows, dtype=np.int64)
    schema = embeddings_schema(dim)
    batch = embeddings_batch(ids, rng.normal(size=(rows, dim)).astype(np.float32),
                             pa.array([f"{i:064x}" for i in ids]), schema)
    pq.write_table(pa.Table.from_batches([batch]), path)
    return path


def card(present):
    return dataset_card(present, {}, {"base_model": "test"}, "release-1", 16)


def target(hub, **kwargs):
    return HubTarget(REPO_ID, endpoint=hub.endpoint, backoff_seconds=0.01, **kwargs)


@pytest.fixture()
def two_shards(tmp_path):
    return [Shard("000000000-000999999", write_shard(tmp_path / "a.parquet", 5, 40), 40),
            Shard("001000000-001999999", write_shard(tmp_path / "b.parquet", 1_000_000, 30, seed=1), 30)]


def uploads(hub):
    return sum(1 for method, path in hub.state.requests if method == "PUT" and path.startswith("/lfs-upload/"))


def test_first_publish_makes_one_commit_with_every_shard_and_a_card(hub, two_shards):
    report = publish_shards(target(hub), two_shards, card, "publish")
    files = hub.state.files(REPO_ID)
    assert hub.state.commit_count(REPO_ID) == 2  # the repo's initial commit + ours
    assert sorted(report.uploaded) == [s.path_in_repo for s in two_shards]
    for shard in two_shards:
        assert files[shard.path_in_repo].lfs_sha256 == sha256_file(shard.local)
    assert b"data/*.parquet" in files["README.md"].content
    assert report.commit_sha == hub.state.repos[REPO_ID].branches["main"]


def test_republishing_unchanged_data_makes_no_commit(hub, two_shards):
    publish_shards(target(hub), two_shards, card, "publish")
    before, puts = hub.state.commit_count(REPO_ID), uploads(hub)
    report = publish_shards(target(hub), two_shards, card, "publish again")
    assert report.commit_sha is None and sorted(report.skipped) == [s.path_in_repo for s in two_shards]
    assert hub.state.commit_count(REPO_ID) == before and uploads(hub) == puts


def test_one_changed_partition_uploads_only_that_file(hub, two_shards, tmp_path):
    publish_shards(target(hub), two_shards, card, "publish")
    puts = uploads(hub)
    write_shard(two_shards[1].local, 1_000_000, 31, seed=2)
    report = publish_shards(target(hub), two_shards, card, "update")
    assert report.uploaded == [two_shards[1].path_in_repo]
    assert report.skipped == [two_shards[0].path_in_repo]
    assert uploads(hub) == puts + 1


def test_a_concurrent_commit_is_kept_and_ours_retried_after_412(hub, two_shards, tmp_path):
    publish_shards(target(hub), two_shards[:1], card, "first")
    foreign = write_shard(tmp_path / "foreign.parquet", 7_000_000, 5, seed=9)
    other = Shard("007000000-007999999", foreign, 5)

    def someone_else_commits(state):  # another client, committing between our head read and our commit
        from huggingface_hub import HfApi

        HfApi(endpoint=hub.endpoint, token=TOKEN).upload_file(
            path_or_fileobj=str(foreign), path_in_repo=other.path_in_repo, repo_id=REPO_ID, repo_type="dataset")

    hub.state.before_commit_hooks.append(someone_else_commits)
    report = publish_shards(target(hub), two_shards, card, "ours")
    assert report.conflicts == 1
    files = hub.state.files(REPO_ID)
    assert other.path_in_repo in files and two_shards[1].path_in_repo in files
    assert other.path_in_repo in files["README.md"].content.decode()  # the card lists the other's shard too


def test_429_and_500_are_survived_without_duplicate_commits(hub, two_shards):
    hub.state.inject("POST", r"/paths-info/", 429, times=2, headers={"Retry-After": "0"})
    hub.state.inject("POST", r"/commit/", 500, times=1)  # the commit did not happen
    hub.state.inject("POST", r"/commit/", 502, times=1, after=True)  # the commit happened, the answer was lost
    hub.state.inject("GET", r"/revision/", 503, times=1)
    report = publish_shards(target(hub), two_shards, card, "flaky", backoff_seconds=0.01)
    assert report.transient_retries == 2
    assert hub.state.commit_count(REPO_ID) == 2  # initial + exactly one of ours
    files = hub.state.files(REPO_ID)
    assert all(files[s.path_in_repo].lfs_sha256 == sha256_file(s.local) for s in two_shards)


def test_removed_partition_deletes_its_shard(hub, two_shards):
    publish_shards(target(hub), two_shards, card, "publish")
    emptied = Shard(two_shards[1].range_key, None, 0)
    report = publish_shards(target(hub), [two_shards[0], emptied], card, "remove")
    assert report.deleted == [emptied.path_in_repo]
    assert emptied.path_in_repo not in hub.state.files(REPO_ID)
    assert emptied.path_in_repo not in hub.state.files(REPO_ID)["README.md"].content.decode()


def test_missing_token_is_a_clear_error(hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with pytest.raises(PublishError, match="HF_TOKEN is not set"):
        target(hub)


def test_token_never_appears_in_errors(hub, two_shards):
    hub.state.inject("POST", r"/preupload/", 400, times=10)
    with pytest.raises(PublishError) as info:
        publish_shards(target(hub), two_shards, card, "bad request")
    assert TOKEN not in str(info.value) and TOKEN not in repr(info.value.__cause__)


def test_invalid_repo_ids_and_paths_are_refused(hub):
    for bad in ("../etc", "user/../x", "no-slash", "a/b/c"):
        with pytest.raises(PublishError):
            HubTarget(bad, endpoint=hub.endpoint)
    with pytest.raises(PublishError, match="unexpected repo path"):
        _ = Shard("../../x", None).path_in_repo


def test_published_repo_downloads_and_loads(hub, two_shards, tmp_path):
    from huggingface_hub import snapshot_download

    publish_shards(target(hub), two_shards, card, "publish")
    folder = snapshot_download(REPO_ID, repo_type="dataset", endpoint=hub.endpoint, token=TOKEN,
                               local_dir=tmp_path / "snapshot")
    files = sorted((tmp_path / "snapshot" / "data").glob("*.parquet"))
    table = pa.concat_tables(pq.read_table(f) for f in files)
    assert table.num_rows == 70 and table.schema.field("embedding").type == pa.list_(pa.float32(), 16)
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train",
                                   cache_dir=str(tmp_path / "ds-cache"))
    assert loaded.num_rows == 70 and len(loaded[0]["embedding"]) == 16
    assert folder


def test_source_downloads_at_a_pinned_revision(hub, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo("user/s2-source", repo_type="dataset")
    v1 = make_source(tmp_path / "v1.duckdb", [{"corpusid": 1, "title": "One", "abstract": "A"}])
    first = api.upload_file(path_or_fileobj=str(v1), path_in_repo="S2_papers_cleaned.db", repo_id="user/s2-source",
                            repo_type="dataset").oid
    v2 = make_source(tmp_path / "v2.duckdb", [{"corpusid": i, "title": "T", "abstract": "A"} for i in range(1, 4)])
    api.upload_file(path_or_fileobj=str(v2), path_in_repo="S2_papers_cleaned.db", repo_id="user/s2-source",
                    repo_type="dataset")
    pinned = S2SourceResource(hub_repo="user/s2-source", revision=first, hub_endpoint=hub.endpoint)
    (info,) = pinned.resolve()
    assert info.version == f"hub-{first}"
    import duckdb

    with duckdb.connect(info.path, read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM papers_with_abstracts").fetchone()[0] == 1
    latest = S2SourceResource(hub_repo="user/s2-source", revision="main", hub_endpoint=hub.endpoint)
    assert latest.current_version() != pinned.current_version()


def test_hub_shards_asset_publishes_a_backfill_in_one_commit(hub, tmp_path, home, tiny_model, generated_papers,
                                                             monkeypatch):
    from dagster import EnvVar

    base, adapter = tiny_model
    papers = generated_papers[:120] + [dict(p, corpusid=p["corpusid"] + 3_000_000) for p in generated_papers[:50]]
    src = make_source(tmp_path / "source.duckdb", papers)
    defs = build_definitions(Settings(home=str(home), source=str(src), base_model=base, adapter=adapter,
                                      hub_repo=REPO_ID))
    resources = defs.resources  # the Hub endpoint is HF_ENDPOINT (the test server), the token EnvVar("HF_TOKEN")
    assert resources["publisher"].token == EnvVar("HF_TOKEN")
    quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
    with instance_for_test() as instance:
        monkeypatch.delenv("HF_TOKEN")  # only the publishing step needs it
        assert materialize([source.s2_source], resources=resources, instance=instance, run_config=quiet).success
        keys = sorted(instance.get_dynamic_partitions(CORPUSID_RANGES))
        assert len(keys) >= 2
        for key in keys:
            assert materialize([embeddings.papers, embeddings.paper_embeddings], partition_key=key,
                               resources=resources, instance=instance, run_config=quiet).success
        with pytest.raises(Exception, match="HF_TOKEN"):
            materialize([shards.hub_shards], resources=resources, instance=instance, run_config=quiet)
        assert REPO_ID not in hub.state.repos  # failed before touching the Hub
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        result = materialize([shards.hub_shards], resources=resources, instance=instance, run_config=quiet)
        assert TOKEN not in str(instance.get_run_by_id(result.run_id).run_config)
        assert result.success
        meta = result.asset_materializations_for_node("hub_shards")[0].metadata
        assert meta["files_uploaded"].value == len(keys)
        assert all(c.passed for c in result.get_asset_check_evaluations())
    assert hub.state.commit_count(REPO_ID) == 2
    assert TOKEN not in str(meta)


def test_many_changed_shards_go_in_commits_of_bounded_size_card_last_and_resume(hub, tmp_path):
    shards_ = [Shard(f"00{i}000000-00{i}999999", write_shard(tmp_path / f"{i}.parquet", i * 10**6, 10, i), 10)
               for i in range(5)]
    hub.state.inject("POST", r"/commit/", 403, times=1, after=False)  # the first commit is refused for good
    target(hub).head()
    with pytest.raises(PublishError):
        publish_shards(target(hub), shards_, card, "release", max_files_per_commit=2)
    assert hub.state.commit_count(REPO_ID) == 1  # nothing landed
    hub.state.faults.clear()
    first = publish_shards(target(hub), shards_[:2], None, "release", max_files_per_commit=2)
    assert len(first.commits) == 1
    report = publish_shards(target(hub), shards_, card, "release", max_files_per_commit=2)
    # Resumed: the two shards already there are skipped; three left -> commits of 2 and 1, the card in the last.
    assert len(report.commits) == 2 and sorted(report.skipped) == [s.path_in_repo for s in shards_[:2]]
    repo = hub.state.repos[REPO_ID]
    last, before_last = repo.commits[report.commits[-1]], repo.commits[report.commits[0]]
    assert "README.md" in last.files and "README.md" not in before_last.files
    assert "(part 2/2)" in last.message
    assert all(s.path_in_repo in hub.state.files(REPO_ID) for s in shards_)
    assert hub.state.commit_count(REPO_ID) == 4  # initial + 1 + 2
