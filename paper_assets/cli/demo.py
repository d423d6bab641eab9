"""`paper-assets demo`: the offline demo, applied through Dagster and published to the home's folder.

By default: 2,423 real papers shipped in the package (SciRepEval's sample, ODC-By; ``demo_kit/data``) embedded by
a trained stand-in of SPECTER2's architecture (``demo_kit/minilm_model.py``), so `similar` and `novelty` answer
with papers a person recognises as related. ``--papers N`` generates N synthetic papers and a small random-weight
model instead: seconds, for smoke tests, with neighbours that mean nothing."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..engine.home import ProjectHome
from ..settings import Settings, load_settings, variable
from .common import instance


def register(sub) -> None:
    demo = sub.add_parser("demo", help="build the offline demo (source + stand-in model) and materialise everything")
    papers = demo.add_mutually_exclusive_group()
    papers.add_argument("--papers-jsonl", help="build the demo source from this JSONL of papers instead of the "
                        "shipped SciRepEval sample")
    papers.add_argument("--papers", type=int, help="generate this many synthetic papers and embed them with a small "
                        "random-weight model (fast; its neighbours mean nothing)")
    demo.set_defaults(func=run)


# The real sample's ids spread over 0..240M: 1M-id partitions would hold ~10 papers each; 50M-id ones hold 177 to
# 1,217 (5 partitions), as the user's 1M-id partitions of the 2000+ corpus hold ~8k.
SAMPLE_RANGE_WIDTH = 50_000_000
# The sample's dates are years only (January 1st, 1948 to 2021): novelty months from 2018 on (538 of its 998 dated
# papers fall in 2018-2021) keep the demo's month runs to 37; earlier papers are still prior papers.
SAMPLE_NOVELTY_FROM = "2018-01"
SAMPLE_PAPERS = Path(__file__).resolve().parents[1] / "demo_kit" / "data" / "scirepeval_sample_papers.jsonl.gz"


def prepare_demo(settings: Settings, papers_jsonl: str | None, count: int | None) -> Settings:
    """Build (if absent) the demo source DB and the offline stand-in model, and record them in the home config.
    ``count``: generated papers and the random-weight model; else real papers and the trained stand-in."""
    from ..demo_kit import sample_source

    layout = ProjectHome(settings.home)
    source = layout.demo_dir / "source.duckdb"
    if not source.exists():
        papers = (sample_source.generate_papers(count) if count
                  else sample_source.read_jsonl_papers(papers_jsonl or SAMPLE_PAPERS))
        sample_source.write_source(source, papers)
        origin = "generated" if count else ("from " + papers_jsonl if papers_jsonl else
                                            "SciRepEval's sample, ODC-By: demo_kit/data/ATTRIBUTION.md")
        print(f"built demo source {source} ({len(papers):,} papers, {origin})")
    model_dir = layout.demo_dir / "model"
    if not (model_dir / "adapter" / "adapter_config.json").exists():
        if count:
            import duckdb

            from ..demo_kit.tiny_model import build_model

            with duckdb.connect(str(source), read_only=True) as conn:
                texts = [f"{t or ''} {a or ''}" for t, a in
                         conn.execute("SELECT title, abstract FROM papers_with_abstracts").fetchall()]
            build_model(model_dir, texts)
            print(f"built offline stand-in model {model_dir} (random weights, NOT SPECTER2)")
        else:
            from ..demo_kit.minilm_model import DESCRIPTION, build_minilm_model

            build_minilm_model(model_dir)
            print(f"built offline stand-in model {model_dir}: {DESCRIPTION} (trained, but NOT SPECTER2)")
    config_file = layout.config_file
    if not config_file.exists():
        width_set = bool(os.environ.get(variable("range_width")))
        demo = Settings(home=settings.home, source=str(source), base_model=str(model_dir / "base"),
                        adapter=str(model_dir / "adapter"),
                        range_width=settings.range_width if count or width_set else SAMPLE_RANGE_WIDTH)
        if not count:
            from ..demo_kit.minilm_model import NORM_K

            demo.norm_k = NORM_K
            demo.novelty_from = SAMPLE_NOVELTY_FROM
        demo.save()
        print(f"wrote {config_file} (environment variables override it)")
    return load_settings()


def run(args) -> int:
    settings = load_settings()
    ProjectHome(settings.home).local.mkdir(parents=True, exist_ok=True)
    settings = prepare_demo(settings, args.papers_jsonl, args.papers)
    print(f"materialising every partition of s2_source -> papers -> paper_embeddings -> hub_shards in {settings.home}")
    from ..definitions import build_definitions
    from ..defs.release import apply_release

    started = time.perf_counter()
    summary = apply_release(build_definitions(settings), instance(settings), publish=True, log=print)
    seconds = time.perf_counter() - started
    layout = ProjectHome(settings.home)
    print(
        f"done: release {summary['release']}, {summary['ranges_changed']} partition(s) run, "
        f"{summary['rows_embedded']:,} papers embedded, {summary['rows_reused']:,} reused in {seconds:.1f} s\n"
        f"  embeddings:  {layout.embeddings_dir}\n"
        f"  catalog:     {layout.warehouse} (views papers, embeddings, paper_novelty)\n"
        f"  hub layout:  {settings.hub_repo or layout.hub_folder}\n"
        f"  Dagster UI:  make ui  (or: .venv/bin/paper-assets ui)\n"
        f"The demo's stand-in model makes {summary['model'].get('dimension', '?')}-d vectors; SPECTER2 makes 768-d.\n"
        "Try: .venv/bin/paper-assets similar 12871252   (a paper on the aesthetics of data visualisation; any corpus "
        "id of the catalog's papers view works)"
    )
    return 0
