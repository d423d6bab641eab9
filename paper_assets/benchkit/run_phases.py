"""Where a Dagster run's seconds go, read from its event log: before the run started (process start, imports,
definitions, run creation), each step (queued on the worker, started, the body, the events after it), between the
steps (the coordinator's polling and hand-off) and after the last step (run end, process exit)."""

from __future__ import annotations

from dagster import DagsterEventType, DagsterInstance

_STEP_END = {DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE, DagsterEventType.STEP_SKIPPED}
_RUN_END = {DagsterEventType.RUN_SUCCESS, DagsterEventType.RUN_FAILURE, DagsterEventType.RUN_CANCELED}


def run_phases(instance: DagsterInstance, run_id: str, launched_at: float, finished_at: float) -> dict:
    """Seconds per phase of one run; ``launched_at``/``finished_at`` are wall-clock times (``time.time()``) of the
    command that launched it and of its return."""
    # Planned-materialisation events carry a step key but are written when the run starts, not by its step.
    entries = [e for e in instance.all_logs(run_id) if e.dagster_event is not None
               and not e.dagster_event.event_type.value.endswith("_PLANNED")]
    first_of: dict[tuple[str | None, DagsterEventType], float] = {}
    last_of_step: dict[str, float] = {}
    for entry in entries:
        kind = entry.dagster_event.event_type
        first_of.setdefault((entry.step_key, kind), entry.timestamp)
        if entry.step_key:
            last_of_step[entry.step_key] = max(last_of_step.get(entry.step_key, 0.0), entry.timestamp)
    run_start = first_of.get((None, DagsterEventType.RUN_START), launched_at)
    run_end = min((ts for (step, kind), ts in first_of.items() if step is None and kind in _RUN_END),
                  default=finished_at)
    steps = {}
    for step in sorted(last_of_step, key=lambda s: min(ts for (k, _), ts in first_of.items() if k == s)):
        events = [ts for (k, _), ts in first_of.items() if k == step]
        submitted = min(events)
        started = first_of.get((step, DagsterEventType.STEP_START), submitted)
        ended = min((ts for (k, kind), ts in first_of.items() if k == step and kind in _STEP_END),
                    default=last_of_step[step])
        steps[step] = {"queued_s": round(started - submitted, 3), "body_s": round(ended - started, 3),
                       "span_s": round(last_of_step[step] - submitted, 3),
                       "events": sum(1 for e in entries if e.step_key == step)}
    in_steps = _union_seconds([(min(ts for (k, _), ts in first_of.items() if k == s), last_of_step[s])
                               for s in last_of_step])
    reported = [e.dagster_event.event_specific_data.materialization.metadata for e in entries
                if e.dagster_event.event_type == DagsterEventType.ASSET_MATERIALIZATION]
    figures = {name: round(sum(float(m[name].value) for m in reported if name in m), 3)
               for name in ("seconds", "model_load_seconds")}
    return {"before_run_start_s": round(run_start - launched_at, 3),
            "materializations": len(reported),
            "embedding_seconds_in_metadata": figures["seconds"],
            "model_load_seconds_in_metadata": figures["model_load_seconds"],
            "steps": steps,
            "outside_steps_in_run_s": round(max(run_end - run_start - in_steps, 0.0), 3),
            "after_run_end_s": round(finished_at - run_end, 3),
            "run_s": round(run_end - run_start, 3)}


def _union_seconds(spans: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total
