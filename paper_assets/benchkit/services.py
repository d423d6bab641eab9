"""Throw-away PostgreSQL databases and Redis databases for the scale-out bench and tests (real services, cleaned up)."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

DEFAULT_PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379"


@contextmanager
def temporary_postgres_database(admin_url: str = DEFAULT_PG_ADMIN) -> Iterator[str]:
    """A fresh database on the server of ``admin_url``; its URL is yielded, and it is dropped afterwards."""
    import psycopg2

    name = f"paper_assets_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


@contextmanager
def empty_redis_database(base_url: str = DEFAULT_REDIS, candidates: range = range(15, 8, -1)) -> Iterator[str]:
    """The URL of an empty Redis database among ``candidates`` (high numbers, left to ad-hoc use), emptied after."""
    import redis

    for index in candidates:
        client = redis.Redis.from_url(f"{base_url}/{index}")
        if client.dbsize() == 0:
            break
    else:
        raise RuntimeError(f"no empty Redis database among {list(candidates)} at {base_url}")
    try:
        yield f"{base_url}/{index}"
    finally:
        client.flushdb()
        client.close()


def stop_process_group(process: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it started (TERM, then KILL)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=timeout)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


@contextmanager
def temporary_rabbitmq_vhost(host: str = "127.0.0.1", user: str = "guest", password: str = "guest") -> Iterator[str]:
    """A fresh RabbitMQ virtual host (made with ``rabbitmqctl`` on this machine); its AMQP URL, deleted after."""
    name = f"paper_assets_{uuid.uuid4().hex[:10]}"
    subprocess.run(["rabbitmqctl", "add_vhost", name], check=True, capture_output=True, timeout=60)
    try:
        subprocess.run(["rabbitmqctl", "set_permissions", "-p", name, user, ".*", ".*", ".*"], check=True,
                       capture_output=True, timeout=60)
        yield f"amqp://{user}:{password}@{host}:5672/{name}"
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, timeout=60)
