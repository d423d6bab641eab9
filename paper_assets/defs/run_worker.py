"""Which process runs a run, and whether it still does.

Every run records its run worker (the process that coordinates its steps: host, pid and the pid's start, see
:mod:`paper_assets.processes`) in its tags as soon as its executor starts. :class:`MonitoredRunLauncher` is
Dagster's default run launcher plus a health check on those tags, so the daemon's run monitoring fails a run whose
worker died with the head (kill -9, OOM, a restarted machine) instead of leaving it STARTED for ever; the instance's
run retries then launch it again. Dagster's default launcher cannot check its workers
(``supports_check_run_worker_health`` is False): the Kubernetes and Docker launchers ask their container runtime,
this one asks the kernel through the recorded identity.
"""

from __future__ import annotations

import os
import socket
import time

from dagster import ExecutorDefinition, multi_or_in_process_executor
from dagster._core.launcher import DefaultRunLauncher
from dagster._core.launcher.base import CheckRunHealthResult, WorkerStatus

from ..processes import process_alive, process_start

PID_TAG, HOST_TAG, PROCESS_START_TAG = "paper_assets/pid", "paper_assets/host", "paper_assets/process_start"
# A run worker tags its run within milliseconds of the STARTED event; one that has not after this long died first.
UNTAGGED_GRACE_SECONDS = 120


def this_process_tags() -> dict[str, str]:
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname(),
            PROCESS_START_TAG: process_start(os.getpid()) or ""}


def run_worker_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process a run's tags name still runs: None where they name none, or one on another host."""
    pid = int(tags.get(PID_TAG, "0") or 0)
    if not pid or tags.get(HOST_TAG) != socket.gethostname():
        return None
    return process_alive(pid, tags.get(PROCESS_START_TAG))


def recording_run_worker(executor_def: ExecutorDefinition | None) -> ExecutorDefinition:
    """``executor_def`` (Dagster's default when None) whose executor first records its process in the run's tags."""
    inner = executor_def or multi_or_in_process_executor

    def create(init_context):
        executor = inner.executor_creation_fn(init_context)
        execute = executor.execute

        def execute_recorded(plan_context, execution_plan):
            plan_context.instance.add_run_tags(plan_context.run_id, this_process_tags())
            yield from execute(plan_context, execution_plan)

        executor.execute = execute_recorded
        return executor

    return ExecutorDefinition(name=inner.name, config_schema=inner.config_schema, requirements=inner.get_requirements,
                              executor_creation_fn=create, description=inner.description)


class MonitoredRunLauncher(DefaultRunLauncher):
    """Dagster's default run launcher (runs in a subprocess of the code server) whose run workers can be checked."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run) -> CheckRunHealthResult:
        alive = run_worker_alive(run.tags)
        if alive:
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        if alive is False:
            return CheckRunHealthResult(
                WorkerStatus.FAILED, f"its run worker (pid {run.tags[PID_TAG]} on {run.tags[HOST_TAG]}) is gone")
        if run.tags.get(PID_TAG):  # on another host: that host's own monitor, or the run's timeout, decides
            return CheckRunHealthResult(WorkerStatus.RUNNING, "run worker on another host")
        record = self._instance.get_run_record_by_id(run.run_id)
        started = record.start_time if record and record.start_time else None
        if started is not None and time.time() - started > UNTAGGED_GRACE_SECONDS:
            return CheckRunHealthResult(
                WorkerStatus.FAILED, f"its run worker never started executing ({UNTAGGED_GRACE_SECONDS} s)")
        return CheckRunHealthResult(WorkerStatus.RUNNING, "run worker starting")
