"""`paper-assets update`: apply the current source release in this process (cron users without the daemon)."""

from __future__ import annotations

import json
import sys

from ..settings import load_settings
from .common import instance


def register(sub) -> None:
    update = sub.add_parser("update", help="apply the current source release here: snapshot it, re-embed only new "
                            "or changed rows, drop rows that left; prints one JSON line")
    update.add_argument("--publish", action="store_true", help="also publish the changed shards (hub_shards)")
    update.set_defaults(func=run)


def run(args) -> int:
    from ..definitions import build_definitions
    from ..defs.release import apply_release

    settings = load_settings()
    summary = apply_release(build_definitions(settings), instance(settings), publish=args.publish,
                            log=lambda line: print(line, file=sys.stderr))
    summary.pop("model")
    print(json.dumps(summary))
    return 0
