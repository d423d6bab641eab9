"""The ``warehouse.duckdb`` catalog: views over the Parquet partitions, written by one process at a time."""

from __future__ import annotations

from dagster_duckdb import DuckDBResource

from ..engine.catalog import refresh_catalog
from ..engine.home import ProjectHome


def refresh(catalog: DuckDBResource, home: ProjectHome) -> list[str]:
    with home.lock("catalog"), catalog.get_connection() as conn:
        return refresh_catalog(conn, home)
