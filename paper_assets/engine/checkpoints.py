"""Chunk checkpoints of a partition being embedded."""

from __future__ import annotations

import json

import pyarrow as pa

from .fs import HomePath, atomic_parquet_writer, atomic_path, ensure_dir, read_record, remove_tree


class ChunkCheckpoints:
    """Finished chunks of a partition being embedded; a rerun redoes at most the chunk that was interrupted.

    The folder holds ``state.json`` (what the chunks were made from) and ``chunk-NNNNNN.parquet`` files. A state
    that does not match the current input or model discards every chunk.
    """

    def __init__(self, folder: HomePath, state: dict):
        self.folder = folder
        self.state = state
        stored = folder / "state.json"
        if folder.exists():
            try:
                matches = json.loads(read_record(stored)) == state
            except (OSError, ValueError):
                matches = False
            if not matches:
                remove_tree(folder)
        if not folder.exists():
            ensure_dir(folder)
            with atomic_path(stored) as tmp:
                tmp.write_text(json.dumps(state, sort_keys=True), encoding="utf-8")

    def chunk_file(self, index: int) -> HomePath:
        return self.folder / f"chunk-{index:06d}.parquet"

    def has(self, index: int) -> bool:
        return self.chunk_file(index).exists()

    def write(self, index: int, batch: pa.RecordBatch) -> None:
        with atomic_parquet_writer(self.chunk_file(index), batch.schema, compression="none") as writer:
            writer.write_batch(batch)

    def chunks(self) -> list[HomePath]:
        return sorted(self.folder.glob("chunk-*.parquet"), key=lambda p: p.name)

    def clear(self) -> None:
        remove_tree(self.folder)
