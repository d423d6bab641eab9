"""`paper-assets embed`: the engine without Dagster, one embeddings file per range (into a folder, or into the
home with each range's quality gate)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ..engine.fs import ensure_dir, is_local
from ..engine.home import ProjectHome
from ..settings import DEFAULTS, flag_help, load_settings, variable
from .common import CommandError


def register(sub) -> None:
    embed = sub.add_parser("embed", help="embed a source DuckDB into embeddings Parquet files (no Dagster)")
    embed.add_argument("--source", required=True, help="the cleaned S2 DuckDB file to read (opened read-only)")
    embed.add_argument("--out", help="folder for embeddings-<range>.parquet (created if missing); without it, into "
                       "the home's own layout with each range's quality gate, ready for `publish`")
    embed.add_argument("--table", help=flag_help("source_table"))
    for flag, setting_name in (("--base-model", "base_model"), ("--adapter", "adapter"), ("--device", "device"),
                               ("--range-width", "range_width"), ("--token-budget", "token_budget"),
                               ("--tokenizer-workers", "tokenizer_workers")):
        kind = int if isinstance(getattr(DEFAULTS, setting_name), int) else str
        embed.add_argument(flag, type=kind, help=flag_help(setting_name))
    embed.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help=flag_help("precision"))
    embed.add_argument("--attn-implementation", choices=["sdpa", "eager"], help=flag_help("attn_implementation"))
    embed.add_argument("--compile", action=argparse.BooleanOptionalAction, help=flag_help("compile"))
    embed.add_argument("--range", help="only this inclusive corpusid range, e.g. 0-999999 (one output file)")
    embed.add_argument("--pad-multiple", type=int, help="batch widths are multiples of this (default: 64 on GPU, "
                       "8 on CPU)")
    embed.set_defaults(func=run)


PREFETCH_NICENESS = 10


def papers_prefetcher():
    """One spawned process that builds papers files ahead of the embedding, at a lower scheduling priority: its
    work is due a whole range later, while the embedding process's threads (tokenising, launching kernels) must
    not wait for a core."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=os.nice,
                               initargs=(PREFETCH_NICENESS,))


def run(args) -> int:
    import tempfile

    from ..engine.encoder import Encoder
    from ..engine.model import load_model
    from ..engine.pipeline import build_papers
    from ..engine.source import inspect_source

    settings = load_settings()
    info = inspect_source(args.source, args.table or settings.source_table, setting="--source")
    ranges, expected_rows = _ranges(args, settings, info)
    config, flags = _model_config(args, settings)
    layout = ProjectHome(settings.home)
    into_home = args.out is None  # the home's own layout, quality gate included: `publish` can take it from there
    out = layout.embeddings_dir if into_home else Path(args.out)
    ensure_dir(out)
    layout.local.mkdir(parents=True, exist_ok=True)
    scratch = out if is_local(out) else layout.local
    total, gate_failed = 0, []
    # Papers files are built in a child process, one range ahead: reading and cleaning is Python work that would
    # otherwise hold the GIL beside the threads that tokenise and launch kernels (on a GPU the range embedded
    # without a build beside it ran ~20% faster; BENCHMARKS.md). The first build overlaps the model load.
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".work-") as work, papers_prefetcher() as prefetch:
        def submit_papers(rng):
            papers_file = layout.papers_file(rng) if into_home else Path(work) / f"papers-{rng.key}.parquet"
            ensure_dir(papers_file.parent)
            return papers_file, prefetch.submit(build_papers, info, rng, papers_file)

        upcoming = submit_papers(ranges[0]) if ranges else None
        encoder = Encoder(load_model(config, setting_names=flags), expected_rows=expected_rows)
        loaded = encoder.loaded
        print(f"adapter {config.adapter_name} active ({loaded.precision} on {loaded.device})")
        started = time.perf_counter()

        def papers_in_turn():
            """Each range's papers file once built, the next one's build started: (range, file, its report)."""
            nonlocal upcoming
            for index, rng in enumerate(ranges):
                papers_file, papers = upcoming[0], upcoming[1].result()
                if index + 1 < len(ranges):
                    upcoming = submit_papers(ranges[index + 1])
                yield rng, papers_file, papers

        done = _embedded(papers_in_turn(), encoder, layout if into_home else None, out, Path(work), settings)
        for rng, report, papers, decision in done:
            total += report.rows
            verdict = ""
            if decision is not None:
                verdict = ", quality gate passed" if decision.passed else f", quality gate FAILED: {decision.failed}"
                if not decision.passed:
                    gate_failed.append(rng.key)
            print(f"{rng.key}: {report.rows:,} embedded, {sum(papers.skipped.values())} skipped (no text), "
                  f"{papers.duplicate_corpusid} duplicate ids, {report.papers_per_second:,.1f} papers/s{verdict}")
        encoder.close()
    return _summary(total, time.perf_counter() - started, out, gate_failed)


def _summary(total: int, elapsed: float, out, gate_failed: list[str]) -> int:
    print(f"{total:,} papers in {elapsed:.1f} s ({total / elapsed if elapsed else 0:,.1f} papers/s) -> {out}")
    if gate_failed:
        print(f"paper-assets: error: quality gate failed for {', '.join(gate_failed)}; `publish` will refuse them",
              file=sys.stderr)
        return 1
    return 0


def _ranges(args, settings, info) -> tuple[list, int]:
    """The ranges to embed (``--range``, else every range of the source that holds papers) and their rows."""
    from ..engine.ranges import parse_range, range_for
    from ..engine.source import range_rows, range_stats

    if args.range:
        requested = parse_range(args.range)
        return [requested], range_rows(info, requested)
    width = args.range_width or settings.range_width
    if width <= 0:
        raise CommandError(f"--range-width must be positive, got {width}")
    stats, invalid = range_stats(info, width)
    if invalid:
        print(f"warning: {invalid} row(s) have no valid corpusid and are not embedded", file=sys.stderr)
    return [range_for(lo, width) for lo in stats], sum(stat.rows for stat in stats.values())


def _model_config(args, settings):
    """The model as the flags, else the settings, configure it; and where each model path was given (for hints)."""
    from ..engine.model import ModelConfig

    config = ModelConfig(base_model=args.base_model or settings.base_model, adapter=args.adapter or settings.adapter,
                         device=args.device or settings.device, precision=args.precision or settings.precision,
                         token_budget=args.token_budget or settings.token_budget,
                         compile=settings.compile if args.compile is None else args.compile,
                         attn_implementation=args.attn_implementation or settings.attn_implementation,
                         tokenizer_workers=(settings.tokenizer_workers if args.tokenizer_workers is None
                                            else args.tokenizer_workers),
                         pad_multiple=args.pad_multiple or 0,
                         calibration_file=str(ProjectHome(settings.home).calibration_file))
    flags = {"base model": "--base-model" if args.base_model else variable("base_model"),
             "adapter": "--adapter" if args.adapter else variable("adapter")}
    return config, flags


def _embedded(papers, encoder, home: ProjectHome | None, out: Path, work: Path, settings):
    """(range, embed report, papers report, gate verdict or None) per range, through one encoder stream (the device
    goes on with the next range while one is written): into the home with each range's quality gate, or into
    ``out`` without one."""
    from ..engine.embed_home import RangeToEmbed, embed_ranges, embedding_file_metadata
    from ..engine.pipeline import EmbedJob, embed_partitions

    if home is not None:
        todo = (RangeToEmbed(rng, file, report.as_metadata(), context=report) for rng, file, report in papers)
        for item in embed_ranges(todo, home, encoder, settings.gate_policy(), settings.chunk_rows):
            yield item.rng, item.report, item.context, item.verdict.gate
        return
    model_meta = encoder.loaded.metadata()
    jobs = (EmbedJob(file, out / f"embeddings-{rng.key}.parquet", work / "checkpoints" / rng.key,
                     embedding_file_metadata(model_meta, rng, report.as_metadata()), context=(rng, report))
            for rng, file, report in papers)
    for job, embed_report in embed_partitions(jobs, encoder, chunk_rows=settings.chunk_rows):
        yield job.context[0], embed_report, job.context[1], None
