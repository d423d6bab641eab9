"""`paper-assets chaos`: fault trials of a whole local deployment (see RELIABILITY.md)."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    chaos = sub.add_parser("chaos", help="fault trials: a whole deployment on this machine (own PostgreSQL, RabbitMQ, "
                           "Redis, moto S3, two workers, ui), one process failed mid-backfill; the backfill must "
                           "finish by itself with every paper once")
    chaos.add_argument("--trials", type=int, default=20, help="trials (default %(default)s), a fault drawn for each")
    chaos.add_argument("--fault", action="append", choices=("daemon", "webserver", "run_worker", "celery_worker",
                                                            "postgres"), help="draw only from these (repeatable)")
    chaos.add_argument("--seed", type=int, default=0, help="random seed of the faults and their moments")
    chaos.add_argument("--work", help="working folder (default: a new temporary one)")
    chaos.add_argument("--json", help="write every trial's figures here")
    chaos.set_defaults(func=run)


def run(args) -> int:
    import tempfile

    from ..benchkit import chaos
    from ..benchkit.bench import SHARED_PAPERS
    from ..demo_kit import sample_source
    from ..demo_kit.tiny_model import build_model

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
