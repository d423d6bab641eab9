"""`paper-assets chaos`: a whole deployment on this machine, one process of it failed mid-backfill, and a check that
the backfill still finishes by itself with every paper embedded exactly once.

Each trial starts its own services: a PostgreSQL cluster it owns (``initdb`` + ``pg_ctl`` on a free port, run as the
``postgres`` user where this runs as root, so it can be crashed without touching the machine's server), a RabbitMQ
virtual host (broker: a killed worker's step is handed to the other as soon as its connection drops), a Redis
database (result backend), moto's S3 (the home), two ``paper-assets worker`` processes and ``paper-assets ui``. It
materialises ``s2_source``, launches ``paper-assets backfill --wait`` over every partition, waits until runs are in
flight, then applies one fault: kill -9 of the daemon, the webserver, a run worker or a Celery worker, or an
immediate stop of PostgreSQL started again 15 s later. No step of a person follows. A trial passes when the backfill
ends COMPLETED_SUCCESS with every partition SUCCESS and the S3 home holds each source id exactly once.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from .. import backfill
from ..demo_kit import sample_source
from ..local_services import (
    DEFAULT_REDIS,
    S3_TEST_CREDENTIALS,
    empty_redis_database,
    free_port,
    moto_s3_server,
    temporary_bucket,
    temporary_rabbitmq_vhost,
)
from ..processes import start_bound, stop_process_group, wait_until
from ..settings import Settings, variable

FAULTS = ("daemon", "webserver", "run_worker", "celery_worker", "postgres")
RANGE_WIDTH = 1_000_000
POSTGRES_DOWN_SECONDS = 15


class OwnedPostgres:
    """A PostgreSQL cluster in a folder of its own, on a free port; ``crash`` stops it immediately (no checkpoint,
    clients cut off, as a killed server or a failover does), ``start`` brings it back."""

    def __init__(self, root: Path):
        self.data = root / "data"
        self.port = free_port()
        self.log = root / "postgres.log"
        self._as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        root.mkdir(parents=True, exist_ok=True)
        if self._as_owner:
            root.chmod(0o777)  # the owner writes its data folder and log here
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        done = subprocess.run([*self._as_owner, *argv], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stderr[-2000:]}")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-o",
                  f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                  "-c max_connections=300 -c fsync=off", "start")

    def crash(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")

    def stop(self) -> None:
        subprocess.run([*self._as_owner, "pg_ctl", "-D", str(self.data), "-m", "fast", "stop"], capture_output=True,
                       timeout=120)


@contextmanager
def owned_postgres() -> Iterator[OwnedPostgres]:
    root = Path(tempfile.mkdtemp(prefix="paper-assets-pg-"))
    root.chmod(0o755)
    try:
        server = OwnedPostgres(root / "cluster")
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def machine_env(settings: Settings, local: Path, **extra: str) -> dict:
    """One machine of a deployment: every setting from the environment (no config file is shared), its own local
    folder beside the shared S3 home."""
    env = dict(os.environ, PAPER_ASSETS_LOCAL_HOME=str(local))
    env.pop("DAGSTER_HOME", None)
    for name, value in vars(settings).items():
        if value not in ("", None) and name != "home":
            env[variable(name)] = str(value)
    return {**env, variable("home"): settings.home, **extra}


def _latest_pid(ui_log: Path, service: str) -> int:
    marker = f"paper-assets ui: {service} started (pid "
    lines = [line for line in ui_log.read_text(errors="replace").splitlines() if marker in line]
    return int(lines[-1].split(marker)[1].rstrip(")"))


def _started_runs(instance) -> list:
    from dagster import DagsterRunStatus, RunsFilter

    return instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED]))


class Deployment:
    """The processes of one trial: ``ui`` (webserver + daemon under its supervisor) and two Celery workers."""

    def __init__(self, work: Path, settings: Settings, stack: ExitStack):
        self.work, self.settings = work, settings
        self.env = machine_env(settings, work / "ui-machine")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.workers = [self._start_worker(i) for i in range(2)]
        with open(work / "ui.log", "w") as log:
            self.ui = start_bound([sys.executable, "-m", "paper_assets.cli", "ui", "--port",
                                   self.url.rsplit(":", 1)[1]], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        stack.callback(self.stop)
        for i, worker in enumerate(self.workers):
            log = work / f"worker{i}.log"
            wait_until(f"worker {i} ready", lambda log=log: " ready." in log.read_text(errors="replace"), 180,
                      worker, log)
        wait_until("the webserver", lambda: backfill.webserver_up(self.url), 180, self.ui, work / "ui.log")

    def _start_worker(self, index: int) -> subprocess.Popen:
        env = machine_env(self.settings, self.work / f"gpu-machine-{index}")
        with open(self.work / f"worker{index}.log", "w") as log:
            return start_bound([sys.executable, "-m", "paper_assets.cli", "worker", "--device", "cpu"], env=env,
                               stdout=log, stderr=subprocess.STDOUT)

    def instance(self):
        from dagster import DagsterInstance

        os.environ[variable("pg_url")] = self.settings.pg_url
        return DagsterInstance.from_config(str(self.work / "ui-machine" / "dagster"))

    def stop(self) -> None:
        for process in (self.ui, *self.workers):
            stop_process_group(process)


def _inject(fault: str, deployment: Deployment, postgres: OwnedPostgres, instance) -> str:
    """Apply ``fault``; what was hit."""
    if fault in ("daemon", "webserver"):
        pid = _latest_pid(deployment.work / "ui.log", f"dagster-{fault}")
        os.kill(pid, signal.SIGKILL)
        return f"dagster-{fault} pid {pid}"
    if fault == "run_worker":
        runs = [r for r in _started_runs(instance) if r.tags.get("paper_assets/pid")]
        pid = int(random.choice(runs).tags["paper_assets/pid"])
        os.kill(pid, signal.SIGKILL)
        return f"run worker pid {pid}"
    if fault == "celery_worker":
        worker = random.choice(deployment.workers)
        os.killpg(worker.pid, signal.SIGKILL)
        return f"celery worker pid {worker.pid}"
    postgres.crash()
    time.sleep(POSTGRES_DOWN_SECONDS)
    postgres.start()
    return f"postgres down {POSTGRES_DOWN_SECONDS} s"


def _home_ids(home: str, local: Path) -> list[int]:
    """Every corpusid in the S3 home's embedding files, listed with boto3 (not with the home's own listing)."""
    import boto3

    from ..engine.fs import read_parquet
    from ..engine.home import ProjectHome

    layout = ProjectHome(home, local=local)
    bucket, _, prefix = home.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    ids: list[int] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/embeddings/"):
        for item in page.get("Contents", []):
            key = item["Key"].removeprefix(prefix + "/")
            if key.startswith("embeddings/embeddings-") and key.endswith(".parquet"):
                ids += read_parquet(layout.root / key, columns=["corpusid"]).column("corpusid").to_pylist()
    return ids


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_trial(work: Path, fault: str, base_model: str, adapter: str, papers: list[dict], seed: int,
              partitions: int = 8, per_partition: int = 250, deadline_s: float = 900) -> dict:
    """One trial; its figures (``complete``, ``lost``, ``duplicated``, ``stuck``) whatever the outcome."""
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    rows = [dict(papers[(p * per_partition + i) % len(papers)], corpusid=p * RANGE_WIDTH + i)
            for p in range(partitions) for i in range(per_partition)]
    source = sample_source.write_source(work / "source.duckdb", rows)
    expected = sorted(r["corpusid"] for r in rows)
    started = time.time()
    with ExitStack() as stack:
        postgres = stack.enter_context(owned_postgres())
        broker = stack.enter_context(temporary_rabbitmq_vhost())
        backend = stack.enter_context(empty_redis_database(DEFAULT_REDIS))
        endpoint = stack.enter_context(moto_s3_server())
        stack.enter_context(_environment(**S3_TEST_CREDENTIALS, AWS_ENDPOINT_URL=endpoint, **{variable("pg_url"): ""}))
        bucket = stack.enter_context(temporary_bucket(endpoint))
        settings = Settings(home=f"s3://{bucket}/home", source=str(source), base_model=base_model, adapter=adapter,
                            chunk_rows=50, device="cpu", pg_url=postgres.url, celery_broker=broker,
                            celery_backend=backend, range_width=RANGE_WIDTH)
        deployment = Deployment(work, settings, stack)
        dagster_env = dict(deployment.env, DAGSTER_HOME=str(work / "ui-machine" / "dagster"))
        done = subprocess.run([sys.executable, "-m", "dagster", "asset", "materialize", "-m",
                               "paper_assets.definitions", "--select", "s2_source"], env=dagster_env,
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"s2_source failed: {done.stderr[-3000:]}")
        fill_log = work / "backfill.err"
        with open(fill_log, "w") as err:
            fill = subprocess.Popen([sys.executable, "-m", "paper_assets.cli", "backfill", "--wait", "--url",
                                     deployment.url, "--timeout", str(deadline_s)], env=deployment.env,
                                    stdout=subprocess.PIPE, stderr=err, text=True)
        instance = deployment.instance()
        wait_until("a run in flight", lambda: [r for r in _started_runs(instance) if r.tags.get("paper_assets/pid")],
                  600, fill, fill_log)
        time.sleep(rng.uniform(0, 8))
        hit = _inject(fault, deployment, postgres, instance)
        fault_at = time.time() - started
        try:
            out, _ = fill.communicate(timeout=deadline_s + 120)
        except subprocess.TimeoutExpired:
            fill.kill()
            out, _ = fill.communicate()
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        ids = _home_ids(settings.home, work / "ui-machine")
        instance.dispose()
    return _trial_result(fault, hit, fault_at, started, lines, partitions, expected, ids, fill.returncode, fill_log)


def _trial_result(fault: str, hit: str, fault_at: float, started: float, lines: list[dict], partitions: int,
                  expected: list[int], ids: list[int], returncode: int | None, fill_log: Path) -> dict:
    summary = lines[-1] if lines else {}
    reports = [line for line in lines[1:-1] if "range" in line]
    return {
        "fault": fault, "hit": hit, "fault_at_s": round(fault_at, 1), "seconds": round(time.time() - started, 1),
        "status": summary.get("status"), "partitions": len(reports),
        "succeeded": sum(r["status"] == "SUCCESS" for r in reports),
        "runs": sum(r.get("runs", 1) for r in reports),
        "complete": summary.get("status") in ("COMPLETED", "COMPLETED_SUCCESS") and not summary.get("failed")
        and len(reports) == partitions,
        "lost": len(set(expected) - set(ids)), "duplicated": len(ids) - len(set(ids)),
        "stuck": returncode is None or not lines,
        "not_succeeded": [{k: r.get(k) for k in ("range", "status", "runs", "error")} for r in reports
                          if r["status"] != "SUCCESS"],
        "backfill_stderr_tail": fill_log.read_text(errors="replace")[-600:],
    }


def run_trials(trials: int, work: Path, base_model: str, adapter: str, papers: list[dict], seed: int = 0,
               faults: tuple[str, ...] = FAULTS, log=print) -> dict:
    """``trials`` trials, each with a fault drawn at random from ``faults``; the per-trial figures and totals."""
    rng = random.Random(seed)
    results = []
    for trial in range(trials):
        fault = rng.choice(faults)
        try:
            result = run_trial(work / f"trial-{trial}", fault, base_model, adapter, papers,
                               seed=rng.randrange(1 << 30))
        except Exception as err:  # noqa: BLE001 - a trial that breaks is a failed trial, counted; the rest still run
            result = {"fault": fault, "complete": False, "stuck": True, "lost": 0, "duplicated": 0,
                      "error": f"{type(err).__name__}: {err}"[-2000:]}
        log(json.dumps(result))
        results.append(result)
        if result["complete"] and not (result["lost"] or result["duplicated"] or result["stuck"]):
            shutil.rmtree(work / f"trial-{trial}", ignore_errors=True)  # a failed trial's logs stay for reading
    totals = {"trials": trials, "complete": sum(r["complete"] for r in results),
              "lost": sum(r["lost"] for r in results), "duplicated": sum(r["duplicated"] for r in results),
              "stuck": sum(r["stuck"] for r in results),
              "faults": {f: sum(r["fault"] == f for r in results) for f in faults}}
    return {"totals": totals, "trials": results}
