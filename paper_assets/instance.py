"""The Dagster instance paper-assets runs on: ``dagster/dagster.yaml`` in the home's local folder (the home itself
unless it is on object storage), written from the settings.

Default: SQLite storage in the home, one embedding step at a time per GPU pool slot (offline, one machine). With
``PAPER_ASSETS_PG_URL``: run, event-log and schedule storage in PostgreSQL (dagster-postgres), so the webserver,
the daemon, the runs and Celery workers on other machines share one instance. The URL stays in the environment
(``env:`` in the file), never in the file itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from .engine.home import ProjectHome
from .settings import Settings, variable

MARKER = "# written by paper-assets from its settings; remove this line to keep your own edits\n"
PG_URL_VARIABLE = variable("pg_url")
# Serialises `dagster instance migrate` across processes and machines: two workers initialising an empty
# PostgreSQL instance at once race on its tables.
_MIGRATE_LOCK_KEY = 0x70617065  # "pape"
MONITOR_POLL_SECONDS = 15
RUN_RETRIES = 3


def instance_yaml(settings: Settings) -> str:
    lines = [MARKER, "telemetry:\n  enabled: false\n"]
    if settings.pg_url:
        lines.append("storage:\n  postgres:\n    postgres_url:\n      env: " + PG_URL_VARIABLE + "\n")
    if not settings.celery_broker:
        # Locally, paper_embeddings runs in pool 'gpu': one step per GPU at a time. Celery workers bound to one
        # device each are that limit themselves, so the pool stays unlimited there.
        lines.append("# Raise with: dagster instance concurrency set gpu <number of GPUs>\n"
                     "concurrency:\n  pools:\n    default_limit: 1\n")
    # The daemon checks every started run's worker (MonitoredRunLauncher) and fails a run whose worker is gone; a
    # failed run (worker lost, a database or storage error in the run worker or around a step) is launched again,
    # at most RUN_RETRIES times, unless a step marked the failure deterministic (defs/transient.py: a missing model,
    # a failed quality gate), which a retry would only repeat.
    lines.append(f"run_launcher:\n  module: paper_assets.defs.run_worker\n  class: MonitoredRunLauncher\n"
                 f"run_monitoring:\n  enabled: true\n  poll_interval_seconds: {MONITOR_POLL_SECONDS}\n"
                 f"  free_slots_after_run_end_seconds: 30\n"
                 f"run_retries:\n  enabled: true\n  max_retries: {RUN_RETRIES}\n"
                 f"  retry_on_asset_or_op_failure: true\n")
    return "".join(lines)


def prepare_dagster_home(settings: Settings) -> Path:
    """Write ``dagster.yaml`` (unless the user removed the marker line to keep their own), set ``DAGSTER_HOME``."""
    home = ProjectHome(settings.home).dagster_home
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    wanted = instance_yaml(settings)
    current = config.read_text(encoding="utf-8") if config.exists() else None
    if current is None or (current.startswith(MARKER) and current != wanted):
        tmp = config.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(wanted, encoding="utf-8")
        tmp.replace(config)
    os.environ["DAGSTER_HOME"] = str(home)
    if settings.pg_url:
        os.environ[PG_URL_VARIABLE] = settings.pg_url
    return home


def migrate_instance(settings: Settings) -> None:
    """Create or upgrade the instance's tables once, whoever gets there first (PostgreSQL advisory lock)."""
    prepare_dagster_home(settings)
    from dagster import DagsterInstance

    if not settings.pg_url:
        DagsterInstance.get().upgrade()
        return
    import psycopg2

    with psycopg2.connect(settings.pg_url) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s)", (_MIGRATE_LOCK_KEY,))
        try:
            DagsterInstance.get().upgrade()
        finally:
            cursor.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATE_LOCK_KEY,))
