"""Throw-away services on this machine for the tests, the benchmarks and `paper-assets chaos`: a PostgreSQL database,
a Redis database, a RabbitMQ virtual host, moto's S3 server and a bucket (real services, cleaned up after)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from .processes import start_bound, stop_process_group

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


REDIS_CLAIM_KEY = "paper_assets:claimed-by"


@contextmanager
def empty_redis_database(base_url: str = DEFAULT_REDIS, candidates: range = range(15, 8, -1)) -> Iterator[str]:
    """The URL of a Redis database among ``candidates`` (high numbers, left to ad-hoc use) that is empty and that no
    other client is connected to, claimed for the caller and emptied after. An empty database is not enough: a Celery
    worker left running by an interrupted test or bench (workers start in their own session, so killing pytest does
    not stop them) keeps polling its old database's queues and would take, and fail, the new caller's steps."""
    import redis

    token = uuid.uuid4().hex
    for index in candidates:
        client = redis.Redis.from_url(f"{base_url}/{index}")
        own_id = client.client_id()
        others = [c for c in client.client_list() if int(c["db"]) == index and int(c["id"]) != own_id]
        # SET NX after the size check: of two callers racing for one empty database, only one claims it.
        if not others and client.dbsize() == 0 and client.set(REDIS_CLAIM_KEY, token, nx=True):
            break
        client.close()
    else:
        raise RuntimeError(f"no free Redis database among {list(candidates)} at {base_url}: each holds keys or has a "
                           "client connected (a worker still running?); `redis-cli client list` shows who")
    try:
        yield f"{base_url}/{index}"
    finally:
        client.flushdb()
        client.close()


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


S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it; a service started next takes it)."""
    import socket

    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@contextmanager
def moto_s3_server(host: str = "127.0.0.1") -> Iterator[str]:
    """moto's S3 server on a free local port (a real HTTP S3 endpoint, objects in memory); its endpoint URL."""
    import socket
    import time

    port = free_port(host)
    server = start_bound([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection((host, port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start on {host}:{port}") from None
                time.sleep(0.1)
        yield f"http://{host}:{port}"
    finally:
        stop_process_group(server)


@contextmanager
def temporary_bucket(endpoint: str) -> Iterator[str]:
    """A fresh bucket on the S3 endpoint (standard AWS variables for credentials); its name, emptied and removed
    afterwards."""
    import boto3

    s3 = boto3.resource("s3", endpoint_url=endpoint)
    name = f"paper-assets-{uuid.uuid4().hex[:10]}"
    bucket = s3.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        bucket.objects.all().delete()
        bucket.delete()
