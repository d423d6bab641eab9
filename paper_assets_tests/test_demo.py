"""The default demo: the shipped SciRepEval sample embedded by the trained stand-in, offline; `similar` answers
with papers that SciRepEval labels as related (checked after the README's `make demo` in test_readme.py)."""

from __future__ import annotations

import collections
import gzip
import json
from pathlib import Path

from paper_assets.cli.demo import SAMPLE_PAPERS
from paper_assets.engine.home import ProjectHome
from paper_assets.engine.paper_index import current_index, similar_papers

PAIRS = SAMPLE_PAPERS.with_name("scirepeval_sample_pairs.jsonl.gz")


def labelled_related() -> dict[int, set[int]]:
    """Paper-to-paper queries (citation triplets, same author) and their candidates labelled related."""
    related: dict[int, set[int]] = collections.defaultdict(set)
    with gzip.open(PAIRS, "rt", encoding="utf-8") as handle:
        for pair in map(json.loads, handle):
            if pair.get("query_id") and pair["label"] > 0:
                related[int(pair["query_id"])].add(int(pair["candidate_id"]))
    return related


def test_the_shipped_sample_is_real_and_attributed():
    with gzip.open(SAMPLE_PAPERS, "rt", encoding="utf-8") as handle:
        papers = [json.loads(line) for line in handle]
    assert len(papers) == 2423 and len({p["corpus_id"] for p in papers}) == 2423
    attribution = (SAMPLE_PAPERS.parent / "ATTRIBUTION.md").read_text()
    assert "ODC-By" in attribution and "SciRepEval" in attribution
    assert len(labelled_related()) == 240


def check_the_default_demo(stdout: str, home: Path, run_cli) -> None:
    """After `paper-assets demo` (README's `make demo`, run by test_readme.py): the real sample went through, and
    `similar` answers with papers SciRepEval labels as related. ``run_cli(args)`` runs a paper-assets command."""
    assert "2,423 papers embedded" in stdout and "NOT SPECTER2" in stdout
    assert "SciRepEval" in stdout and "384-d vectors" in stdout
    similar = run_cli(["similar", "12871252", "--json"])
    assert similar.returncode == 0, similar.stderr[-2000:]
    neighbours = [n["corpusid"] for n in json.loads(similar.stdout)["neighbors"]]
    assert len(neighbours) == 10 and 207211621 in neighbours  # SciRepEval: 12871252 cites it

    layout = ProjectHome(home)
    index = current_index(layout.index_dir, layout.index_cache)
    related = labelled_related()
    found = [bool(rel & {int(index.ids[p]) for p, _ in similar_papers(index, query, k=10)})
             for query, rel in related.items()]
    # Among 2,423 papers, a labelled related paper in the top 10 for most queries (random vectors: under 1%).
    assert sum(found) / len(found) >= 0.5
