"""`paper-assets ui`: the Dagster webserver and daemon under a supervisor that restarts either one that dies."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from ..settings import load_settings
from .common import CommandError, dagster_home


def register(sub) -> None:
    ui = sub.add_parser("ui", help="dagster dev -w workspace.yaml with this home's DAGSTER_HOME")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    ui.add_argument("--port", type=int, default=3000, help="port to listen on (default %(default)s)")
    ui.set_defaults(func=run)


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


def run(args) -> int:
    from ..supervisor import Supervisor

    settings = load_settings()
    home = dagster_home(settings)

    # Before the webserver and the daemon start: both (and their code servers) would otherwise create a fresh
    # instance's tables at once, and with PostgreSQL race with workers starting on other machines (they all take
    # the same lock).
    from ..instance import migrate_instance

    migrate_instance(settings)
    workspace = Path(__file__).resolve().parents[2] / "workspace.yaml"
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
