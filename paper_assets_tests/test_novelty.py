"""Novelty metrics, the paper index, their assets, checks, sensor and the similar / novelty commands."""

import datetime
import json

import duckdb
import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from dagster import AssetCheckKey, AssetKey, build_sensor_context, instance_for_test, materialize

from paper_assets.benchkit.novelty_bench import authors_loop, synthetic_corpus
from paper_assets.cli import main
from paper_assets.definitions import build_definitions
from paper_assets.defs import embeddings, novelty, source
from paper_assets.defs.partitions import CORPUSID_RANGES, PUBLICATION_MONTHS
from paper_assets.defs.sensors import novelty_sensor
from paper_assets.engine import novelty as engine
from paper_assets.engine.home import ProjectHome
from paper_assets.engine.paper_index import (
    IndexParams,
    PaperIndex,
    current_index,
    month_start_day,
    write_index,
)
from paper_assets.settings import Settings

from .conftest import make_source

QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


def test_metrics_are_the_authors_formulas():
    cosines = np.array([[0.9, 0.5, 0.1]])
    got = engine.metrics_from_cosines(cosines, np.array([3]), k=3)
    assert got["novelty_mean"][0] == pytest.approx(0.5)
    assert got["novelty_max"][0] == pytest.approx(0.1)  # 1 - the largest cosine
    assert got["novelty_min"][0] == pytest.approx(0.9)
    assert got["novelty_median"][0] == pytest.approx(0.5)
    assert got["novelty_harmonic"][0] == pytest.approx(3 / (1 / 0.1 + 1 / 0.5 + 1 / 0.9))
    # Fewer neighbours than K: the missing ones count as cosine 0 (what FAISS's -1 results give in the loop).
    few = engine.metrics_from_cosines(np.array([[0.8, 0.6, 0.0, 0.0]]), np.array([2]), k=4)
    assert few["novelty_mean"][0] == pytest.approx(1 - 1.4 / 4)
    assert few["novelty_min"][0] == pytest.approx(1.0) and few["novelty_max"][0] == pytest.approx(0.2)
    assert few["novelty_median"][0] == pytest.approx(1 - 0.3)
    assert few["novelty_harmonic"][0] == pytest.approx(4 / (5 + 2.5 + 1 + 1))
    # No prior paper at all: every metric is 1; an exact duplicate: the harmonic form is bounded by the 1e-6 floor.
    none = engine.metrics_from_cosines(np.zeros((1, 5)), np.array([0]), k=5)
    assert all(none[name][0] == pytest.approx(1.0) for name in engine.METRICS)
    same = engine.metrics_from_cosines(np.ones((1, 2)), np.array([2]), k=2)
    assert same["novelty_mean"][0] == pytest.approx(0.0) and same["novelty_harmonic"][0] == pytest.approx(1e-6)
    # Cosines outside [0, 1] are clipped, as in the authors' notebook.
    clipped = engine.metrics_from_cosines(np.array([[1.0000002, -0.3]]), np.array([2]), k=2)
    assert clipped["novelty_max"][0] == 0.0 and clipped["novelty_min"][0] == 1.0


def _index(tmp_path, papers=1500, months=6, dim=32, graph="never", seed=0):
    ids, days, vectors = synthetic_corpus(papers, months, dim=dim, topics=30, seed=seed)
    manifest = write_index(tmp_path, ids, days, vectors, "fp", "test", IndexParams(graph=graph))
    return ids, days, vectors, PaperIndex(tmp_path / manifest.build)


def _as_dict(result: engine.MonthNovelty) -> dict[int, np.ndarray]:
    table = np.stack([result.table.column(m).to_numpy() for m in engine.METRICS], axis=1)
    return dict(zip(result.table.column("corpus_id").to_pylist(), table, strict=True))


def test_a_month_computed_alone_equals_the_month_by_month_loop(tmp_path):
    ids, days, vectors, index = _index(tmp_path)
    loop, _ = authors_loop(ids, days, vectors, k=100, exact=True)
    months = sorted(index.manifest.months)
    assert len(months) == 6
    params = engine.NoveltyParams(search="exact")
    for month in reversed(months):  # any order: the prior papers are defined by dates
        result = engine.compute_month(index, month, params)
        assert result.papers == index.manifest.months[month][1] - index.manifest.months[month][0]
        for corpusid, values in _as_dict(result).items():
            np.testing.assert_allclose(values, loop[corpusid], atol=2e-5)
        checks = engine.check_month(result, index, params)
        assert all(c.passed for c in checks), checks
    first = engine.compute_month(index, months[0], params)
    assert first.prior_papers == 0 and first.recall is None
    assert (first.table.column("neighbors").to_numpy() == 0).all()
    assert (first.table.column("novelty_mean").to_numpy() == 1.0).all()


def test_hnsw_search_with_a_date_filter_agrees_with_exact(tmp_path):
    ids, days, vectors, index = _index(tmp_path, papers=4000, months=4, dim=48, graph="always")
    exact, _ = authors_loop(ids, days, vectors, k=100, exact=True)
    params = engine.NoveltyParams(search="hnsw", recall_sample=200)
    errors = []
    for month in sorted(index.manifest.months)[1:]:
        result = engine.compute_month(index, month, params)
        assert result.search == "hnsw" and result.recall >= 0.95, (month, result.recall)
        # Only papers published before the month: every neighbour position lies before the month's first paper.
        got = _as_dict(result)
        errors += [abs(values[0] - exact[corpusid][0]) for corpusid, values in got.items()]
    assert np.mean(np.array(errors) <= 0.01) >= 0.99


def test_prior_papers_are_defined_by_dates(tmp_path):
    day = month_start_day("2024-03")
    ids = np.array([10, 11, 12, 13, 14, 15])
    # 14: undated; 15: dated after the build's "today" (a data error): indexed as undated and counted.
    days = np.array([day - 1, day, day + 5, day - 70, np.iinfo(np.int32).max, month_start_day("2099-01")],
                    dtype=np.int32)
    vectors = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    manifest = write_index(tmp_path, ids, days, vectors, "fp", "test", IndexParams(graph="never"),
                           latest_day=day + 30)
    index = PaperIndex(tmp_path / manifest.build)
    assert manifest.dated == 4 and manifest.month_range() == ["2023-12", "2024-01", "2024-02", "2024-03"]
    assert manifest.skipped["future_publication_date"] == 1 and manifest.papers == 6
    result = engine.compute_month(index, "2024-03", engine.NoveltyParams(k=10, search="exact"))
    # The last day of February counts as prior, papers of March and the undated one never do.
    assert sorted(result.table.column("corpus_id").to_pylist()) == [11, 12]
    assert result.prior_papers == 2 and set(result.table.column("neighbors").to_pylist()) == {2}
    empty = engine.compute_month(index, "2024-01", engine.NoveltyParams(k=10, search="exact"))  # no paper
    assert empty.papers == 0 and empty.prior_papers == 1
    assert all(c.passed for c in engine.check_month(empty, index, engine.NoveltyParams(k=10)))


def test_a_broken_graph_fails_the_recall_check(tmp_path):
    _, _, vectors, index = _index(tmp_path, papers=3000, months=3, dim=32, graph="always")
    # A graph over other vectors than the index's (e.g. a stale or corrupted file): search returns wrong papers.
    broken = faiss.IndexHNSWFlat(vectors.shape[1], 32)
    broken.add(np.random.default_rng(9).permutation(np.asarray(index.vectors)))
    faiss.write_index(broken, str(index.folder / "hnsw.faiss"))
    index = PaperIndex(index.folder)
    params = engine.NoveltyParams(search="hnsw")
    month = sorted(index.manifest.months)[-1]
    result = engine.compute_month(index, month, params)
    outcomes = {c.name: c for c in engine.check_month(result, index, params)}
    assert not outcomes["recall_at_k"].passed and outcomes["recall_at_k"].metadata["recall"] < 0.5
    assert outcomes["metrics_in_unit_interval"].passed and outcomes["one_row_per_paper"].passed


@pytest.fixture()
def novelty_project(tmp_path, home, tiny_model, generated_papers):
    base, adapter = tiny_model
    src = make_source(tmp_path / "source.duckdb", generated_papers[:400])
    settings = Settings(home=str(home), source=str(src), base_model=base, adapter=adapter, chunk_rows=64,
                        novelty_k=20)
    return settings, src


def spans(request) -> tuple[str, str]:
    """The first and last partition a run request asks for."""
    if request.partition_key:
        return request.partition_key, request.partition_key
    return request.partition_key_range.start, request.partition_key_range.end


def _run(assets, defs, instance, **kwargs):
    result = materialize(assets, resources=defs.resources, instance=instance, run_config=QUIET, **kwargs)
    assert result.success
    return result


def _embed_all(defs, instance):
    _run([source.s2_source], defs, instance)
    for key in sorted(instance.get_dynamic_partitions(CORPUSID_RANGES)):
        _run([embeddings.papers, embeddings.paper_embeddings], defs, instance, partition_key=key)


def test_novelty_assets_checks_sensor_and_commands(novelty_project, generated_papers, tmp_path, capsys):
    settings, src = novelty_project
    defs = build_definitions(settings)
    layout = ProjectHome(settings.home)
    with instance_for_test() as instance:
        _embed_all(defs, instance)
        sensor_resources = {k: defs.resources[k] for k in ("home", "novelty_config")}
        tick = novelty_sensor(build_sensor_context(instance=instance, resources=sensor_resources))
        assert [r.asset_selection for r in tick.run_requests] == [[AssetKey("paper_index")]]

        meta = _run([novelty.paper_index], defs, instance).asset_materializations_for_node("paper_index")[0].metadata
        months = instance.get_dynamic_partitions(PUBLICATION_MONTHS)
        assert meta["dagster/row_count"].value == 400 and meta["months"].value == len(months) == 24
        assert months[0] == "2023-01" and months[-1] == "2024-12"

        # A late month alone, before any other: equals the exact month-by-month loop over the same vectors.
        late = months[-3]
        result = _run([novelty.paper_novelty], defs, instance, partition_key=late)
        checks = result.get_asset_check_evaluations()
        assert {c.check_name for c in checks} == set(novelty.NOVELTY_CHECKS) and all(c.passed for c in checks)
        month_meta = result.asset_materializations_for_node("paper_novelty")[0].metadata
        assert month_meta["prior_papers"].value > 300 and "novelty_mean_histogram" in month_meta
        index = current_index(layout.index_dir)
        loop, _ = authors_loop(index.ids[: index.manifest.dated], index.days[: index.manifest.dated],
                               np.asarray(index.vectors[: index.manifest.dated]), k=20, exact=True)
        table = pq.read_table(layout.novelty_file(late))
        assert table.num_rows == month_meta["dagster/row_count"].value > 0
        for row in table.to_pylist():
            assert row["novelty_mean"] == pytest.approx(loop[row["corpus_id"]][0], abs=2e-5)

        # The sensor now asks for exactly the other months: one run per range of neighbouring months.
        tick = novelty_sensor(build_sensor_context(instance=instance, resources=sensor_resources))
        assert [spans(r) for r in tick.run_requests] == [(months[0], months[-4]), (months[-2], months[-1])]
        for request in tick.run_requests:
            ranged = _run([novelty.paper_novelty], defs, instance, tags=request.tags)
            first, last = spans(request)
            assert [m.partition for m in ranged.asset_materializations_for_node("paper_novelty")] == \
                months[months.index(first):months.index(last) + 1]  # one run, one materialisation per month
        tick = novelty_sensor(build_sensor_context(instance=instance, resources=sensor_resources))
        assert not getattr(tick, "run_requests", None)
        # Each month of a ranged run has its own materialisation, metadata and check results.
        records = instance.fetch_materializations(AssetKey("paper_novelty"), limit=100).records
        assert sorted(r.partition_key for r in records) == sorted(months)
        rows = {r.partition_key: r.asset_materialization.metadata["dagster/row_count"].value for r in records}
        paths = {r.partition_key: r.asset_materialization.metadata["path"].value for r in records}
        assert sum(rows.values()) == 400 and all(paths[m].endswith(f"novelty-{m}.parquet") for m in months)
        for name in novelty.NOVELTY_CHECKS:
            history = instance.event_log_storage.get_asset_check_execution_history(
                AssetCheckKey(AssetKey("paper_novelty"), name), limit=100)
            # A ranged run's evaluations carry their month; a one-month run's name it in their metadata.
            per_month = {h.evaluation.partition or h.evaluation.metadata["partition"].value: h.evaluation.passed
                         for h in history if "partition_count" not in h.evaluation.metadata}
            assert per_month == dict.fromkeys(months, True), name
        with duckdb.connect(str(layout.warehouse), read_only=True) as conn:
            assert conn.execute("SELECT count(*), count(DISTINCT corpus_id) FROM paper_novelty").fetchone() == \
                (400, 400)

        _run([novelty.hub_novelty], defs, instance)
        assert len(list((layout.hub_folder / "novelty").glob("novelty-*.parquet"))) == 24
        assert "novelty_harmonic" in (layout.hub_folder / "README.md").read_text()

        # Commands on this home.
        corpusid = table.column("corpus_id")[0].as_py()
        assert main(["similar", str(corpusid), "-k", "5", "--json"]) == 0
        answer = json.loads(capsys.readouterr().out)
        assert len(answer["neighbors"]) == 5 and corpusid not in [n["corpusid"] for n in answer["neighbors"]]
        scores = [n["score"] for n in answer["neighbors"]]
        assert scores == sorted(scores, reverse=True) and all(n["title"] for n in answer["neighbors"])
        assert main(["similar", str(corpusid), "-k", "5", "--before", "2023-03-01", "--json"]) == 0
        early = json.loads(capsys.readouterr().out)["neighbors"]
        assert early and all(n["publication_date"] < "2023-03-01" for n in early)
        assert main(["novelty", str(corpusid), "--json"]) == 0
        record = json.loads(capsys.readouterr().out)
        assert record["month"] == late and record["novelty_mean"] == pytest.approx(
            table.column("novelty_mean")[0].as_py(), abs=1e-6)
        assert main(["similar", "7"]) == 2 and "not in paper_index" in capsys.readouterr().err
        assert main(["novelty", "7"]) == 2 and "not in paper_index" in capsys.readouterr().err

        # A changed paper in month M: the rebuilt index makes M and the later months stale, not the earlier ones.
        papers = [dict(p) for p in generated_papers[:400]]
        target = next(p for p in papers if p["publication_date"].strftime("%Y-%m") == "2024-06")
        target["abstract"] = (target["abstract"] or "") + " A new sentence changes this paper's vector."
        changed_src = make_source(tmp_path / "source2.duckdb", papers)
        settings2 = Settings(**{**vars(settings), "source": str(changed_src)})
        defs2 = build_definitions(settings2)
        _embed_all(defs2, instance)
        tick = novelty_sensor(build_sensor_context(instance=instance, resources=sensor_resources))
        assert [r.asset_selection for r in tick.run_requests] == [[AssetKey("paper_index")]]
        _run([novelty.paper_index], defs2, instance)
        tick = novelty_sensor(build_sensor_context(instance=instance, resources=sensor_resources))
        assert [spans(r) for r in tick.run_requests] == [("2024-06", "2024-12")]


def test_generated_papers_have_dates_over_24_months(generated_papers):
    dates = [p["publication_date"] for p in generated_papers]
    assert min(dates) >= datetime.date(2023, 1, 1) and max(dates) <= datetime.date(2024, 12, 31)
    assert len({d.strftime("%Y-%m") for d in dates}) == 24


def test_the_stand_in_model_has_trained_weights_and_an_active_adapter(tmp_path):
    from paper_assets.benchkit.retrieval import ndcg_at_10
    from paper_assets.demo_kit.minilm_model import build_minilm_model
    from paper_assets.engine.encoder import Encoder
    from paper_assets.engine.model import ModelConfig, load_model

    base, adapter = build_minilm_model(tmp_path / "model")
    loaded = load_model(ModelConfig(base_model=base, adapter=adapter, precision="fp32", device="cpu"))
    encoder = Encoder(loaded)
    texts = ["Graph neural networks [SEP] Message passing on graphs for node classification.",
             "Node classification with graph convolutions [SEP] We learn node embeddings over a citation graph.",
             "Coral reef decline [SEP] Ocean warming bleaches corals across the Pacific."]
    vectors = encoder.encode(texts)
    assert vectors.shape == (3, 384)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert unit[0] @ unit[1] > unit[0] @ unit[2] + 0.05  # trained weights: related papers are closer
    loaded.model.set_active_adapters(None)
    try:
        without = encoder.encode(texts)
    finally:
        loaded.model.set_active_adapters("proximity")
    assert not np.allclose(vectors, without, atol=1e-4)  # the adapter is on the path
    assert ndcg_at_10([1, 0], [1, 0]) == 1.0
    assert ndcg_at_10([0, 1], [1, 0]) == pytest.approx(1 / np.log2(3))


def test_the_index_refuses_embeddings_of_two_models(tmp_path):
    from paper_assets.engine import gate
    from paper_assets.engine.fs import atomic_parquet_writer, sha256_file
    from paper_assets.engine.paper_index import IndexError_, build_index
    from paper_assets.engine.ranges import parse_range
    from paper_assets.engine.schemas import embeddings_batch, embeddings_schema

    layout = ProjectHome(tmp_path / "home")
    for key, fingerprint in (("000000000-000999999", "model-a"), ("001000000-001999999", "model-b")):
        rng = parse_range(key)
        schema = embeddings_schema(8, {"model": {"fingerprint": fingerprint}})
        path = layout.embeddings_file(rng)
        with atomic_parquet_writer(path, schema) as writer:
            writer.write_batch(embeddings_batch(np.array([rng.lo + 1]), np.ones((1, 8), np.float32),
                                                ["x" * 64], schema))
        gate.write_gate(layout, rng, gate.Gate(file_sha256=sha256_file(path), rows=1, passed=True, failed=[],
                                               model={"fingerprint": fingerprint}))
    with pytest.raises(IndexError_, match="2 model fingerprints.*model-a.*model-b"):
        build_index(layout, snapshot=None)


def test_an_identical_rebuild_reuses_the_build_and_records_its_new_inputs(tmp_path):
    ids, days, vectors = synthetic_corpus(300, 3, dim=16, topics=5, seed=1)
    first = write_index(tmp_path, ids, days, vectors, "fp", "r1", IndexParams(graph="never"), inputs={"a": "1"})
    second = write_index(tmp_path, ids, days, vectors, "fp", "r2", IndexParams(graph="never"), inputs={"a": "2"})
    assert second.build == first.build and second.inputs == {"a": "2"} and second.source_release == "r2"
    assert PaperIndex(tmp_path / first.build).manifest.inputs == {"a": "2"}


def test_auto_search_takes_the_device_where_it_pays():
    from paper_assets.engine.novelty import choose_search
    from paper_assets.engine.novelty_params import NoveltyParams

    auto = NoveltyParams()
    assert choose_search(auto, 10, 10**9, has_graph=True, device_pays=True) == "device"
    assert choose_search(auto, 10, 100, has_graph=True, device_pays=False) == "exact"
    assert choose_search(auto, 10**5, 10**6, has_graph=True, device_pays=False) == "hnsw"
    assert choose_search(NoveltyParams(search="device"), 1, 1, has_graph=False, device_pays=False) == "device"
    assert choose_search(NoveltyParams(search="exact"), 1, 1, has_graph=True, device_pays=True) == "exact"


def test_recall_counts_a_paper_tied_with_the_last_true_neighbour():
    from paper_assets.engine.novelty import recall_at_k
    from paper_assets.engine.paper_index import Neighbours

    truth = Neighbours(np.array([[0, 1]]), np.array([[0.9, 0.8]], np.float32))
    tied = Neighbours(np.array([[0, 2]]), np.array([[0.9, 0.8 - 1e-7]], np.float32))
    lower = Neighbours(np.array([[0, 3]]), np.array([[0.9, 0.79]], np.float32))
    assert recall_at_k(tied, truth) == 1.0 and recall_at_k(lower, truth) == 0.5


def test_auto_builds_the_graph_only_where_a_month_would_search_it(tmp_path, monkeypatch):
    """``graph=auto`` without the device search: the graph is built from ``graph_min_papers`` papers on, and only
    where some month has more query x prior pairs than ``exact_max_pairs`` (else every month searches exactly and
    the build would be paid for nothing)."""
    from paper_assets.engine import device_knn

    monkeypatch.setattr(device_knn, "device_search_pays", lambda: False)
    ids, days, vectors = synthetic_corpus(400, 4, dim=16, topics=5, seed=2)
    manifest = write_index(tmp_path / "a", ids, days, vectors, "fp", "r", IndexParams(graph_min_papers=100))
    largest = max((end - start) * start for start, end, _ in manifest.months.values())
    assert 0 < largest and not PaperIndex(tmp_path / "a" / manifest.build).has_graph
    below = IndexParams(graph_min_papers=100, exact_max_pairs=largest - 1)
    manifest = write_index(tmp_path / "b", ids, days, vectors, "fp", "r", below)
    assert PaperIndex(tmp_path / "b" / manifest.build).has_graph
    few_papers = IndexParams(graph_min_papers=401, exact_max_pairs=largest - 1)
    assert not few_papers.builds_graph(400, largest) and below.builds_graph(400, largest)
    assert not below.builds_graph(400, largest, device_search=True)
