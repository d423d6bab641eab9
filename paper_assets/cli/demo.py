"""`paper-assets demo`: the offline demo (sample source + stand-in model), applied through Dagster and published
to the home's folder."""

from __future__ import annotations

import time

from ..engine.home import ProjectHome
from ..settings import Settings, load_settings
from .common import instance


def register(sub) -> None:
    demo = sub.add_parser("demo", help="build the offline demo (source + stand-in model) and materialise everything")
    demo.add_argument("--papers-jsonl", help="build the demo source from this JSONL of papers instead of generating")
    demo.add_argument("--papers", type=int, default=DEMO_PAPERS, help="papers to generate (default %(default)s)")
    demo.set_defaults(func=run)


DEMO_PAPERS = 2000


def prepare_demo(settings: Settings, papers_jsonl: str | None, count: int) -> Settings:
    """Build (if absent) the demo source DB and the offline stand-in model, and record them in the home config."""
    from ..demo_kit import sample_source
    from ..demo_kit.tiny_model import build_model

    layout = ProjectHome(settings.home)
    source = layout.demo_dir / "source.duckdb"
    if not source.exists():
        papers = (sample_source.read_jsonl_papers(papers_jsonl) if papers_jsonl
                  else sample_source.generate_papers(count))
        sample_source.write_source(source, papers)
        print(f"built demo source {source} ({len(papers):,} papers)")
    model_dir = layout.demo_dir / "model"
    if not (model_dir / "adapter" / "adapter_config.json").exists():
        import duckdb

        with duckdb.connect(str(source), read_only=True) as conn:
            texts = [f"{t or ''} {a or ''}" for t, a in
                     conn.execute("SELECT title, abstract FROM papers_with_abstracts").fetchall()]
        build_model(model_dir, texts)
        print(f"built offline stand-in model {model_dir} (random weights, NOT SPECTER2)")
    config_file = layout.config_file
    if not config_file.exists():
        demo = Settings(home=settings.home, source=str(source), base_model=str(model_dir / "base"),
                        adapter=str(model_dir / "adapter"), range_width=settings.range_width)
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
        f"The demo's stand-in model makes {summary['model'].get('dimension', '?')}-d vectors; SPECTER2 makes 768-d."
    )
    return 0
