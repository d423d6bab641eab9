"""S2's Datasets API as the source: a release snapshot, following releases by diffs, resumed downloads, key
errors; against the fake S2 server built from S2's documented formats."""

from __future__ import annotations

import datetime

import duckdb
import pyarrow.parquet as pq
import pytest
from dagster import AssetKey, instance_for_test

from paper_assets import cli
from paper_assets.definitions import build_definitions
from paper_assets.defs.resources import S2SourceResource
from paper_assets.defs.sensors import s2_release_ranges_sensor, s2_source_release_sensor
from paper_assets.engine.home import ProjectHome
from paper_assets.engine.s2_download import DownloadInterrupted
from paper_assets.engine.snapshot import build_snapshot
from paper_assets.engine.source import inspect_source
from paper_assets.settings import Settings

from .conftest import make_source
from .fake_s2 import FakeS2
from .test_releases import covered_ranges, home_vectors, run_sensor_requests, tick, update, v1_papers, v2_papers

KEY = "s2-test-key"
V1, V2 = "2024-11-05", "2024-11-12"


def s2_records(papers: list[dict]) -> tuple[list[dict], list[dict]]:
    """The papers as S2's ``papers`` and ``abstracts`` datasets hold them. Every 7th paper has only a year (no
    publicationdate); every 11th has a second, shorter abstract row (the rule keeps the longest)."""
    records, abstracts = [], []
    for i, paper in enumerate(papers):
        date = paper.get("publication_date")
        records.append({"corpusid": paper["corpusid"], "externalids": {"CorpusId": str(paper["corpusid"])},
                        "title": paper["title"], "year": date.year if date else None,
                        "publicationdate": None if (i % 7 == 0 or not date) else date.isoformat(),
                        "citationcount": paper.get("citation_count"), "venue": "",
                        "s2fieldsofstudy": [{"category": "Computer Science", "source": "s2-fos-model"}]})
        if paper.get("abstract"):
            abstracts.append({"corpusid": paper["corpusid"], "openaccessinfo": {"status": None},
                              "abstract": paper["abstract"]})
            if i % 11 == 0:
                abstracts.append({"corpusid": paper["corpusid"], "openaccessinfo": None, "abstract": "Short."})
    return records, abstracts


def as_duckdb_papers(papers: list[dict]) -> list[dict]:
    """What the cleaned DuckDB file holds for the same papers: a year-only date is January 1st of that year."""
    out = []
    for i, paper in enumerate(papers):
        date = paper.get("publication_date")
        if date and i % 7 == 0:
            date = datetime.date(date.year, 1, 1)
        out.append({**paper, "publication_date": date})
    return out


def s2_resource(fake: FakeS2, folder, key: str = KEY, release: str = "latest", where: str = "") -> S2SourceResource:
    return S2SourceResource(path="s2-datasets", s2_api=fake.url, s2_api_key=key, s2_min_interval=0.0,
                            s2_folder=str(folder), s2_release=release, s2_filter=where)


@pytest.fixture()
def fake_s2():
    with FakeS2(KEY) as fake:
        fake.add_release(V1, *s2_records(v1_papers()))
        yield fake


def table_rows(conn, sql: str) -> list[tuple]:
    return conn.execute(sql).fetchall()


def test_an_s2_release_snapshots_like_the_same_papers_in_a_duckdb_file(fake_s2, tmp_path):
    resource = s2_resource(fake_s2, tmp_path / "s2")
    assert resource.current_version() == f"s2-{V1}"
    s2 = build_snapshot(resource.resolve(), tmp_path / "from_s2", f"s2-{V1}", 1_000_000)
    source = make_source(tmp_path / "cleaned.duckdb", as_duckdb_papers(v1_papers()))
    cleaned = build_snapshot([inspect_source(source)], tmp_path / "from_duckdb", "cleaned", 1_000_000)
    assert s2.rows == cleaned.rows == 2000
    assert s2.ranges == cleaned.ranges  # rows and content hash of every range
    columns = ["corpusid", "title", "abstract", "publication_date"]
    ours = pq.read_table(tmp_path / "from_s2" / f"s2-{V1}" / "papers.parquet")
    theirs = pq.read_table(tmp_path / "from_duckdb" / "cleaned" / "papers.parquet", columns=columns)
    assert ours.select(columns).to_pydict() == theirs.to_pydict()
    from_year = ours.column("date_from_year").to_pylist()
    assert sum(from_year) == len(range(0, 2000, 7)) and from_year[0] is True and from_year[1] is False


CS_2024 = "year >= 2024 AND list_contains(s2fieldsofstudy->>'$[*].category', 'Computer Science')"


@pytest.mark.parametrize("where", ["", CS_2024])
def test_diffs_bring_a_release_to_what_a_full_download_of_the_newer_one_gives(fake_s2, tmp_path, where):
    v2, _ = v2_papers(v1_papers())
    for paper in v2[:300:3]:  # a third of these move out of (or into) 2024
        date = paper.get("publication_date")
        if date:
            paper["publication_date"] = date.replace(year=2023 if date.year == 2024 else 2024)
    fake_s2.add_release(V2, *s2_records(v2))
    s2_resource(fake_s2, tmp_path / "following", release=V1, where=where).resolve()
    fake_s2.state.requests.clear()
    database = s2_resource(fake_s2, tmp_path / "following", where=where).resolve()[0].path
    assert not [p for _, p, _ in fake_s2.state.requests if p.startswith(f"/files/{V2}/")]  # no full download
    assert [p for _, p, _ in fake_s2.state.requests if "/diffs/" in p and p.startswith("/datasets")]
    fresh_database = s2_resource(fake_s2, tmp_path / "fresh", where=where).resolve()[0].path
    queries = ["SELECT * FROM papers_with_abstracts ORDER BY corpusid",
               "SELECT corpusid, title, year, publicationdate FROM papers ORDER BY corpusid",
               "SELECT corpusid, abstract FROM abstracts ORDER BY corpusid, abstract"]
    with duckdb.connect(database, read_only=True) as a, duckdb.connect(fresh_database, read_only=True) as b:
        for sql in queries:
            assert table_rows(a, sql) == table_rows(b, sql)
        kept = [p for p in v2 if not where or (p.get("publication_date") and p["publication_date"].year >= 2024)]
        assert table_rows(a, "SELECT count(*) FROM papers_with_abstracts")[0][0] == len(kept)
    manifest = (tmp_path / "following" / V2 / "manifest.json").read_text()
    assert f"diffs from {V1}" in manifest and '"deleted"' in manifest


def test_an_interrupted_download_resumes_and_leaves_no_partial_release_current(fake_s2, tmp_path):
    fake_s2.state.cut_once.add("abstracts-part1.jsonl.gz")
    resource = s2_resource(fake_s2, tmp_path / "s2")
    with pytest.raises(DownloadInterrupted, match="resumes"):
        resource.resolve()
    assert not (tmp_path / "s2" / "current.json").exists()
    assert list((tmp_path / "s2" / "downloads" / V1 / "abstracts").glob("*.part"))
    database = resource.resolve()[0].path
    ranges = fake_s2.state.file_requests("abstracts-part1.jsonl.gz")
    assert ranges[0] == "" and ranges[1].startswith("bytes=") and int(ranges[1][6:-1]) > 0
    assert fake_s2.state.file_requests("papers-part0.jsonl.gz") == [""]  # complete files are not fetched again
    with duckdb.connect(database, read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM papers_with_abstracts").fetchone()[0] == 2000
    assert not (tmp_path / "s2" / "downloads" / V1).exists()  # removed once the release is current


@pytest.mark.parametrize("key", ["wrong-key", ""])
def test_a_wrong_or_missing_key_is_a_one_line_error(fake_s2, home, monkeypatch, capsys, key):
    monkeypatch.setenv("PAPER_ASSETS_SOURCE", "s2-datasets")
    monkeypatch.setenv("PAPER_ASSETS_S2_API", fake_s2.url)
    monkeypatch.setenv("S2_API_KEY", key)
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    assert cli.main(["update"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "S2_API_KEY" in error, error


@pytest.fixture()
def s2_home(fake_s2, home, tiny_model, monkeypatch, tmp_path):
    base, adapter = tiny_model
    settings = Settings(home=str(home), source="s2-datasets", s2_api=fake_s2.url, s2_min_interval=0.0,
                        base_model=base, adapter=adapter, chunk_rows=64, precision="fp32", novelty=False)
    settings.save()
    monkeypatch.setenv("S2_API_KEY", KEY)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    return settings


def test_update_follows_s2_by_diffs_and_embeds_only_what_changed(s2_home, fake_s2, capsys):
    first = update(capsys)
    assert first["release"] == f"s2-{V1}" and first["rows_embedded"] == 2000
    before = home_vectors(ProjectHome(s2_home.home))
    v2, changes = v2_papers(v1_papers())
    fake_s2.add_release(V2, *s2_records(v2))
    second = update(capsys)
    assert {k: second[k] for k in ("release", "ranges_changed", "rows_embedded", "rows_reused", "rows_deleted")} \
        == {"release": f"s2-{V2}", "ranges_changed": 6, "rows_embedded": 80, "rows_reused": 1930,
            "rows_deleted": 20}
    assert not [p for _, p, _ in fake_s2.state.requests if p.startswith(f"/files/{V2}/")]
    assert len(before) == 2000 and set(changes["deleted"]) <= set(before)


def test_the_sensors_follow_s2_releases(s2_home, fake_s2):
    defs = build_definitions(s2_home)
    with instance_for_test() as instance:
        first = tick(s2_source_release_sensor, defs, instance)
        assert [r.asset_selection for r in first.run_requests] == [[AssetKey("s2_source")]]
        run_sensor_requests(first, defs, instance)
        run_sensor_requests(tick(s2_release_ranges_sensor, defs, instance), defs, instance)
        fake_s2.state.requests.clear()
        assert not tick(s2_source_release_sensor, defs, instance).run_requests
        assert [p for _, p, _ in fake_s2.state.requests] == ["/datasets/v1/release/latest"]  # one small request
        v2, _ = v2_papers(v1_papers())
        fake_s2.add_release(V2, *s2_records(v2))
        snapshot = tick(s2_source_release_sensor, defs, instance)
        assert [r.run_key for r in snapshot.run_requests] == [f"s2_source:s2-{V2}"]
        run_sensor_requests(snapshot, defs, instance)
        [latest] = instance.fetch_materializations(AssetKey("s2_source"), limit=1).records
        meta = {k: v.value for k, v in latest.asset_materialization.metadata.items()}
        assert meta["s2_built_from"] == f"diffs from {V1}" and meta["s2_diff_steps"] == f"{V1} -> {V2}"
        assert meta["s2_deleted"]["papers"] == 20 and meta["s2_papers_with_abstracts"] == 2010
        ranges = tick(s2_release_ranges_sensor, defs, instance)
        assert len(set(covered_ranges(ranges, instance))) == 6
        run_sensor_requests(ranges, defs, instance)
        records = instance.fetch_materializations(AssetKey("paper_embeddings"), limit=100).records
        embedded = sum(r.asset_materialization.metadata["rows_embedded"].value for r in records[:6])
        assert embedded == 80
