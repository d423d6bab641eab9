"""The data path timed: read -> clean -> write papers -> tokenise, no model. Shared by ``bench --pipeline-papers``
(``bench._pipeline_child``) and ``tools/gpu/data_path.py`` (a GPU host's cores), so both time the same loop.
It needs nothing beyond the runtime dependencies (a GPU host may lack the bench extras such as psutil).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..engine.fs import parquet_file
from ..engine.pipeline import build_papers
from ..engine.ranges import IdRange
from ..engine.schemas import DEFAULT_CHUNK_ROWS
from ..engine.source import inspect_source


def pin_to_cores(cores: int) -> int:
    """Restrict this process to its first ``cores`` usable cores (0: all of them) before anything tokenises: the
    Rust tokenizer sizes its thread pool from the affinity mask. Returns the number of cores it may use."""
    if cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
        os.environ["RAYON_NUM_THREADS"] = str(cores)
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class DataPathTiming:
    papers: int
    tokens: int
    build_seconds: float  # read the source, clean, write the papers file
    tokenise_seconds: float  # read the papers file back and tokenise every row

    def rates(self) -> dict:
        return {"papers": self.papers, "tokens": self.tokens,
                "data_path_papers_per_second": self.papers / (self.build_seconds + self.tokenise_seconds),
                "read_clean_write_papers_per_second": self.papers / self.build_seconds,
                "tokenise_papers_per_second": self.papers / self.tokenise_seconds,
                "tokenise_tokens_per_second": self.tokens / self.tokenise_seconds}


def time_data_path(source: Path, papers_file: Path, tokenize: Callable[[list[str]], int]) -> DataPathTiming:
    """Build ``papers_file`` from every paper of ``source``, then tokenise it chunk by chunk as ``embed`` reads it;
    ``tokenize`` tokenises (and batches) one chunk's texts and returns its number of token ids."""
    started = time.perf_counter()
    build_papers(inspect_source(source), IdRange(0, 10**12), papers_file)
    built = time.perf_counter()
    rows = tokens = 0
    for batch in parquet_file(papers_file).iter_batches(DEFAULT_CHUNK_ROWS, columns=["text"]):
        texts = batch.column("text").to_pylist()
        rows, tokens = rows + len(texts), tokens + tokenize(texts)
    return DataPathTiming(rows, tokens, built - started, time.perf_counter() - built)
