"""Which failures are worth another try.

A step that meets a transient error in its own code (a database failover, object storage unreachable for a moment)
asks Dagster to run it again after a back-off. Every other error in the body fails the step at once and marks its run
as one that run retries must not relaunch (``dagster/retry_on_asset_or_op_failure=false``): it would fail again. A
step that fails outside its body (Dagster's own event writes while PostgreSQL restarts) leaves that tag unset, so the
instance's run retries relaunch the run."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator

from dagster import RetryRequested
from dagster._core.storage.tags import RETRY_ON_ASSET_OR_OP_FAILURE_TAG

from ..engine.errors import is_transient

STEP_RETRIES = 4
FIRST_WAIT_SECONDS = 5.0


def retry_transient_errors(body: Callable) -> Callable:
    """Decorate an asset body (its first argument is the context): a transient error becomes ``RetryRequested``
    with an exponential back-off (5, 10, 20, 40 s); the run fails only once the retries are spent."""

    if inspect.isgeneratorfunction(body):  # a body that reports partition by partition

        @functools.wraps(body)
        def run_generator(context, *args, **kwargs):
            with _retrying_transient_errors(context):
                yield from body(context, *args, **kwargs)

        return run_generator

    @functools.wraps(body)
    def run(context, *args, **kwargs):
        with _retrying_transient_errors(context):
            return body(context, *args, **kwargs)

    return run


@contextlib.contextmanager
def _retrying_transient_errors(context) -> Iterator[None]:
    try:
        yield
    except RetryRequested:
        raise
    except Exception as error:
        if not is_transient(error):
            mark_not_retriable(context)
            raise
        wait = FIRST_WAIT_SECONDS * 2 ** context.retry_number
        context.log.warning(f"transient error, retrying in {wait:.0f} s: {type(error).__name__}: {error}")
        raise RetryRequested(max_retries=STEP_RETRIES, seconds_to_wait=wait) from error


def mark_not_retriable(context) -> None:
    """Tell run retries that this run's failure is deterministic (read when the run fails). A body invoked outside a
    run (a unit test's ``build_asset_context``) has no run to mark."""
    if context.instance.get_run_by_id(context.run_id) is not None:
        context.instance.add_run_tags(context.run_id, {RETRY_ON_ASSET_OR_OP_FAILURE_TAG: "false"})
