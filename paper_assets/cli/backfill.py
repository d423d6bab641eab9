"""`paper-assets backfill`: launch (or wait on) a partition backfill through the running webserver."""

from __future__ import annotations

import json
import sys

from ..settings import load_settings
from .common import CommandError, instance


def register(sub) -> None:
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
    fill.set_defaults(func=run)


def run(args) -> int:
    from .. import backfill
    from ..engine.ranges import parse_range

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
    reports = backfill.partition_reports(instance(settings), backfill_id)
    for report in reports:
        print(json.dumps(report), flush=True)
    failed = [r["range"] for r in reports if r["status"] != "SUCCESS"]
    print(json.dumps({"backfill_id": backfill_id, "status": status, "partitions": len(reports),
                      "succeeded": len(reports) - len(failed), "failed": failed}), flush=True)
    return 0 if status in backfill.SUCCEEDED and not failed else 1
