"""The ``warehouse.duckdb`` catalog: views over the Parquet partitions, written by one process at a time."""

from __future__ import annotations

from dagster_duckdb import DuckDBResource

from ..engine.storage import ProjectHome, refresh_catalog


def refresh(catalog: DuckDBResource, home: ProjectHome) -> list[str]:
    with home.lock("catalog"), catalog.get_connection() as conn:
        return refresh_catalog(conn, home)
