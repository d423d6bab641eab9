"""The benchmark tools' own parts: the whole-corpus source and the run-phase accounting."""

import datetime
import time

import duckdb
import pytest
from dagster import asset, instance_for_test, materialize

from paper_assets.benchkit.corpus_bench import ID_SPAN, corpus_source
from paper_assets.benchkit.run_phases import run_phases


def test_the_corpus_source_is_shaped_like_the_users(tmp_path):
    path = corpus_source(tmp_path / "corpus.duckdb", 6000)
    with duckdb.connect(str(path), read_only=True) as conn:
        rows, distinct_ids, low, high, ranges, first_day, last_day = conn.execute(
            "SELECT count(*), count(DISTINCT corpusid), min(corpusid), max(corpusid), "
            "count(DISTINCT corpusid // 1000000), min(publication_date), max(publication_date) "
            "FROM papers_with_abstracts").fetchone()
        texts, median_abstract, median_title = conn.execute(
            "SELECT count(DISTINCT title || abstract), median(length(abstract)), median(length(title)) "
            "FROM papers_with_abstracts").fetchone()
    assert rows == distinct_ids == 6000 and texts > 0.99 * rows  # (the sample repeats a few titles)
    assert 0 <= low and high < ID_SPAN and ranges == 280  # ~280 one-million-id ranges whatever the size
    assert datetime.date(2000, 1, 1) <= first_day < datetime.date(2000, 3, 1)
    assert datetime.date(2025, 10, 1) < last_day <= datetime.date(2025, 12, 31)
    assert 400 < median_abstract < 3000 and 30 < median_title < 200  # real papers' lengths


def test_run_phases_accounts_for_each_step_of_a_run():
    @asset
    def first():
        time.sleep(0.3)

    @asset(deps=[first])
    def second():
        time.sleep(0.1)

    with instance_for_test() as instance:
        launched = time.time()
        result = materialize([first, second], instance=instance)
        phases = run_phases(instance, result.run_id, launched, time.time())
    assert set(phases["steps"]) == {"first", "second"}
    assert phases["steps"]["first"]["body_s"] >= 0.3 and phases["steps"]["second"]["body_s"] >= 0.1
    assert phases["materializations"] == 2
    in_steps = sum(step["span_s"] for step in phases["steps"].values())
    assert phases["run_s"] >= in_steps and phases["before_run_start_s"] >= 0 and phases["after_run_end_s"] >= 0


def test_the_novelty_bench_runs_each_distinct_search_once_and_reports_the_reference(monkeypatch):
    from paper_assets.benchkit import novelty_bench
    from paper_assets.engine import device_knn

    monkeypatch.setattr(novelty_bench, "REFERENCE_GRAPH_MIN_PAPERS", 1000)
    monkeypatch.setattr(novelty_bench, "REFERENCE_EXACT_MAX_PAIRS", 10_000)
    monkeypatch.setattr(device_knn, "device_search_pays", lambda: False)
    report = novelty_bench.run(1500, 4, dim=16, log=lambda line: None)
    assert report["default"]["same_as"] == report["faiss_exact"]["same_as"] == "auto_without_device"
    assert set(report["auto_without_device"]["months_by_search"]) == {"exact"}
    reference = report["graph_from_200k_papers"]
    assert reference["graph"] and "hnsw" in reference["months_by_search"]
    assert report["speedup_reference"] == "graph_from_200k_papers" and reference["speedup_vs_reference"] == 1
    assert report["graph"]["graph"] and report["default"]["vs_exact"]["every_metric_max_abs_error"] < 1e-5


def test_the_novelty_bench_reports_where_the_device_search_spends_its_time(monkeypatch):
    import torch

    from paper_assets.benchkit import novelty_bench
    from paper_assets.engine import device_knn

    monkeypatch.setattr(device_knn, "device_search_pays", lambda: True)
    monkeypatch.setattr(device_knn, "knn_device", lambda: (torch.device("cpu"), True))
    report = novelty_bench.run(1500, 4, dim=16, log=lambda line: None)
    default = report["default"]
    assert set(default["months_by_search"]) == {"device"} and default["recall_at_100_min"] == 1.0
    breakdown = default["device_search"]
    assert breakdown["certified"] + breakdown["searched_again_in_fp32"] == breakdown["queries"] > 0
    parts = sum(breakdown[f"seconds_{what}"] for what in ("rounding", "products", "selection", "rescoring",
                                                           "fp32_again"))
    assert 0 < parts <= default["months_seconds"]
    assert "device_search" not in report["auto_without_device"]


def test_the_sampled_novelty_bench_times_every_sth_month_and_projects_the_rest(monkeypatch):
    """``--novelty-every S``: the middle month of every S, in date order, each through ``compute_month``; every
    month projected as their sum x months / months timed; the device search's breakdown where it ran."""
    import torch

    from paper_assets.benchkit.novelty_sampled import run_sampled
    from paper_assets.engine import device_knn

    monkeypatch.setattr(device_knn, "device_search_pays", lambda: True)
    monkeypatch.setattr(device_knn, "knn_device", lambda: (torch.device("cpu"), True))
    report = run_sampled(3000, 12, 4, dim=16, log=lambda line: None)
    assert report["months"] == 12 and report["months_timed"] == 3
    months = [row["month"] for row in report["timed"]]
    assert months == sorted(months) and all(row["search"] == "device" for row in report["timed"])
    priors = [row["prior_papers"] for row in report["timed"]]
    assert 0 < priors[0] < priors[1] < priors[2] < 3000 and report["recall_at_100_min"] == 1.0
    assert report["projected_months_seconds"] == round(report["timed_months_seconds"] * 12 / 3)
    assert report["device_search"]["queries"] == sum(row["papers"] for row in report["timed"])
    with pytest.raises(ValueError, match="2 or more"):
        run_sampled(100, 2, 1, dim=16, log=lambda line: None)


def test_wait_until_returns_the_first_ready_value_and_names_what_never_came(tmp_path):
    import subprocess
    import sys

    from paper_assets.processes import wait_until

    answers = iter([None, 0, "up"])
    assert wait_until("the service", lambda: next(answers), 5, poll=0.01) == "up"
    log = tmp_path / "service.log"
    log.write_text("address already in use\n")
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    started = time.monotonic()
    ended_message = r"(?s)the webserver did not happen: its process ended \(exit 0\).*address already in use"
    with pytest.raises(RuntimeError, match=ended_message):
        wait_until("the webserver", lambda: False, 60, ended, log, poll=0.01)
    assert time.monotonic() - started < 5  # the ended process stops the wait, not the timeout
    with pytest.raises(RuntimeError, match="the worker did not happen: not within 0 s"):
        wait_until("the worker", lambda: False, 0.05, poll=0.01)
