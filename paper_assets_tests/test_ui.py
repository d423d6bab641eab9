"""The Dagster UI for real: `paper-assets ui` (webserver + daemon on workspace.yaml) on 127.0.0.1 with a temporary
project home, driven through headless Chromium (Debian's package, via Playwright) and through its GraphQL API."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from paper_assets.backfill import webserver_up
from paper_assets.local_services import free_port
from paper_assets.processes import start_bound, wait_until

from .conftest import REPO, stop_process_group

ARTIFACTS = REPO / "test-artifacts" / "ui"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def wait_for_webserver(url: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    wait_until("paper-assets ui serving", lambda: webserver_up(url), timeout, server, log)


def graphql(url: str, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(f"{url}/graphql", data=json.dumps({"query": query, "variables": variables or {}})
                                     .encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        payload = json.loads(response.read())
    assert "errors" not in payload, payload
    return payload["data"]


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory):
    """A project home with the demo source + stand-in model, s2_source and papers materialised, and a webserver."""
    home = tmp_path_factory.mktemp("ui-home")
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    env["PAPER_ASSETS_HOME"] = str(home)
    prepare = (
        "from paper_assets.cli import prepare_demo\nfrom paper_assets.cli.common import dagster_home\n"
        "from paper_assets.defs.release import QUIET\n"
        "from paper_assets.settings import load_settings\n"
        "s = prepare_demo(load_settings(), None, 300)\ndagster_home(s)\n"
        "from dagster import DagsterInstance, materialize\n"
        "from paper_assets.definitions import build_definitions\n"
        "from paper_assets.defs import source, embeddings\n"
        "from paper_assets.defs.partitions import CORPUSID_RANGES\n"
        "d = build_definitions(s); i = DagsterInstance.get()\n"
        "assert materialize([source.s2_source], resources=d.resources, instance=i, run_config=QUIET).success\n"
        "for k in i.get_dynamic_partitions(CORPUSID_RANGES):\n"
        "    assert materialize([embeddings.papers], partition_key=k, resources=d.resources, instance=i,"
        " run_config=QUIET).success\n"
    )
    subprocess.run([sys.executable, "-c", prepare], env=env, check=True, cwd=REPO, timeout=600,
                   capture_output=True)
    port = free_port()
    log = open(home / "ui.log", "w")  # noqa: SIM115 - closed in teardown
    # `paper-assets ui` as a user starts it: no venv activated (its bin is not on PATH), from another folder.
    venv_bin = Path(sys.executable).parent
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != venv_bin)
    server = start_bound(
        [str(venv_bin / "paper-assets"), "ui", "--host", "127.0.0.1", "--port", str(port)], cwd=home, env=env,
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_webserver(url, server, home / "ui.log")
        yield url, home
    finally:
        stop_process_group(server)
        log.close()


def partition_keys(url: str) -> list[str]:
    data = graphql(url, """{ assetNodeOrError(assetKey: {path: ["paper_embeddings"]}) {
        ... on AssetNode { partitionKeys } } }""")
    return data["assetNodeOrError"]["partitionKeys"]


RUNS = "{ runsOrError { ... on Runs { results { runId status tags { key value } } } } }"


def run_ids(url: str) -> set[str]:
    return {r["runId"] for r in graphql(url, RUNS)["runsOrError"]["results"]}


def wait_for_new_runs(url: str, known: set[str], timeout: float = 300) -> list[dict]:
    deadline, runs = time.time() + timeout, []
    while time.time() < deadline:
        runs = [r for r in graphql(url, RUNS)["runsOrError"]["results"] if r["runId"] not in known]
        if runs and all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in runs):
            return runs
        time.sleep(2)
    raise AssertionError(f"runs did not finish in {timeout}s: {runs}")


@pytest.mark.browser
def test_materialise_one_partition_from_the_ui(dagster_dev):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (apt-get install chromium); .ci/run installs it")
        pytest.skip("Debian's chromium is not installed")
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    url, _ = dagster_dev
    key = partition_keys(url)[0]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/assets/paper_embeddings", wait_until="networkidle")
            materialize_button = page.get_by_role("button", name="Materialize…")
            expect(materialize_button).to_be_visible(timeout=60_000)
            # A fresh instance greets with a "Join the Dagster community" dialog, a moment after loading.
            try:
                page.get_by_role("button", name="Skip").click(timeout=10_000)
            except PlaywrightTimeout:
                pass
            page.screenshot(path=str(ARTIFACTS / "1-asset-page.png"))
            materialize_button.click()
            dialog_title = page.get_by_text("Launch runs to materialize paper_embeddings")
            expect(dialog_title).to_be_visible(timeout=30_000)
            page.get_by_text("Select a partition or create one").click()
            page.get_by_text(key, exact=True).first.click()
            dialog_title.click()  # closes the drop-down, keeps the dialog
            page.screenshot(path=str(ARTIFACTS / "2-launch-dialog.png"))
            before = run_ids(url)
            page.get_by_role("button", name="Launch 1 run").click()
            runs = wait_for_new_runs(url, before)
            assert [r["status"] for r in runs] == ["SUCCESS"]
            tags = {t["key"]: t["value"] for t in runs[0]["tags"]}
            assert tags["dagster/partition"] == key

            page.goto(f"{url}/assets/paper_embeddings?view=checks", wait_until="networkidle")
            for check in ("row_count", "vectors_valid", "corpusid_unique_in_range", "norms_in_band",
                          "adapter_canary"):
                expect(page.get_by_text(check, exact=True).first).to_be_visible(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "3-checks.png"), full_page=True)

            page.goto(f"{url}/assets/paper_embeddings?view=events&partition={key}", wait_until="networkidle")
            page.wait_for_timeout(1500)
            for name in ("papers_per_second", "model_fingerprint", "norm_histogram", "token_efficiency"):
                expect(page.get_by_text(name, exact=True).first).to_be_visible(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "4-metadata.png"), full_page=True)
        finally:
            browser.close()


def test_paper_assets_backfill_launches_through_the_webserver_and_reports_each_partition(dagster_dev):
    url, home = dagster_dev
    keys = partition_keys(url)[-2:]
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    env["PAPER_ASSETS_HOME"] = str(home)
    done = subprocess.run([sys.executable, "-m", "paper_assets.cli", "backfill", *keys, "--assets", "paper_embeddings",
                           "--wait", "--url", url, "--timeout", "400"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=500)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    launched, partitions, summary = lines[0], lines[1:-1], lines[-1]
    assert launched["ranges"] == keys and summary["backfill_id"] == launched["backfill_id"]
    assert summary["status"] in ("COMPLETED", "COMPLETED_SUCCESS") and summary["failed"] == []
    assert [p["range"] for p in partitions] == sorted(keys)
    for partition in partitions:
        assert partition["status"] == "SUCCESS" and partition["rows"] > 0 and partition["device"] == "cpu"
        assert partition["worker"]  # host:pid of the process that embedded it
        assert (home / "embeddings" / f"embeddings-{partition['range']}.parquet").exists()


def test_backfill_without_a_webserver_says_how_to_start_one(tmp_path):
    env = dict(os.environ, PAPER_ASSETS_HOME=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "paper_assets.cli", "backfill", "--url", f"http://127.0.0.1:{free_port()}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "paper-assets ui" in done.stderr


def test_the_ui_process_logs_no_warnings_we_cause(dagster_dev):
    _, home = dagster_dev
    log = (home / "ui.log").read_text(encoding="utf-8", errors="replace")
    assert "paper-assets ui: dagster-webserver started" in log and "paper-assets ui: dagster-daemon started" in log
    flagged = [line for line in log.splitlines() if "Warning" in line or "none are activated" in line]
    assert not flagged, flagged


def test_the_backfill_report_gives_each_failed_partition_the_error_that_ended_it(tmp_path):
    """`paper-assets backfill --wait` reads its per-partition report from the instance: a run that succeeded shows
    what paper_embeddings recorded, a run whose step raised shows the step and its error, and a run that failed
    before any step (a lost run worker, marked failed by Dagster's run monitoring) shows the run's failure; a
    partition whose lost run was retried counts by its retry."""
    from dagster import (
        DagsterInstance,
        Definitions,
        MaterializeResult,
        StaticPartitionsDefinition,
        asset,
        materialize,
    )

    from paper_assets.backfill import partition_reports

    keys = ["000000000-000999999", "001000000-001999999", "002000000-002999999", "003000000-003999999"]

    @asset(partitions_def=StaticPartitionsDefinition(keys))
    def paper_embeddings(context) -> MaterializeResult:
        if context.partition_key.startswith("001"):
            raise RuntimeError("papers file for 001000000-001999999 is truncated")
        return MaterializeResult(metadata={"worker": "host:1", "device": "cpu", "dagster/row_count": 40})

    with DagsterInstance.local_temp(str(tmp_path)) as instance:
        for key in keys[:2]:
            materialize([paper_embeddings], instance=instance, partition_key=key, raise_on_error=False,
                        tags={"dagster/backfill": "fill1"})
        job = Definitions(assets=[paper_embeddings]).resolve_implicit_global_asset_job_def()
        lost = instance.create_run_for_job(job, tags={"dagster/backfill": "fill1", "dagster/partition": keys[2]})
        instance.report_run_failed(lost, message="run worker lost: its process exited without reporting")
        retried = instance.create_run_for_job(job, tags={"dagster/backfill": "fill1", "dagster/partition": keys[3]})
        instance.report_run_failed(retried, message="run worker lost")
        materialize([paper_embeddings], instance=instance, partition_key=keys[3], tags={"dagster/backfill": "fill1"})
        ok, failed, never_started, retry = partition_reports(instance, "fill1")
    assert ok == {"range": keys[0], "status": "SUCCESS", "run_id": ok["run_id"], "worker": "host:1", "device": "cpu",
                  "rows": 40, "runs": 1}
    assert retry["status"] == "SUCCESS" and retry["runs"] == 2 and "error" not in retry
    assert failed["status"] == "FAILURE" and failed["worker"] is None
    assert failed["error"].startswith("paper_embeddings: RuntimeError: papers file for 001000000-001999999 is")
    assert never_started["status"] == "FAILURE" and never_started["run_id"] == lost.run_id
    assert never_started["error"] == "run worker lost: its process exited without reporting"
