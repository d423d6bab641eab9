"""The default demo: the shipped SciRepEval sample embedded by the trained stand-in, offline; `similar` answers
with papers that SciRepEval labels as related."""

from __future__ import annotations

import collections
import gzip
import json
import os
import subprocess
import sys

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


def test_the_default_demo_finds_labelled_related_papers(tmp_path):
    env = dict(os.environ, PAPER_ASSETS_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    env.pop("DAGSTER_HOME", None)
    out = subprocess.run([sys.executable, "-m", "paper_assets.cli", "demo"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "2,423 papers embedded" in out.stdout and "NOT SPECTER2" in out.stdout
    assert "SciRepEval" in out.stdout and "384-d vectors" in out.stdout

    similar = subprocess.run([sys.executable, "-m", "paper_assets.cli", "similar", "12871252", "--json"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert similar.returncode == 0, similar.stderr[-2000:]
    neighbours = [n["corpusid"] for n in json.loads(similar.stdout)["neighbors"]]
    assert len(neighbours) == 10 and 207211621 in neighbours  # SciRepEval: 12871252 cites it

    layout = ProjectHome(tmp_path / "home")
    index = current_index(layout.index_dir, layout.index_cache)
    related = labelled_related()
    found = [bool(rel & {int(index.ids[p]) for p, _ in similar_papers(index, query, k=10)})
             for query, rel in related.items()]
    # Among 2,423 papers, a labelled related paper in the top 10 for most queries (random vectors: under 1%).
    assert sum(found) / len(found) >= 0.5
