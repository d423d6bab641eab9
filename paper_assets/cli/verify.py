"""`paper-assets verify`: a sample of this home's vectors against the SPECTER2 vectors S2 serves."""

from __future__ import annotations

import json
import os

from ..engine.home import ProjectHome
from ..engine.s2_api import S2Client
from ..engine.s2_verify import verify_home
from ..settings import S2_KEY_VARIABLE, load_settings
from .common import CommandError


def register(sub) -> None:
    verify = sub.add_parser("verify", help="compare a sample of the home's vectors with S2's own SPECTER2 vectors "
                            f"(Graph API; needs {S2_KEY_VARIABLE}); exits 1 when they do not match")
    verify.add_argument("--sample", type=int, default=1000, help="papers to compare (default %(default)s)")
    verify.add_argument("--range", dest="range_key", help="only this partition (e.g. 000000000-000999999)")
    verify.add_argument("--seed", type=int, default=0, help="which papers the sample draws (default %(default)s)")
    verify.add_argument("--json", action="store_true", help="one JSON object instead of a line")
    verify.set_defaults(func=run)


def run(args) -> int:
    key = os.environ.get(S2_KEY_VARIABLE, "")
    if not key:
        raise CommandError(f"verify asks S2's Graph API for its vectors: set {S2_KEY_VARIABLE} to an S2 API key")
    if args.sample < 1:
        raise CommandError("--sample must be at least 1")
    settings = load_settings()
    client = S2Client(settings.s2_api, key, min_interval=settings.s2_min_interval)
    report = verify_home(ProjectHome(settings.home), client, args.sample, args.range_key, args.seed)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(("matches S2's SPECTER2: " if report.passed else "DOES NOT match S2's SPECTER2: ") + report.summary())
    return 0 if report.passed else 1
