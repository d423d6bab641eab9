"""``paper-assets``: demo | update | embed | bench | publish | ui | backfill | chaos | worker | similar | novelty |
verify.

One module per command, each with ``register(sub)`` (its arguments) and the function it runs."""

from __future__ import annotations

import argparse
import sys

from ..engine.errors import UserError
from . import backfill, bench, chaos, demo, embed, lookup, publish, ui, update, verify, worker
from .common import CommandError  # noqa: F401 - the commands' error type
from .demo import prepare_demo  # noqa: F401 - the UI tests build the demo home with it
from .embed import PREFETCH_NICENESS, papers_prefetcher  # noqa: F401 - tested

COMMANDS = (demo, update, embed, bench, publish, ui, backfill, chaos, worker, lookup, verify)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paper-assets", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the full traceback of expected errors too")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
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
