"""`paper-assets bench --novelty N --novelty-every S`: the default novelty search at the full size, timed on every
S-th month, to project the whole backfill where running it in full would take hours.

A month's cost grows with the prior papers it searches, which grow steadily month by month, so the months timed
are spread evenly (the middle one of every S) and the projection is their sum times (months / months timed). The
index build is timed in full. Each timed month runs as ``paper_novelty`` runs it (``novelty.compute_month``: the
search, the metrics, the ``recall_at_k`` check against FAISS's fp32 exact search), in date order, on one index,
so the rounded prior blocks it keeps for the run are kept here too.
"""

from __future__ import annotations

import datetime
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..engine import novelty
from ..engine.paper_index import IndexParams, PaperIndex, write_index
from .measure import PeakRSS
from .novelty_bench import USER_CORPUS, synthetic_corpus


def novelty_report(papers: int, months: int, every: int) -> tuple[str, dict]:
    """The bench's novelty section: with ``every`` > 1 the sampled projection, else the full comparison."""
    if every > 1:
        return "novelty_sampled", run_sampled(papers, months, every)
    from .novelty_bench import run

    return "novelty", run(papers, months)


def run_sampled(papers: int, months: int, every: int, dim: int = 768, seed: int = 0, log=print) -> dict:
    if every < 2:
        raise ValueError("--novelty-every takes 2 or more (1 is the full bench)")
    first_month = str(np.datetime64(datetime.date.today(), "M") - months)  # the last month ends before today
    ids, days, vectors = synthetic_corpus(papers, months, dim=dim, seed=seed, first_month=first_month)
    log(f"novelty, every {every}th month: {papers:,} synthetic papers over {months} months, {dim}-d")
    params = novelty.NoveltyParams()
    with tempfile.TemporaryDirectory() as tmp, PeakRSS() as rss:
        before = rss.peak
        started = time.perf_counter()
        manifest = write_index(Path(tmp), ids, days, vectors, "synthetic", "synthetic", IndexParams())
        index_seconds = time.perf_counter() - started
        del ids, days, vectors
        index = PaperIndex(Path(tmp) / manifest.build)
        every_month = sorted(index.manifest.months)
        timed = every_month[every // 2::every]
        rows = []
        for month in timed:
            result = novelty.compute_month(index, month, params)
            rows.append({"month": month, "papers": result.papers, "prior_papers": result.prior_papers,
                         "search": result.search, "seconds": round(result.seconds, 2), "recall": result.recall})
            log(f"  {month}: {result.papers:,} papers against {result.prior_papers:,} earlier, {result.search}, "
                f"{result.seconds:.1f} s, recall@{params.k} {result.recall}")
        stats = index.device_search_stats
    timed_seconds = sum(row["seconds"] for row in rows)
    months_seconds = timed_seconds * len(every_month) / len(timed)
    recalls = [row["recall"] for row in rows if row["recall"] is not None]
    report = {
        "papers": papers, "months": len(every_month), "every": every, "months_timed": len(timed), "dim": dim,
        "index_build_seconds": round(index_seconds, 2), "graph": index.has_graph,
        "timed_months_seconds": round(timed_seconds, 2),
        "projected_months_seconds": round(months_seconds), "projected_total_seconds": round(index_seconds
                                                                                               + months_seconds),
        "recall_at_100_min": min(recalls) if recalls else None,
        "vectors_mb": round(papers * dim * 4 / 2**20), "rss_before_mb": round(before / 2**20),
        "peak_rss_mb": round(rss.peak / 2**20), "timed": rows,
    }
    if stats is not None:
        report["device_search"] = {name: round(value, 2) if isinstance(value, float) else value
                                   for name, value in asdict(stats).items()}
    if papers != USER_CORPUS:
        report["projected_seconds_at_2_36m_papers"] = round(report["projected_total_seconds"]
                                                            * (USER_CORPUS / papers) ** 2)
    log(f"  index {index_seconds:.1f} s; {len(timed)} of {len(every_month)} months {timed_seconds:.1f} s; every "
        f"month projected {months_seconds:.0f} s; total {report['projected_total_seconds']} s; recall min "
        f"{report['recall_at_100_min']}; peak RSS {report['peak_rss_mb']} MB (before {report['rss_before_mb']})")
    if "device_search" in report:
        log(f"    device search (timed months): {report['device_search']}")
    return report
