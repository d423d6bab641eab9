"""The one base class of expected errors: bad input or configuration the user can fix.

The CLI prints these as ``paper-assets: error: <message>`` and exits 2 (a traceback only with ``--debug``); any
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An expected failure whose message says what is wrong and what to do about it."""
