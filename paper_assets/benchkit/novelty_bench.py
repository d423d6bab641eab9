"""`paper-assets bench --novelty N`: the novelty backfill of every month against the authors' loop, same vectors.

The authors' loop (re-implemented from their ``compute_metrics`` notebook): papers sorted by publication date, one
calendar month at a time; each month's papers search a FAISS ``IndexHNSWFlat`` (M=32, efConstruction 200,
efSearch 50, L2 on normalised vectors) holding every earlier month, K=100; then the month is added to the index.
With ``exact=True`` the same loop runs on ``IndexFlatL2``: the exact reference both sides are compared against.

Vectors: with ``--novelty-home`` the embeddings of a home; otherwise a synthetic corpus of topic clusters whose
mix drifts month by month (documented in BENCHMARKS.md: neighbour structure like real embeddings, no meaning).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..engine import novelty
from ..engine.paper_index import IndexParams, PaperIndex, month_of, month_start_day, normalise, write_index
from .measure import PeakRSS

USER_CORPUS = 2_356_819
# The graph thresholds the speed targets are stated against: HNSW from 200k papers, above 10^8 pairs a month.
REFERENCE_GRAPH_MIN_PAPERS = 200_000
REFERENCE_EXACT_MAX_PAIRS = 100_000_000


def synthetic_corpus(papers: int, months: int, dim: int = 768, topics: int = 400, seed: int = 0,
                     first_month: str = "2023-01") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ids, date32 days and vectors: each paper is a topic centre plus noise; later months bring new topics."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(topics, dim)).astype(np.float32)
    month_of_paper = np.sort(rng.integers(0, months, size=papers))
    # Topics open over time: month m draws from the first (m+1)/months share of topics (and half stay popular).
    limit = np.minimum(topics, np.maximum(8, ((month_of_paper + 1) * topics) // months))
    topic = (rng.random(papers) * limit).astype(np.int64)
    vectors = np.empty((papers, dim), dtype=np.float32)
    for start in range(0, papers, 1 << 16):  # in pieces (the same draws as one): millions of papers fit in memory
        stop = min(papers, start + (1 << 16))
        noise = rng.normal(scale=0.9, size=(stop - start, dim)).astype(np.float32)
        vectors[start:stop] = centres[topic[start:stop]] + noise
    month_starts = np.array([month_start_day(str(np.datetime64(first_month, "M") + m)) for m in range(months + 1)])
    days = month_starts[month_of_paper] + (rng.random(papers) * (month_starts[month_of_paper + 1]
                                                                  - month_starts[month_of_paper])).astype(np.int64)
    ids = rng.choice(np.arange(10_000_000, 10_000_000 + 40 * papers), size=papers, replace=False)
    return ids.astype(np.int64), days.astype(np.int32), vectors


def authors_loop(ids: np.ndarray, days: np.ndarray, vectors: np.ndarray, k: int = 100, exact: bool = False,
                 m: int = 32, ef_construction: int = 200, ef_search: int = 50) -> tuple[dict[int, np.ndarray], float]:
    """corpusid -> the five metrics (METRICS order), and the seconds the loop took."""
    import faiss

    started = time.perf_counter()
    order = np.lexsort((ids, days))
    ids, days, x = ids[order], days[order], normalise(vectors[order])
    labels = month_of(days)
    if exact:
        index = faiss.IndexFlatL2(x.shape[1])
    else:
        index = faiss.IndexHNSWFlat(x.shape[1], m)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
    results: dict[int, np.ndarray] = {}
    _, starts = np.unique(labels, return_index=True)
    ends = list(starts[1:]) + [len(ids)]
    for start, end in zip(starts, ends, strict=True):
        queries = x[start:end]
        if index.ntotal > 0:
            distances, found = index.search(queries, k)
        else:
            distances = np.full((end - start, k), np.finfo(np.float32).max, dtype=np.float32)
            found = np.full((end - start, k), -1)
        # The authors' cosine from FAISS's squared L2 distance; "no result" entries come out as cosine 0.
        cosines = np.clip(1.0 - distances.astype(np.float64) / 2.0, 0.0, 1.0)
        cosines[found < 0] = 0.0
        metrics = novelty.metrics_from_cosines(cosines, np.full(len(cosines), k), k)
        table = np.stack([metrics[name] for name in novelty.METRICS], axis=1)
        for row, corpusid in enumerate(ids[start:end]):
            results[int(corpusid)] = table[row]
        index.add(queries)
    return results, time.perf_counter() - started


def platform_backfill(index: PaperIndex, params: novelty.NoveltyParams, device_pays: bool | None = None
                      ) -> tuple[dict[int, np.ndarray], dict]:
    """Every month through ``novelty.compute_month`` (what paper_novelty runs per partition)."""
    results: dict[int, np.ndarray] = {}
    recalls, modes, seconds = [], {}, 0.0
    for month in sorted(index.manifest.months):
        month_result = novelty.compute_month(index, month, params, device_pays=device_pays)
        seconds += month_result.seconds
        if month_result.recall is not None:
            recalls.append(month_result.recall)
        modes[month_result.search] = modes.get(month_result.search, 0) + 1
        table = np.stack([month_result.table.column(m).to_numpy() for m in novelty.METRICS], axis=1)
        for row, corpusid in enumerate(month_result.table.column("corpus_id").to_numpy()):
            results[int(corpusid)] = table[row]
    info = {"months_seconds": seconds, "recall_min": min(recalls) if recalls else None,
            "recall_mean": float(np.mean(recalls)) if recalls else None, "months_by_search": modes}
    if index.device_search_stats is not None:  # where the device search's time went
        info["device_search"] = {name: round(value, 2) if isinstance(value, float) else value
                                 for name, value in asdict(index.device_search_stats).items()}
    return results, info


def _agreement(results: dict[int, np.ndarray], exact: dict[int, np.ndarray]) -> dict:
    keys = sorted(exact)
    got = np.stack([results[k] for k in keys])
    want = np.stack([exact[k] for k in keys])
    error = np.abs(got[:, 0] - want[:, 0])
    return {"novelty_mean_max_abs_error": float(error.max()),
            "every_metric_max_abs_error": float(np.abs(got - want).max()),
            "share_within_0_01": float((error <= 0.01).mean()),
            "novelty_mean_p99_abs_error": float(np.quantile(error, 0.99))}


def _platform(ids, days, vectors, index_params: IndexParams, params: novelty.NoveltyParams,
              device_pays: bool | None = None) -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        manifest = write_index(Path(tmp), ids, days, vectors, "synthetic", "synthetic", index_params)
        index_seconds = time.perf_counter() - started
        index = PaperIndex(Path(tmp) / manifest.build)
        results, info = platform_backfill(index, params, device_pays)
        info["graph"] = index.has_graph
    info["index_build_seconds"] = index_seconds
    info["total_seconds"] = index_seconds + info["months_seconds"]
    return results, info


def largest_month_pairs(days: np.ndarray) -> int:
    """The most query x prior pairs of any month (what ``IndexParams.builds_graph`` weighs)."""
    sizes = np.unique(month_of(np.sort(days)), return_counts=True)[1].astype(np.int64)
    return int((sizes * (np.cumsum(sizes) - sizes)).max(initial=0))


def _variants(papers: int, month_pairs: int) -> tuple[dict[str, tuple], dict[str, str]]:
    """The searches to time (name -> index params, novelty params, device_pays), and the names that resolve to the
    same search as another one here (name -> that one), which are reported, not rerun."""
    # default: what `auto` picks here (the device's exact search where it multiplies in bf16, else as below);
    # auto_without_device: `auto` where the device search does not pay (FAISS's exact search while a month's
    # queries x priors <= exact_max_pairs, else the HNSW graph, built from graph_min_papers papers on where a month
    # has more pairs than that);
    # faiss_exact: FAISS's fp32 exact search; graph_from_200k_papers: the graph built from 200k papers and taken
    # above 10^8 pairs a month (the reference the speed targets name); graph: every month through the HNSW graph
    # (up to 100k papers). A variant that resolves to the same search as an earlier one is reported, not rerun.
    from ..engine.device_knn import device_search_pays

    fallback_graph = "always" if IndexParams().builds_graph(papers, month_pairs) else "never"
    variants: dict[str, tuple] = {}
    same_as: dict[str, str] = {}
    if device_search_pays():
        variants["default"] = (IndexParams(), novelty.NoveltyParams(), None)
    else:
        same_as["default"] = "auto_without_device"
    variants["auto_without_device"] = (IndexParams(graph=fallback_graph), novelty.NoveltyParams(), False)
    if fallback_graph == "never":  # no graph: `auto` takes FAISS's exact search for every month
        same_as["faiss_exact"] = "auto_without_device"
    else:
        variants["faiss_exact"] = (IndexParams(graph="never"), novelty.NoveltyParams(search="exact"), False)
    if papers >= REFERENCE_GRAPH_MIN_PAPERS:
        variants["graph_from_200k_papers"] = (IndexParams(graph="always"),
                                              novelty.NoveltyParams(exact_max_pairs=REFERENCE_EXACT_MAX_PAIRS), False)
    if papers <= 100_000:
        variants["graph"] = (IndexParams(graph="always"), novelty.NoveltyParams(search="hnsw"), False)
    return variants, same_as


def run(papers: int, months: int, dim: int = 768, seed: int = 0, log=print) -> dict:
    ids, days, vectors = synthetic_corpus(papers, months, dim=dim, seed=seed)
    log(f"novelty bench: {papers:,} synthetic papers over {months} months, {dim}-d")
    exact, exact_seconds = authors_loop(ids, days, vectors, exact=True)
    log(f"  exact reference loop (IndexFlatL2, month by month): {exact_seconds:.1f} s")
    authors, authors_seconds = authors_loop(ids, days, vectors)
    log(f"  authors' loop (IndexHNSWFlat, month by month): {authors_seconds:.1f} s")
    report = {"papers": papers, "months": months, "dim": dim, "authors_loop_seconds": round(authors_seconds, 2),
              "exact_loop_seconds": round(exact_seconds, 2), "authors_vs_exact": _agreement(authors, exact)}
    variants, same_as = _variants(papers, largest_month_pairs(days))
    for name, (index_params, params, device_pays) in variants.items():
        with PeakRSS() as rss:
            before = rss.peak
            results, info = _platform(ids, days, vectors, index_params, params, device_pays)
        total = info["total_seconds"]
        log(f"  platform [{name}]: paper_index {info['index_build_seconds']:.1f} s (graph: {info['graph']}), every "
            f"paper_novelty month {info['months_seconds']:.1f} s {info['months_by_search']}; total {total:.1f} s = "
            f"{authors_seconds / total:.2f}x the authors' loop; recall@100 min {info['recall_min']}")
        if "device_search" in info:
            log(f"    device search: {info['device_search']}")
        report[name] = {
            "index_build_seconds": round(info["index_build_seconds"], 2), "graph": info["graph"],
            "months_seconds": round(info["months_seconds"], 2), "total_seconds": round(total, 2),
            "speedup_vs_authors": round(authors_seconds / total, 2),
            "recall_at_100_min": info["recall_min"], "recall_at_100_mean": info["recall_mean"],
            "months_by_search": info["months_by_search"], "vs_exact": _agreement(results, exact),
            "rss_before_mb": round(before / 2**20), "peak_rss_mb": round(rss.peak / 2**20),
            # every paper against every earlier one: the products grow with N squared
            "projected_seconds_at_2_36m_papers": round(total * (USER_CORPUS / papers) ** 2),
        }
        if "device_search" in info:
            report[name]["device_search"] = info["device_search"]
    report["vectors_mb"] = round(vectors.nbytes / 2**20)
    reference = "graph_from_200k_papers" if "graph_from_200k_papers" in variants else "auto_without_device"
    report["speedup_reference"] = reference
    for name in variants:
        report[name]["speedup_vs_auto_without_device"] = round(
            report["auto_without_device"]["total_seconds"] / report[name]["total_seconds"], 2)
        report[name]["speedup_vs_reference"] = round(
            report[reference]["total_seconds"] / report[name]["total_seconds"], 2)
    for name, original in same_as.items():
        report[name] = {"same_as": original, **report[original]}
    return report
