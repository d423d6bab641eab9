"""`paper-assets bench --dagster-partitions N`: the same papers embedded by `paper-assets embed` (one process) and
by Dagster (steps on a long-lived Celery worker that keeps the model loaded, PostgreSQL instance), on the same model
and device in the same bench run, two ways: as a UI backfill runs them (one run for the whole range: the assets'
backfill policy), and as one run per partition (4 launched at a time, as single-partition requests run); then a
backfill launched as the UI's button does (`paper-assets ui`: the webserver's GraphQL API, the daemon's backfill tick,
the run launcher), with the project's default partitions per run. Each mode reports where its runs' seconds went
(run_phases)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq

from .. import backfill
from ..demo_kit import sample_source
from ..engine.errors import UserError
from ..engine.home import ProjectHome
from ..engine.ranges import range_for
from ..local_services import (
    DEFAULT_PG_ADMIN,
    DEFAULT_REDIS,
    empty_redis_database,
    free_port,
    temporary_postgres_database,
)
from ..processes import start_bound, stop_process_group, wait_until
from ..settings import Settings, variable
from .measure import in_a_fresh_process
from .run_phases import run_phases

RANGE_WIDTH = 1_000_000


def _papers(partitions: int, per_partition: int, shared: Path) -> list[dict]:
    pool = sample_source.read_jsonl_papers(shared) if shared.exists() else sample_source.generate_papers(3000, 5)
    return [dict(pool[(p * per_partition + i) % len(pool)], corpusid=p * RANGE_WIDTH + i)
            for p in range(partitions) for i in range(per_partition)]


def _calibrate(base: str, adapter: str, device: str, precision: str, calibration_file: str) -> None:
    """What a long-lived encoder measures on first use (no expected size: compile measured, kept if faster)."""
    from ..engine.encoder import Encoder
    from ..engine.model import ModelConfig, load_model

    loaded = load_model(ModelConfig(base_model=base, adapter=adapter, device=device, precision=precision,
                                    calibration_file=calibration_file))
    if loaded.device.type == "cpu":  # a GPU has no calibration: compiling here would only add untimed minutes
        Encoder(loaded).close()


def _run(argv: list[str], env: dict, what: str, timeout: float = 6 * 3600) -> None:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise UserError(f"{what} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def _wait_ready(worker: subprocess.Popen, log: Path, preloaded: bool, timeout: float = 300) -> None:
    """Until the worker takes tasks and, where it preloads, its process holds the model."""
    wanted = [" ready."] + (["model loaded at worker start"] if preloaded else [])
    wait_until("the Celery worker's start", lambda: all(line in log.read_text(errors="replace") for line in wanted),
               timeout, worker, log)


def _timed_embed(work: Path, source: Path, engine_home: Path, shared_papers: Path, base: str, adapter: str,
                 device: str, precision: str, warm_up: bool = True) -> tuple[float, dict]:
    """Seconds of `paper-assets embed` over the whole source, and the environment it ran in (no scale-out)."""
    python = sys.executable
    work.mkdir(parents=True, exist_ok=True)
    model_flags = ["--base-model", base, "--adapter", adapter, "--device", device, "--precision", precision]
    env = {**os.environ, variable("home"): str(engine_home)}
    for name in ("pg_url", "celery_broker", "celery_backend"):
        env.pop(variable(name), None)
    # Untimed: a first run on this machine (caches warm), then every CPU measurement `compile=auto` may want (the
    # token budgets, eager vs compiled), cached in the home as a machine's first long run leaves them, so that
    # neither side pays for them: measured inside the timed `embed`, they were charged to it alone.
    if warm_up:
        warm = sample_source.write_source(work / "warm.duckdb", _papers(1, 16, shared_papers))
        _run([python, "-m", "paper_assets.cli", "embed", "--source", str(warm), "--out", str(work / "warm-out"),
              *model_flags], env, "warm-up embed")
        in_a_fresh_process(_calibrate, base, adapter, device, precision,
                           str(ProjectHome(engine_home).calibration_file))
    started = time.perf_counter()
    _run([python, "-m", "paper_assets.cli", "embed", "--source", str(source), "--out", str(work / "engine-out"),
          *model_flags], env, "paper-assets embed")
    return time.perf_counter() - started, env


def run_dagster_bench(partitions: int, per_partition: int, work: Path, base: str, adapter: str, device: str,
                      precision: str, shared_papers: Path, concurrent_runs: int = 4, repeats: int = 2,
                      pg_admin_url: str = DEFAULT_PG_ADMIN, redis_url: str = DEFAULT_REDIS) -> dict:
    """``repeats``: `embed` and the one-run backfill are timed this many times, alternately, and the fastest of each
    is kept (a shared 2-core machine's noise is larger than the difference measured)."""
    work = work / "dagster-bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    source = sample_source.write_source(work / "source.duckdb", _papers(partitions, per_partition, shared_papers))
    total = partitions * per_partition
    engine_home = work / "engine-home"
    timings: dict[str, list[tuple[float, list]]] = {"engine": [], "one_run": []}

    def timed(mode: str, attempt: int) -> tuple[float, list]:
        return _timed_dagster(work / f"{mode}-{attempt}", mode, source, engine_home, env, partitions, base, adapter,
                              device, precision, concurrent_runs, pg_admin_url, redis_url)

    for attempt in range(max(repeats, 1)):
        seconds, env = _timed_embed(work / f"engine-{attempt}", source, engine_home, shared_papers, base, adapter,
                                    device, precision, warm_up=attempt == 0)
        timings["engine"].append((seconds, []))
        timings["one_run"].append(timed("one_run", attempt))
    engine_seconds = min(seconds for seconds, _ in timings["engine"])
    result = {"partitions": partitions, "papers_per_partition": per_partition, "papers": total,
              "engine_seconds": engine_seconds, "engine_papers_per_s": total / engine_seconds,
              "engine_seconds_each": [round(seconds, 2) for seconds, _ in timings["engine"]],
              "executor": "celery: 1 worker (paper-assets worker), concurrency 1; PostgreSQL instance",
              "engine": "paper-assets embed (one process: imports, model load, every range)",
              "timed": "dagster: from launching the run(s) to the last one finishing (s2_source untimed); ui_backfill: "
                       "from the GraphQL launch to the backfill's COMPLETED status"}
    for mode in ("one_run", "one_run_cold_worker", "run_per_partition", "ui_backfill"):
        seconds, phases = min(timings[mode]) if mode in timings else timed(mode, 0)
        result[mode] = {"seconds": seconds, "papers_per_s": total / seconds, "ratio": engine_seconds / seconds,
                        "overhead_seconds_per_partition": (seconds - engine_seconds) / partitions,
                        "runs": len(phases), "phases": phases[:8]}
        if mode in timings:
            result[mode]["seconds_each"] = [round(seconds, 2) for seconds, _ in timings[mode]]
    ui = result["ui_backfill"]
    # The daemon's backfill loop runs every 30 s (dagster's DEFAULT_DAEMON_INTERVAL_SECONDS, not configurable): up to
    # one interval before it submits the first run and up to one after the last run ends before it marks the
    # backfill complete, whatever the number of partitions.
    last_end = max((p["before_run_start_s"] + p["run_s"] for p in ui["phases"]), default=0.0)
    ui["daemon_wait_seconds"] = round(min(p["before_run_start_s"] for p in ui["phases"]) + ui["seconds"] - last_end,
                                      2) if ui["phases"] else None
    if ui["daemon_wait_seconds"] is not None:
        ui["overhead_seconds_per_partition_besides_daemon_wait"] = (
            (ui["seconds"] - ui["daemon_wait_seconds"] - engine_seconds) / partitions)
    result["concurrent_runs_per_partition_mode"] = concurrent_runs
    # The headline figures: the assets' backfill policy with the whole backfill in one run.
    result.update(dagster_seconds=result["one_run"]["seconds"], dagster_papers_per_s=result["one_run"]["papers_per_s"],
                  ratio=result["one_run"]["ratio"])
    return result


def _timed_dagster(work: Path, mode: str, source: Path, engine_home: Path, env: dict, partitions: int, base: str,
                   adapter: str, device: str, precision: str, concurrent_runs: int, pg_admin_url: str,
                   redis_url: str) -> float:
    python = sys.executable
    work.mkdir(parents=True)
    home = work / "dagster-home"
    Settings(home=str(home), source=str(source), base_model=base, adapter=adapter, device=device,
             precision=precision, range_width=RANGE_WIDTH).save()
    layout = ProjectHome(home)
    layout.machine_stats_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(ProjectHome(engine_home).calibration_file, layout.calibration_file)
    ranges = [range_for(p * RANGE_WIDTH, RANGE_WIDTH) for p in range(partitions)]
    keys = [rng.key for rng in ranges]
    with temporary_postgres_database(pg_admin_url) as pg_url, empty_redis_database(redis_url) as broker:
        env = {**env, variable("home"): str(home), variable("pg_url"): pg_url, variable("celery_broker"): broker,
               "DAGSTER_HOME": str(layout.dagster_home)}
        if mode.startswith("one_run"):  # the CLI's --partition-range needs the whole range in one run
            env[variable("partitions_per_run")] = "0"
        else:
            env.pop(variable("partitions_per_run"), None)
        log = work / "worker.log"
        with open(log, "w") as log_handle:
            # one_run_cold_worker: the worker loads the model in the timed run's first step, as a backfill's first
            # run on a new worker does; elsewhere it loaded it when it started, as for every later run.
            cold = mode == "one_run_cold_worker"
            worker = start_bound([python, "-m", "paper_assets.cli", "worker", "--device", device,
                                  *(["--no-preload"] if cold else [])], env=env, stdout=log_handle,
                                 stderr=subprocess.STDOUT)
            try:
                _wait_ready(worker, log, preloaded=not cold)
                dagster = [python, "-m", "dagster", "asset", "materialize", "-m", "paper_assets.definitions"]
                _run([*dagster, "--select", "s2_source"], env, "s2_source run")
                materialize = [*dagster, "--select", "papers,paper_embeddings"]
                if mode == "ui_backfill":
                    seconds, launched_at = _ui_backfill(work, env, keys)
                    phases = _phases(env, launched_at, launched_at + seconds)
                    return seconds, phases
                started, launched_at = time.perf_counter(), time.time()
                if mode.startswith("one_run"):
                    _run([*materialize, "--partition-range", f"{keys[0]}...{keys[-1]}"], env, "backfill run")
                else:
                    with ThreadPoolExecutor(concurrent_runs) as launcher:  # as the run queue starts them
                        list(launcher.map(lambda key: _run([*materialize, "--partition", key], env,
                                                           f"partition run {key}"), keys))
                seconds = time.perf_counter() - started
                phases = _phases(env, launched_at, launched_at + seconds)
            finally:
                stop_process_group(worker, timeout=60)
    rows = sum(pq.read_metadata(layout.embeddings_file(rng)).num_rows for rng in ranges)
    total = sum(pq.read_metadata(layout.papers_file(rng)).num_rows for rng in ranges)
    if rows != total or not rows:
        raise UserError(f"the Dagster runs ({mode}) embedded {rows} rows, expected {total}")
    return seconds, phases


def _ui_backfill(work: Path, env: dict, keys: list[str]) -> tuple[float, float]:
    """Seconds from asking the webserver for the backfill to its completion (the webserver and daemon start
    untimed), and the wall-clock time it was asked."""
    url = f"http://127.0.0.1:{free_port()}"
    log = work / "ui.log"
    with open(log, "w") as log_handle:
        ui = start_bound([sys.executable, "-m", "paper_assets.cli", "ui", "--port", url.rsplit(":", 1)[1]],
                         env=env, stdout=log_handle, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
    try:
        wait_until("`paper-assets ui` serving", lambda: backfill.webserver_up(url), 300, ui, log)
        started, launched_at = time.perf_counter(), time.time()
        status = backfill.wait(url, backfill.launch(url, keys, list(backfill.DEFAULT_ASSETS)), timeout=6 * 3600,
                               poll=0.5)
        seconds = time.perf_counter() - started
    finally:
        stop_process_group(ui, timeout=60)
    if status not in backfill.SUCCEEDED:
        raise UserError(f"the UI backfill ended {status}:\n{log.read_text(errors='replace')[-3000:]}")
    return seconds, launched_at


def _phases(env: dict, launched_at: float, finished_at: float) -> list[dict]:
    """Each timed run's phases (run_phases), read from the bench's instance."""
    from dagster import DagsterInstance, RunsFilter

    saved = {name: os.environ.get(name) for name in ("DAGSTER_HOME", variable("pg_url"))}
    os.environ.update({name: env[name] for name in saved})
    try:
        with DagsterInstance.get() as instance:
            runs = [r for r in instance.get_run_records(RunsFilter())
                    if r.create_timestamp.timestamp() >= launched_at]
            return [run_phases(instance, r.dagster_run.run_id, launched_at, finished_at)
                    for r in sorted(runs, key=lambda r: r.create_timestamp)]
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def print_dagster_bench(backfill: dict) -> None:
    print(f"dagster backfill of {backfill['partitions']} partitions x {backfill['papers_per_partition']} papers: "
          f"{backfill['dagster_papers_per_s']:.2f} papers/s vs paper-assets embed "
          f"{backfill['engine_papers_per_s']:.2f} papers/s ({backfill['ratio']:.2f}x)")
    for mode, what in (("one_run", "one run for the backfill"),
                       ("one_run_cold_worker", "the same on a worker that loads the model in the run"),
                       ("run_per_partition", "a run per partition"),
                       ("ui_backfill", "a UI backfill (webserver, daemon)")):
        figures = backfill[mode]
        print(f"  {what}: {figures['papers_per_s']:.2f} papers/s ({figures['ratio']:.2f}x), "
              f"{figures['overhead_seconds_per_partition']:.2f} s of overhead per partition")
    ui = backfill["ui_backfill"]
    if ui.get("daemon_wait_seconds") is not None:
        print(f"    of which {ui['daemon_wait_seconds']:.1f} s waiting for the daemon's 30 s backfill loop (once per "
              f"backfill); {ui['overhead_seconds_per_partition_besides_daemon_wait']:.2f} s per partition besides")
