"""The Parquet schemas of papers and embeddings files, and reading vectors and file metadata back."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from .fs import HomePath, parquet_metadata

METADATA_KEY = b"paper_assets"
# Rows per checkpointed chunk: a crash redoes at most this many (minutes on a CPU, seconds on a GPU), and the
# rows in flight (queued for tokenising, being encoded) stay a few chunks, so memory does not grow with a partition.
DEFAULT_CHUNK_ROWS = 4096
EMBEDDING_ROW_GROUP = 4096  # ~12.6 MB of 768-d float32 per row group: small enough for the Hub dataset viewer

PAPERS_SCHEMA = pa.schema(
    [
        pa.field("corpusid", pa.int64(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("text_sha256", pa.string(), nullable=False),
        pa.field("text_rule", pa.string(), nullable=False),
    ]
)


def embeddings_schema(dim: int, metadata: dict | None = None) -> pa.Schema:
    schema = pa.schema(
        [
            pa.field("corpusid", pa.int64(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("text_sha256", pa.string(), nullable=False),
        ]
    )
    if metadata is not None:
        schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    return schema


def embeddings_batch(corpusids: np.ndarray, vectors: np.ndarray, hashes: pa.Array, schema: pa.Schema) -> pa.RecordBatch:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), dim)
    return pa.RecordBatch.from_arrays(
        [pa.array(corpusids, type=pa.int64()), embedding, pa.array(hashes, type=pa.string())], schema=schema
    )


def vectors_of(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """The ``embedding`` column as an (n, dim) float32 array without per-row Python objects."""
    column = table.column("embedding")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


def file_metadata(path: HomePath) -> dict:
    raw = parquet_metadata(path).metadata or {}
    return json.loads(raw.get(METADATA_KEY, b"{}"))
