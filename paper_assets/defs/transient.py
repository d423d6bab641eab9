"""Steps that meet a transient error (a database failover, object storage unreachable for a moment) ask Dagster
to run them again after a back-off; every other error fails the step at once, as it would fail again."""

from __future__ import annotations

import functools
from collections.abc import Callable

from dagster import RetryRequested

from ..engine.errors import is_transient

STEP_RETRIES = 4
FIRST_WAIT_SECONDS = 5.0


def retry_transient_errors(body: Callable) -> Callable:
    """Decorate an asset body (its first argument is the context): a transient error becomes ``RetryRequested``
    with an exponential back-off (5, 10, 20, 40 s); the run fails only once the retries are spent."""

    @functools.wraps(body)
    def run(context, *args, **kwargs):
        try:
            return body(context, *args, **kwargs)
        except RetryRequested:
            raise
        except Exception as error:
            if not is_transient(error):
                raise
            wait = FIRST_WAIT_SECONDS * 2 ** context.retry_number
            context.log.warning(f"transient error, retrying in {wait:.0f} s: {type(error).__name__}: {error}")
            raise RetryRequested(max_retries=STEP_RETRIES, seconds_to_wait=wait) from error

    return run
