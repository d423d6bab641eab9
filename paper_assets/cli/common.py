"""What every command shares: its error type and the Dagster instance of the home."""

from __future__ import annotations

from pathlib import Path

from ..engine.errors import UserError
from ..settings import Settings


class CommandError(UserError):
    """A command cannot run as asked (the message says why)."""


def dagster_home(settings: Settings) -> Path:
    from ..instance import prepare_dagster_home

    return prepare_dagster_home(settings)


def instance(settings: Settings):
    dagster_home(settings)
    from dagster import DagsterInstance

    return DagsterInstance.get()
