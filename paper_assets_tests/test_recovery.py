"""The head of a deployment fails and comes back: supervised services, run-worker health, run and step retries,
`backfill --wait` across a restart, and (slow) a chaos trial against real services."""


import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from dagster import (
    AssetExecutionContext,
    DagsterInstance,
    DagsterRunStatus,
    Definitions,
    asset,
    instance_for_test,
    materialize,
)
from dagster._core.launcher.base import WorkerStatus
from dagster._core.storage.tags import RETRY_ON_ASSET_OR_OP_FAILURE_TAG
from dagster._core.test_utils import create_run_for_test

from paper_assets import backfill
from paper_assets.defs.run_worker import HOST_TAG, PID_TAG, PROCESS_START_TAG, MonitoredRunLauncher, this_process_tags
from paper_assets.defs.transient import retry_transient_errors
from paper_assets.engine.errors import UserError, is_transient
from paper_assets.instance import prepare_dagster_home
from paper_assets.processes import process_alive, process_start
from paper_assets.settings import Settings

from .conftest import REPO


def _supervisor_script(blocked: bool) -> str:
    block = "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])\n" if blocked else ""
    return ("import signal, sys\n" + block +
            "from paper_assets.supervisor import Supervisor\n"
            "sleeper = [sys.executable, '-c', 'import time; time.sleep(300)']\n"
            "sys.exit(Supervisor({'one': sleeper, 'two': sleeper}, log=lambda l: print(l, flush=True)).run())\n")


def _read_pids(lines: list[str], service: str) -> list[int]:
    marker = f"paper-assets ui: {service} started (pid "
    return [int(line.split(marker)[1].rstrip(")\n")) for line in lines if marker in line]


@pytest.mark.parametrize("blocked", [False, True], ids=["plain", "sigterm_blocked"])
def test_the_supervisor_restarts_a_killed_service_and_stops_both_on_sigterm(blocked):
    """kill -9 of one service: one line says so and it runs again (the other is untouched); SIGTERM to the supervisor
    ends both and the supervisor exits 0, also when it was started with SIGTERM blocked."""
    supervisor = subprocess.Popen([sys.executable, "-c", _supervisor_script(blocked)], cwd=REPO,
                                  stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        while len(lines) < 2:
            lines.append(supervisor.stdout.readline())
        first, other = _read_pids(lines, "one")[0], _read_pids(lines, "two")[0]
        os.kill(first, signal.SIGKILL)
        while len(_read_pids(lines, "one")) < 2:
            lines.append(supervisor.stdout.readline())
        restarts = [line for line in lines if "exited" in line]
        assert restarts == ["paper-assets ui: one exited (code -9); restarting it in 1 s (restart 1)\n"]
        second = _read_pids(lines, "one")[1]
        assert process_alive(second) and process_alive(other) and not process_alive(first)
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0
        deadline = time.time() + 20
        while (process_alive(second) or process_alive(other)) and time.time() < deadline:
            time.sleep(0.1)
        assert not process_alive(second) and not process_alive(other)
    finally:
        supervisor.kill()
        supervisor.wait()


def test_instance_config_monitors_run_workers_and_retries_lost_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))  # prepare_dagster_home sets it; restored after
    home = prepare_dagster_home(Settings(home=str(tmp_path / "home"), source="unused"))
    instance = DagsterInstance.from_config(str(home))
    try:
        assert isinstance(instance.run_launcher, MonitoredRunLauncher)
        assert instance.run_monitoring_enabled and instance.run_launcher.supports_check_run_worker_health
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 3
        assert instance.run_retries_retry_on_asset_or_op_failure  # unless the step marked its failure deterministic
    finally:
        instance.dispose()


def test_the_launcher_fails_a_run_whose_worker_is_gone():
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = this_process_tags()
        cases = {
            "this process": (mine, WorkerStatus.RUNNING),
            "a live process": ({**mine, PID_TAG: str(sleeper.pid), PROCESS_START_TAG: process_start(sleeper.pid)},
                               WorkerStatus.RUNNING),
            "an ended process": ({**mine, PID_TAG: str(ended.pid), PROCESS_START_TAG: ""}, WorkerStatus.FAILED),
            "a reused pid": ({**mine, PROCESS_START_TAG: "another-boot/1"}, WorkerStatus.FAILED),
            "another host": ({**mine, HOST_TAG: "elsewhere", PID_TAG: str(ended.pid)}, WorkerStatus.RUNNING),
            "not yet tagged": ({}, WorkerStatus.RUNNING),
        }
        with instance_for_test() as instance:
            launcher = MonitoredRunLauncher()
            launcher.register_instance(instance)
            for name, (tags, expected) in cases.items():
                run = create_run_for_test(instance, status=DagsterRunStatus.STARTED, tags=tags)
                assert launcher.check_run_worker_health(run).status == expected, name
    finally:
        sleeper.kill()
        sleeper.wait()


def test_errors_are_transient_by_their_cause_not_by_their_wrapper():
    class OperationalError(Exception):  # psycopg2's and SQLAlchemy's name for a lost connection
        pass

    try:
        try:
            raise OperationalError("server closed the connection unexpectedly")
        except OperationalError as cause:
            raise RuntimeError("writing the event failed") from cause
    except RuntimeError as wrapped:
        assert is_transient(wrapped)
    assert is_transient(ConnectionRefusedError()) and is_transient(TimeoutError())
    assert not is_transient(ValueError("bad row")) and not is_transient(UserError("no model at /x"))


def test_a_step_retries_a_transient_error_and_fails_a_deterministic_one_for_good(monkeypatch):
    import paper_assets.defs.transient as transient

    monkeypatch.setattr(transient, "FIRST_WAIT_SECONDS", 0.0)
    calls = {"flaky": 0, "broken": 0}

    @asset
    @retry_transient_errors
    def flaky(context: AssetExecutionContext) -> int:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise ConnectionResetError("connection reset by peer")
        return 1

    @asset
    @retry_transient_errors
    def broken(context: AssetExecutionContext) -> int:
        calls["broken"] += 1
        raise ValueError("a quality gate failed")

    assert Definitions(assets=[flaky])  # the decorated body keeps the signature Dagster reads
    with instance_for_test() as instance:
        ok = materialize([flaky], instance=instance)
        assert ok.success and calls["flaky"] == 3
        assert RETRY_ON_ASSET_OR_OP_FAILURE_TAG not in instance.get_run_by_id(ok.run_id).tags
        failed = materialize([broken], instance=instance, raise_on_error=False)
        assert not failed.success and calls["broken"] == 1
        # Marked deterministic: the instance's run retries will not relaunch it.
        assert instance.get_run_by_id(failed.run_id).tags[RETRY_ON_ASSET_OR_OP_FAILURE_TAG] == "false"


class _ScriptedWebserver(http.server.BaseHTTPRequestHandler):
    """Answers /graphql from a script: an HTTP status, or a backfill status."""

    script: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, int):
            self.send_error(step)
            return
        body = json.dumps({"data": {"partitionBackfillOrError": {"__typename": "PartitionBackfill",
                                                                   "status": step}}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_backfill_wait_rides_out_server_errors_and_tells_them_from_no_webserver():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ScriptedWebserver)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _ScriptedWebserver.script = ["REQUESTED", 500, 502, "REQUESTED", "COMPLETED_SUCCESS"]
        seen: list[str] = []
        assert backfill.wait(url, "b1", timeout=60, poll=0.01, on_status=seen.append) == "COMPLETED_SUCCESS"
        assert any("answered HTTP 500" in s for s in seen) and any("answered HTTP 502" in s for s in seen)
        _ScriptedWebserver.script = [500]
        with pytest.raises(backfill.WebserverUnavailable, match="answered HTTP 500.*gave up"):
            backfill.wait(url, "b1", timeout=60, poll=0.01, retry_for=0.05)
        _ScriptedWebserver.script = [404]
        with pytest.raises(backfill.BackfillError, match="refused the request: HTTP 404"):
            backfill.wait(url, "b1", timeout=60, poll=0.01)
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(backfill.WebserverUnavailable, match="no Dagster webserver answering"):
        backfill.wait(url, "b1", timeout=60, poll=0.01, retry_for=0.05)


def test_backfill_id_waits_without_ranges(tmp_path):
    done = subprocess.run([sys.executable, "-m", "paper_assets.cli", "backfill", "0-999999", "--id", "abc"],
                          cwd=REPO, env=dict(os.environ, PAPER_ASSETS_HOME=str(tmp_path)), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "--id waits on a backfill that is already running" in done.stderr


@pytest.fixture()
def chaos_services():
    """What a chaos trial starts or uses: PostgreSQL's server programs, RabbitMQ, Redis (CI has them all)."""
    import shutil

    import redis

    missing = [name for name in ("initdb", "pg_ctl", "rabbitmqctl") if shutil.which(name) is None]
    try:
        redis.Redis.from_url("redis://127.0.0.1:6379/0").ping()
    except Exception as err:  # noqa: BLE001 - any failure to reach it means it is not there
        missing.append(f"redis ({err})")
    if missing and not os.environ.get("CI"):
        pytest.skip(f"not on this machine: {', '.join(missing)}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the chaos trial kills Linux processes")
def test_a_run_worker_killed_mid_backfill_is_retried_to_completion(tmp_path, tiny_model, generated_papers,
                                                                   chaos_services):
    """One chaos trial, as `paper-assets chaos` runs many: its own PostgreSQL cluster, RabbitMQ, Redis, moto's S3, two
    workers and `paper-assets ui`; a run worker gets kill -9 while runs are in flight. The daemon's run monitoring
    fails that run, the run retries launch it again, and the backfill ends COMPLETED_SUCCESS with every id once."""
    from paper_assets.benchkit import chaos

    base, adapter = tiny_model
    result = chaos.run_trial(tmp_path / "trial", "run_worker", base, adapter, generated_papers, seed=1,
                             partitions=4, per_partition=100)
    assert result["complete"] and result["succeeded"] == 4, result
    assert (result["lost"], result["duplicated"], result["stuck"]) == (0, 0, False), result
    assert result["runs"] >= 5, result  # the killed run and its retry
