"""The DuckDB catalog's views over the home's Parquet files."""

from __future__ import annotations

from .fs import parquet_schema
from .home import ProjectHome


def refresh_catalog(conn, home: ProjectHome) -> list[str]:
    """(Re)create the ``papers``, ``embeddings`` and ``paper_novelty`` views over the Parquet files; return the views
    made.

    The views use globs, so new partitions appear without a refresh; a refresh is only needed for the first file.
    On an object-storage home the views read ``s3://`` paths: a connection needs
    :meth:`ProjectHome.register_filesystem` before it queries them.
    """
    home.register_filesystem(conn)
    made = []
    for view, folder, prefix in (
        ("papers", home.papers_dir, "papers"),
        ("embeddings", home.embeddings_dir, "embeddings"),
        ("paper_novelty", home.novelty_dir, "novelty"),
    ):
        files = sorted(folder.glob(f"{prefix}-*.parquet"), key=lambda p: p.name)
        if files:
            pattern = str(folder / f"{prefix}-*.parquet").replace("'", "''")
            columns = "*"
            if view == "embeddings":
                # Parquet has no fixed-size list: cast back to ARRAY so array_cosine_similarity & co. work.
                dim = parquet_schema(files[0]).field("embedding").type.list_size
                columns = f"corpusid, embedding::FLOAT[{int(dim)}] AS embedding, text_sha256"
            conn.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT {columns} FROM read_parquet('{pattern}')")
            made.append(view)
        else:
            conn.execute(f"DROP VIEW IF EXISTS {view}")
    return made
