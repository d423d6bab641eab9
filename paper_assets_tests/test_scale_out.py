"""Scale-out over real services: a PostgreSQL Dagster instance and a Celery worker (Redis broker) that keeps the
model loaded across partition runs launched as separate processes, as the UI's backfill launches them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paper_assets.benchkit.chaos import machine_env
from paper_assets.defs.executor import CELERY_QUEUE_TAG, EMBED_QUEUE
from paper_assets.local_services import (
    DEFAULT_PG_ADMIN,
    DEFAULT_REDIS,
    empty_redis_database,
    free_port,
    temporary_postgres_database,
    temporary_rabbitmq_vhost,
)
from paper_assets.processes import process_alive, start_bound
from paper_assets.settings import Settings

from .conftest import make_source, stop_process_group

REPO = Path(__file__).resolve().parent.parent


def _service_or_skip(check) -> None:
    try:
        check()
    except Exception as err:  # noqa: BLE001 - any failure to reach the service means it is not there
        if os.environ.get("CI"):
            raise
        pytest.skip(f"service not reachable here: {err}")


@pytest.fixture()
def pg_url():
    import psycopg2

    _service_or_skip(lambda: psycopg2.connect(DEFAULT_PG_ADMIN).close())
    with temporary_postgres_database() as url:
        yield url


@pytest.fixture()
def redis_url():
    import redis

    _service_or_skip(lambda: redis.Redis.from_url(f"{DEFAULT_REDIS}/0").ping())
    with empty_redis_database() as url:
        yield url


@pytest.fixture()
def amqp_url():
    import shutil

    if shutil.which("rabbitmqctl") is None and not os.environ.get("CI"):
        pytest.skip("rabbitmqctl not on this machine")
    with temporary_rabbitmq_vhost() as url:
        yield url


def launch_worker(env: dict, log: Path, *args: str) -> subprocess.Popen:
    with open(log, "w") as handle:
        return start_bound([sys.executable, "-m", "paper_assets.cli", "worker", "--device", "cpu", *args],
                           cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)


def wait_until_ready(worker: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 120
    while " ready." not in log.read_text():
        assert worker.poll() is None and time.time() < deadline, log.read_text()[-4000:]
        time.sleep(0.5)


def start_worker(env: dict, log: Path, *args: str) -> subprocess.Popen:
    worker = launch_worker(env, log, *args)
    wait_until_ready(worker, log)
    return worker


def materialize_argv(selection: str, partition: str | None = None) -> list[str]:
    return [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "paper_assets.definitions",
            "--select", selection] + (["--partition", partition] if partition else [])


def test_embedding_steps_are_routed_to_the_embed_queue():
    from dagster_celery.tags import DAGSTER_CELERY_QUEUE_TAG

    from paper_assets.defs.embeddings import paper_embeddings

    assert CELERY_QUEUE_TAG == DAGSTER_CELERY_QUEUE_TAG
    assert paper_embeddings.op.tags[CELERY_QUEUE_TAG] == EMBED_QUEUE


def test_instance_config_follows_the_settings(tmp_path, monkeypatch):
    import yaml

    from paper_assets.instance import MARKER, prepare_dagster_home

    # prepare_dagster_home sets both in os.environ; setenv (unlike delenv of an unset name) restores them after.
    monkeypatch.setenv("PAPER_ASSETS_PG_URL", "")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    local = Settings(home=str(tmp_path / "home"), source="unused")
    config = yaml.safe_load((prepare_dagster_home(local) / "dagster.yaml").read_text())
    assert "storage" not in config and config["concurrency"]["pools"]["default_limit"] == 1  # SQLite, as always

    scaled = Settings(home=local.home, source="unused", pg_url="postgresql://u@h:5432/d", celery_broker="redis://h/0")
    text = (prepare_dagster_home(scaled) / "dagster.yaml").read_text()
    config = yaml.safe_load(text)
    assert config["storage"] == {"postgres": {"postgres_url": {"env": "PAPER_ASSETS_PG_URL"}}}
    assert "postgresql://" not in text and "concurrency" not in config  # the URL stays in the environment
    assert os.environ["PAPER_ASSETS_PG_URL"] == "postgresql://u@h:5432/d"

    own = Path(local.home) / "dagster" / "dagster.yaml"
    own.write_text(text.replace(MARKER, ""))  # the user took it over: left alone from now on
    prepare_dagster_home(local)
    assert "postgres" in own.read_text()


def test_a_redis_database_with_a_client_still_connected_is_not_handed_out(redis_url):
    """A worker left running by an interrupted run polls its old database while it is empty: the next test must not
    get that database, nor one another caller has just claimed."""
    import redis

    base, index = redis_url.rsplit("/", 1)
    leftover = redis.Redis.from_url(redis_url)
    leftover.ping()  # connected to the database, holding no keys, as an idle Celery worker's connection does
    try:
        with empty_redis_database(base) as first, empty_redis_database(base) as second:
            assert len({redis_url, first, second}) == 3, (redis_url, first, second)
            assert redis.Redis.from_url(first).dbsize() == 1  # the claim, until the caller is done
        assert redis.Redis.from_url(first).dbsize() == 0
    finally:
        leftover.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
@pytest.mark.parametrize("starter_state", ["plain", "sigterm_blocked_and_ignored_in_a_thread"])
def test_a_service_started_by_a_killed_test_process_ends_with_it(starter_state):
    """Services start in their own session (so a test can stop one with its children), out of reach of whatever
    stops the test; start_bound has Linux send them SIGTERM when their starter dies, even by SIGKILL, and even when
    the starter runs with SIGTERM blocked and ignored (both are inherited through fork and exec) and starts the
    service from a thread other than the main one (Linux ties the signal to the starting thread, which here waits
    on the service as a supervisor's would)."""
    setup = ("signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])\n"
             "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n") if starter_state != "plain" else ""
    starter_code = ("import signal, subprocess, sys, threading, time\n"
                    "from paper_assets.processes import start_bound\n"
                    f"{setup}"
                    "started = []\n"
                    "sleeper = [sys.executable, '-c', 'import time; time.sleep(120)']\n"
                    "def start_and_watch():\n"
                    "    started.append(start_bound(sleeper))\n"
                    "    started[0].wait()\n"
                    "threading.Thread(target=start_and_watch, daemon=True).start()\n"
                    "while not started: time.sleep(0.01)\n"
                    "print(started[0].pid, flush=True)\n"
                    "time.sleep(120)\n")
    starter = subprocess.Popen([sys.executable, "-c", starter_code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    service_pid = int(starter.stdout.readline())
    try:
        assert process_alive(service_pid)
        starter.kill()
        starter.wait()
        deadline = time.time() + 20
        while process_alive(service_pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not process_alive(service_pid), "the service outlived the process that started it"
    finally:
        if process_alive(service_pid):
            os.kill(service_pid, 9)


def test_worker_refuses_to_start_without_a_broker(tmp_path):
    env = dict(os.environ, PAPER_ASSETS_HOME=str(tmp_path))
    env.pop("PAPER_ASSETS_CELERY_BROKER", None)
    done = subprocess.run([sys.executable, "-m", "paper_assets.cli", "worker", "--device", "cpu"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "PAPER_ASSETS_CELERY_BROKER" in done.stderr


def backfill_on_two_workers(tmp_path: Path, settings: Settings, while_running=None) -> tuple[list[dict], dict]:
    """`paper-assets ui` (webserver + daemon) on one machine, a worker on each of two others (own machine folders,
    settings from the environment); `s2_source`, then `paper-assets backfill --wait` of every partition, as the UI's
    button would launch it. ``while_running(workers)`` is called once the backfill is under way."""
    import json

    from .test_ui import wait_for_webserver

    env = machine_env(settings, tmp_path / "ui-machine")
    workers = [launch_worker(machine_env(settings, tmp_path / f"gpu-machine-{i}"), tmp_path / f"worker{i}.log")
               for i in range(2)]  # the three machines start side by side
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "ui.log", "w") as log:
        ui = start_bound([sys.executable, "-m", "paper_assets.cli", "ui", "--port", str(port)], cwd=REPO, env=env,
                         stdout=log, stderr=subprocess.STDOUT)
    try:
        for i, worker in enumerate(workers):
            wait_until_ready(worker, tmp_path / f"worker{i}.log")
        wait_for_webserver(url, ui, tmp_path / "ui.log")
        dagster_env = dict(env, DAGSTER_HOME=str(tmp_path / "ui-machine" / "dagster"))
        done = subprocess.run(materialize_argv("s2_source"), cwd=REPO, env=dagster_env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        fill = subprocess.Popen([sys.executable, "-m", "paper_assets.cli", "backfill", "--wait", "--url", url,
                                 "--timeout", "700"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        if while_running is not None:
            while_running(workers)
        out, err = fill.communicate(timeout=800)
        logs = "".join((tmp_path / name).read_text()[-2000:] for name in ("ui.log", "worker0.log", "worker1.log"))
        assert fill.returncode == 0, out + err[-3000:] + logs
    finally:
        for process in (ui, *workers):
            stop_process_group(process)
    lines = [json.loads(line) for line in out.splitlines()]
    return lines[1:-1], lines[-1]


def assert_every_valid_id_once_and_checks_passed(tmp_path: Path, s3_home: str, papers: list[dict], pg_url: str
                                                 ) -> dict[str, dict]:
    """The S3 home holds each valid source id once, every partition's gate passed, and each partition's run
    recorded its five check results; returns each partition's materialisation metadata."""
    import json

    from dagster import AssetKey, DagsterEventType, DagsterInstance

    from paper_assets.engine.fs import read_parquet
    from paper_assets.engine.home import ProjectHome

    from .conftest import s3_keys

    layout = ProjectHome(s3_home, local=tmp_path / "ui-machine")
    valid = [int(p["corpusid"]) for p in papers if p["corpusid"].isdigit()]
    partitions = len({corpusid // 1_000_000 for corpusid in valid})
    keys = s3_keys(s3_home)
    embedded = [k for k in keys if k.startswith("embeddings/embeddings-") and k.endswith(".parquet")]
    assert len(embedded) == partitions and not any("/.checkpoints/" in k for k in keys)
    ids = []
    for key in embedded:
        ids += read_parquet(layout.root / key, columns=["corpusid"]).column("corpusid").to_pylist()
    assert sorted(ids) == sorted(valid)  # every valid id, once
    gates = [json.loads((layout.root / k).read_text()) for k in keys if k.endswith(".checks.json")]
    assert len(gates) == partitions and all(g["passed"] for g in gates)
    # Each partition's norm statistics, recorded by whichever machine embedded it, none lost to the other's writes.
    norms = sorted(k.removeprefix("stats/norms/").removesuffix(".json") for k in keys if k.startswith("stats/norms/"))
    assert norms == sorted(k.removeprefix("embeddings/embeddings-").removesuffix(".parquet") for k in embedded)
    os.environ["PAPER_ASSETS_PG_URL"] = pg_url
    try:
        instance = DagsterInstance.from_config(str(tmp_path / "ui-machine" / "dagster"))
        records = instance.fetch_materializations(AssetKey("paper_embeddings"), limit=100).records
        metadata = {r.asset_materialization.partition: {**{k: v.value for k, v in r.asset_materialization.metadata
                                                            .items()}, "run_id": r.run_id} for r in records}
        assert len(metadata) == len(records) == partitions  # one materialisation per partition, none twice
        assert "postgres" in type(instance.run_storage).__module__
        for record in records:
            checks = instance.get_records_for_run(record.run_id,
                                                  of_type=DagsterEventType.ASSET_CHECK_EVALUATION).records
            evaluations = [r.event_log_entry.dagster_event.event_specific_data for r in checks]
            # A run of several ranges records each range's five (its partition set) and one of its own per check.
            own = [e for e in evaluations if e.partition in (None, record.partition_key)
                   and "partition_count" not in e.metadata]
            assert len(own) == 5 and all(e.passed for e in evaluations)
            engine_events = instance.get_records_for_run(record.run_id, of_type=DagsterEventType.ENGINE_EVENT)
            messages = [r.event_log_entry.dagster_event.message or "" for r in engine_events.records]
            assert any("in celery worker" in message for message in messages), messages
        instance.dispose()
    finally:
        os.environ.pop("PAPER_ASSETS_PG_URL", None)
    return metadata


def s3_source_papers(generated_papers: list[dict], per_partition: int, partitions: int = 8) -> list[dict]:
    """``partitions`` ranges of ``per_partition`` papers with VARCHAR ids, plus three rows whose ids are not ids
    (quarantined)."""
    papers = [dict(generated_papers[i % len(generated_papers)], corpusid=str(i % partitions * 1_000_000 + i))
              for i in range(partitions * per_partition)]
    return papers + [dict(generated_papers[0], corpusid=bad) for bad in ("n/a", "-5", "12x")]


def test_ui_backfill_of_8_partitions_on_two_workers_into_an_s3_home(tmp_path, tiny_model, generated_papers, pg_url,
                                                                     redis_url, s3_home):
    """The issue's target: a PostgreSQL instance, the Celery executor (Redis broker), two workers, the home on S3
    (moto): a backfill of 8 partitions completes, both workers embed, the S3 home ends with every valid id once."""
    import json

    base, adapter = tiny_model
    papers = s3_source_papers(generated_papers, 40)
    settings = Settings(home=s3_home, source=str(make_source(tmp_path / "source.duckdb", papers, "VARCHAR")),
                        base_model=base, adapter=adapter, chunk_rows=40, device="cpu", pg_url=pg_url,
                        celery_broker=redis_url)
    partitions, summary = backfill_on_two_workers(tmp_path, settings)
    assert summary["partitions"] == 8 and summary["failed"] == []
    assert all(p["status"] == "SUCCESS" and p["rows"] == 40 for p in partitions)
    assert len({p["worker"] for p in partitions}) == 2, partitions  # both workers embedded partitions
    metadata = assert_every_valid_id_once_and_checks_passed(tmp_path, s3_home, papers, pg_url)
    loads: dict[str, dict[str, bool]] = {}
    for meta in metadata.values():
        loads.setdefault(meta["worker"], {})[meta["run_id"]] = meta["model_loaded_in_this_step"]
    # Each long-lived worker process loaded the model when it started: no step, however many runs, waited for it.
    assert len(loads) == 2 and all(sum(steps.values()) == 0 for steps in loads.values()), loads
    # compile=auto on a worker is decided per step, as `embed` decides per run: steps of a few hundred rows are too
    # short to be worth measuring compilation, so neither machine's calibration holds a compile measurement.
    for i in range(2):
        calibration = json.loads((tmp_path / f"gpu-machine-{i}" / "stats" / "calibration.json").read_text())
        assert sum(key.endswith("|compile") for key in calibration) == 0, sorted(calibration)


def test_a_worker_killed_mid_backfill_hands_its_step_to_the_other(tmp_path, tiny_model, generated_papers, pg_url,
                                                                  redis_url, amqp_url, s3_home):
    """The same deployment (RabbitMQ broker) backfilling 4 partitions, with one worker killed with SIGKILL while both
    are embedding: its step is re-delivered to the other machine's worker, which resumes from the chunk checkpoints
    on S3; the backfill completes with the same result. (4 partitions are enough for both workers to be embedding
    at once, and each further one is a run process of its own on the 2 vCPUs the whole deployment shares.)"""
    import signal

    from .conftest import s3_keys

    base, adapter = tiny_model
    papers = s3_source_papers(generated_papers, 120, partitions=4)
    # Small chunks: each embedding step writes many checkpoints, so the kill lands in the middle of one. A fixed
    # budget and no compilation: each worker's first step would otherwise measure both (~80 s of a 2-vCPU machine
    # the two workers share); the backfill above runs with compile=auto, as a deployment does.
    # A run per range: four runs for the two workers, and a worker's log names the one range its step embeds.
    settings = Settings(home=s3_home, source=str(make_source(tmp_path / "source.duckdb", papers, "VARCHAR")),
                        base_model=base, adapter=adapter, chunk_rows=10, device="cpu", token_budget=512,
                        compile="off", pg_url=pg_url, celery_broker=amqp_url, celery_backend=redis_url,
                        partitions_per_run=1)

    chunks_per_partition = 120 // 10
    killed_mid_step: list[tuple[str, str]] = []

    def kill_first_worker_mid_embedding(workers):
        import re
        from collections import Counter

        deadline = time.time() + 400
        while True:
            # The range the first worker embeds now (its log names each one it starts) has finished chunks, and
            # at least half of them still to go, so the kill cannot land after its step ends; the other worker
            # embeds another range at the same time.
            started = re.findall(r"paper_embeddings - embedding (\d{9}-\d{9}):.* in (\S+:\d+)",
                                 (tmp_path / "worker0.log").read_text())
            chunks = Counter(key.split("/")[2] for key in s3_keys(s3_home)
                             if key.startswith("embeddings/.checkpoints/") and "/chunk-" in key)
            if started and 1 <= chunks.get(started[-1][0], 0) <= chunks_per_partition // 2 and len(chunks) >= 2:
                break
            assert time.time() < deadline, "never saw both workers embedding with the first one mid-step"
            time.sleep(0.1)
        os.killpg(workers[0].pid, signal.SIGKILL)
        killed_mid_step.append(started[-1])

    partitions, summary = backfill_on_two_workers(tmp_path, settings, kill_first_worker_mid_embedding)
    assert summary["partitions"] == 4 and summary["failed"] == []
    assert all(p["status"] == "SUCCESS" and p["rows"] == 120 for p in partitions)
    metadata = assert_every_valid_id_once_and_checks_passed(tmp_path, s3_home, papers, pg_url)
    # The interrupted partition went on from the killed worker's chunks, on the other worker.
    [(killed, killed_worker)] = killed_mid_step
    assert metadata[killed]["resumed_rows_from_checkpoint"] >= 10, metadata[killed]
    assert metadata[killed]["worker"] != killed_worker, metadata[killed]
    assert all(metadata[key]["quality_gate"] == "passed" for key in metadata)


def test_one_setting_reaches_the_assets_and_the_cli(tmp_path, monkeypatch):
    from paper_assets.definitions import build_resources
    from paper_assets.settings import load_settings

    monkeypatch.setenv("PAPER_ASSETS_HOME", str(tmp_path))
    monkeypatch.setenv("PAPER_ASSETS_NORM_K", "5.5")
    monkeypatch.setenv("PAPER_ASSETS_CELERY_BROKER", "redis://127.0.0.1:6379/3")
    settings = load_settings()
    assert settings.norm_k == 5.5 and build_resources(settings)["specter2"].gate_policy().norm_k == 5.5
    from paper_assets.definitions import build_definitions

    assert build_definitions(settings).executor.name == "celery_workers"
