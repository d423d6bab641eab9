"""`paper-assets publish`: publish the home's embeddings through the same quality gate as `hub_shards`."""

from __future__ import annotations

import json

from ..settings import load_settings
from .common import CommandError


def register(sub) -> None:
    publish = sub.add_parser("publish", help="publish the home's embeddings (same code as the hub_shards asset)")
    publish.add_argument("--repo", help="dataset repo id (default PAPER_ASSETS_HUB_REPO; none: local folder)")
    publish.add_argument("--revision", help="branch to commit to (default PAPER_ASSETS_HUB_REVISION / main)")
    publish.add_argument("ranges", nargs="*", help="range keys (default: every embeddings partition)")
    publish.set_defaults(func=run)


def run(args) -> int:
    from dagster import DagsterInvalidConfigError, EnvVar

    from ..definitions import build_resources
    from ..defs.shards import mismatches, publish_home
    from ..engine import publish as publish_engine
    from ..engine.gate import embedded_ranges
    from ..engine.ranges import parse_range

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
