"""The one base class of expected errors: bad input or configuration the user can fix.

The CLI prints these as ``paper-assets: error: <message>`` and exits 2 (a traceback only with ``--debug``); any
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An expected failure whose message says what is wrong and what to do about it."""


# Errors that a retry a few seconds later can clear: a database failing over, object storage or a broker
# unreachable for a moment. Matched by class name along the cause chain, so the engine needs none of their clients.
TRANSIENT_ERROR_NAMES = frozenset({
    "OperationalError", "InterfaceError",  # psycopg2 / SQLAlchemy: connection lost, server restarting
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",  # botocore
    "ServerDisconnectedError", "ClientConnectorError",  # aiohttp (s3fs)
})


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is a connection-level failure rather than a wrong input."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, UserError):
            return False
        if isinstance(error, (ConnectionError, TimeoutError)) or type(error).__name__ in TRANSIENT_ERROR_NAMES:
            return True
        error = error.__cause__ or error.__context__
    return False
