"""``paper-assets bench --corpus N``: the whole job on a synthetic source shaped like the user's, through the real
path, at N/10 and at N papers.

The source: N papers with ids spread over 0..280M (~280 one-million-id ranges whatever N), publication dates
spread over 2000-01-01..2025-12-31, and real text: each paper pairs the title of one sample paper with the
abstract of another (the SciRepEval sample shipped with the demo), so title and abstract lengths follow real
papers'. The model: the tiny stand-in (BERT + seq_bn adapter, 2 layers x 64). The stages, each in a process of its
own (its seconds exclude the process's imports; its peak RSS includes them): ``s2_source`` (the snapshot), a tick
of the release sensor, the planner, ``update``'s embedding (papers + paper_embeddings, ranged runs as
``paper-assets update`` runs them), ``hub_shards`` into the home's local Hub folder, ``paper_index``, every
``paper_novelty`` month, then the README's catalog queries (DuckDB over the catalog, ``similar``, ``novelty``).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import duckdb
import pyarrow as pa

from ..demo_kit import sample_source
from ..demo_kit.tiny_model import TINY, build_model
from ..settings import Settings, variable
from .measure import PeakRSS, in_a_fresh_process

ID_SPAN = 280_000_000
RANGE_WIDTH = 1_000_000
FIRST_DAY, DAYS = "2000-01-01", 9_496  # through 2025-12-31
SAMPLE_PAPERS = Path(__file__).resolve().parents[1] / "demo_kit" / "data" / "scirepeval_sample_papers.jsonl.gz"
STAGES = ("s2_source", "sensor_tick", "planner", "update_embedding", "hub_shards", "paper_index", "paper_novelty",
          "catalog_queries")


def corpus_source(path: Path, papers: int, pool_file: Path = SAMPLE_PAPERS) -> Path:
    """A source of ``papers`` rows in the notebook's schema (see the module docstring)."""
    pool = [p for p in sample_source.read_jsonl_papers(pool_file) if p["title"] and p["abstract"]]
    stride = ID_SPAN // papers
    if stride < 1:
        raise ValueError(f"at most {ID_SPAN:,} papers")
    tmp = path.with_suffix(".partial")
    tmp.unlink(missing_ok=True)
    with duckdb.connect(str(tmp)) as conn:
        conn.execute(sample_source.SOURCE_DDL.format(id_type="BIGINT"))
        conn.register("pool", pa.table({"idx": list(range(len(pool))), "title": [p["title"] for p in pool],
                                        "abstract": [p["abstract"] for p in pool]}))
        n = len(pool)
        conn.execute(f"""INSERT INTO papers_with_abstracts
            SELECT i * {stride} + (hash(i) % {stride})::BIGINT, t.title, a.abstract,
                   DATE '{FIRST_DAY}' + (hash(i * 7 + 1) % {DAYS})::INTEGER, (hash(i) % 200)::INTEGER, NULL
            FROM range({papers}) r(i)
            JOIN pool t ON t.idx = i % {n}
            JOIN pool a ON a.idx = (i // {n} + i * 31) % {n}
            ORDER BY 1""")
        conn.execute("CHECKPOINT")
    tmp.rename(path)
    return path


def _stage(name: str, home: str) -> dict:
    """One stage in this (fresh) process: its seconds, peak RSS and what it reports."""
    os.environ[variable("home")] = home
    for unset in ("pg_url", "celery_broker", "celery_backend", "partitions_per_run"):
        os.environ.pop(variable(unset), None)
    from ..cli.common import instance
    from ..definitions import build_definitions
    from ..settings import load_settings

    settings = load_settings()
    defs, dagster = build_definitions(settings), instance(settings)
    run = _STAGE_BODIES[name]
    with PeakRSS() as rss:
        baseline = rss.peak
        started = time.perf_counter()
        report = run(defs, dagster) or {}
        seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "peak_rss_mb": round(rss.peak / 2**20, 1),
            "rss_before_mb": round(baseline / 2**20, 1), **report}


def _s2_source(defs, dagster) -> dict:
    from dagster import materialize

    from ..defs import source
    from ..defs.release import QUIET

    materialize([source.s2_source], resources=defs.resources, instance=dagster, run_config=QUIET)
    return {}


def _sensor_tick(defs, dagster) -> dict:
    from dagster import build_sensor_context

    from ..defs.sensors import s2_release_ranges_sensor

    resources = {name: defs.resources[name] for name in ("home", "publisher")}
    result = s2_release_ranges_sensor(build_sensor_context(instance=dagster, resources=resources))
    return {"run_requests": len(getattr(result, "run_requests", None) or [])}


def _planner(defs, dagster) -> dict:
    from ..defs.partitions import CORPUSID_RANGES
    from ..engine.planner import plan_release
    from ..engine.snapshot import current_snapshot

    layout = defs.resources["home"].layout()
    plan = plan_release(layout, current_snapshot(layout.source_dir),
                        set(dagster.get_dynamic_partitions(CORPUSID_RANGES)), defs.resources["publisher"].description())
    return {"ranges_planned": len(plan.ranges)}


def _update_embedding(defs, dagster) -> dict:
    from ..defs.release import embed_release

    embedding = []
    summary, ranges = embed_release(defs, dagster, on_partition=lambda key, meta: embedding.append(meta["seconds"]))
    return {"ranges": len(ranges), "rows_embedded": summary["rows_embedded"],
            "embedding_seconds": round(sum(embedding), 3)}


def _hub_shards(defs, dagster) -> dict:
    from ..defs.release import publish_shards

    lines: list[str] = []
    publish_shards(defs.resources, dagster, {}, lines.append)
    commits = defs.resources["home"].layout().hub_folder / ".commits.jsonl"
    return {"published": " ".join(lines).strip(),
            "commits": len(commits.read_text().splitlines()) if commits.exists() else 0}


def _paper_index(defs, dagster) -> dict:
    from dagster import materialize

    from ..defs import novelty
    from ..defs.release import QUIET

    result = materialize([novelty.paper_index], resources=defs.resources, instance=dagster, run_config=QUIET)
    meta = result.asset_materializations_for_node("paper_index")[0].metadata
    return {name: meta[name].value for name in ("dagster/row_count", "build_seconds") if name in meta}


def _paper_novelty(defs, dagster) -> dict:
    from ..defs.release import refresh_novelty

    seconds: list[float] = []
    months = refresh_novelty(defs.resources, dagster, {}, False, lambda _: None,
                             on_month=lambda month, meta: seconds.append(meta["seconds"]))
    return {"months": months, "search_seconds": round(sum(seconds), 3)}


def _catalog_queries(defs, dagster) -> dict:
    """The README's: cosine neighbours of one paper in DuckDB over the catalog; `similar`; `novelty`."""
    import contextlib
    import io

    from ..cli import main

    layout = defs.resources["home"].layout()
    with duckdb.connect(str(layout.warehouse), read_only=True) as conn:
        (corpusid,) = conn.execute("SELECT corpus_id FROM paper_novelty ORDER BY corpus_id LIMIT 1 OFFSET 100"
                                   ).fetchone()
        timings = {}
        started = time.perf_counter()
        rows = conn.execute("SELECT b.corpusid, array_cosine_similarity(a.embedding, b.embedding) AS sim FROM "
                            "embeddings a, embeddings b WHERE a.corpusid = ? ORDER BY sim DESC LIMIT 10",
                            [corpusid]).fetchall()
        timings["sql_neighbours_seconds"] = round(time.perf_counter() - started, 3)
    if len(rows) != 10:
        raise RuntimeError(f"the catalog query found {len(rows)} neighbours")
    for command in ("similar", "novelty"):
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            if main([command, str(corpusid), "--json"]) != 0:
                raise RuntimeError(f"paper-assets {command} {corpusid} failed")
        timings[f"{command}_seconds"] = round(time.perf_counter() - started, 3)
    return timings


_STAGE_BODIES = {"s2_source": _s2_source, "sensor_tick": _sensor_tick, "planner": _planner,
                 "update_embedding": _update_embedding, "hub_shards": _hub_shards, "paper_index": _paper_index,
                 "paper_novelty": _paper_novelty, "catalog_queries": _catalog_queries}


def run_corpus(papers: int, work: Path, until: str = STAGES[-1]) -> dict:
    """Every stage up to ``until`` at ``papers`` and at a tenth of it; per stage its seconds, peak RSS and growth."""
    stages = STAGES[:STAGES.index(until) + 1]
    work = work / "corpus-bench"
    model = work / "model-tiny"
    if not (model / "adapter" / "adapter_config.json").exists():
        pool = sample_source.read_jsonl_papers(SAMPLE_PAPERS)
        build_model(model, [f"{p['title']} [SEP] {p['abstract']}" for p in pool], shape=TINY)
    result: dict = {"model": "tiny stand-in (BERT + seq_bn adapter, 2 layers x 64)", "id_span": ID_SPAN,
                    "range_width": RANGE_WIDTH, "stages": stages, "runs": {}}
    for size in (max(papers // 10, 1), papers):
        home = work / f"home-{size}"
        shutil.rmtree(home, ignore_errors=True)
        source = work / f"source-{size}.duckdb"
        started = time.perf_counter()
        if not source.exists():
            corpus_source(source, size)
        Settings(home=str(home), source=str(source), base_model=str(model / "base"), adapter=str(model / "adapter"),
                 device="cpu", range_width=RANGE_WIDTH).save()
        run = {"papers": size, "source_seconds": round(time.perf_counter() - started, 2), "stages": {}}
        for name in stages:
            run["stages"][name] = in_a_fresh_process(_stage, name, str(home))
            print(f"  corpus {size:,}: {name} {run['stages'][name]['seconds']:.1f} s, "
                  f"peak {run['stages'][name]['peak_rss_mb']:,.0f} MB", flush=True)
        run.update(_shares(run["stages"]))
        result["runs"][str(size)] = run
    small, large = (result["runs"][key]["stages"] for key in result["runs"])
    result["growth"] = {name: {"seconds": _ratio(large[name]["seconds"], small[name]["seconds"]),
                               "peak_rss": _ratio(large[name]["peak_rss_mb"], small[name]["peak_rss_mb"])}
                        for name in stages}
    return result


def _shares(stages: dict) -> dict:
    total = sum(stage["seconds"] for stage in stages.values())
    engine = stages.get("update_embedding", {}).get("embedding_seconds", 0.0) \
        + stages.get("paper_novelty", {}).get("search_seconds", 0.0)
    return {"total_seconds": round(total, 2), "embedding_and_knn_seconds": round(engine, 2),
            "other_share": round((total - engine) / total, 4) if total else None}


def _ratio(large: float, small: float) -> float | None:
    return round(large / small, 2) if small else None


def print_corpus(result: dict) -> None:
    for size, run in result["runs"].items():
        print(f"whole corpus, {int(size):,} papers: {run['total_seconds']:.1f} s in all, "
              f"{run['other_share']:.1%} outside embedding and the K-NN search")
    for name, growth in result["growth"].items():
        print(f"  {name}: x{growth['seconds']} seconds, x{growth['peak_rss']} peak RSS from N/10 to N")
