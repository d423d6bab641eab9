"""The data path (read -> clean -> write papers -> tokenise, no model) on 1, 2, ... all cores of a GPU host.

usage: data_path.py TOKENIZER_DIR SOURCE_DB WORK_DIR

Each configuration runs in a fresh process pinned to its cores: tokenising in process with the word cache, in
process with the Rust tokenizer alone (its threads spread over the cores), and in worker processes (the GPU
default, ``tokenization.default_workers``). The source from ``.gpu/mkdb.py`` replicates the 2,423 real papers, so
after the first 2,423 rows the word cache has seen every word: see ``pipeline.tokenizer_on_real_papers`` in
BENCHMARKS.json for a first pass over distinct papers. The timed loop is ``benchkit.data_path``, the one
``paper-assets bench --pipeline-papers`` times.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def measure(tokenizer_dir: str, source: str, work: str, cores: int, mode: str, workers: int = 0) -> dict:
    from paper_assets.benchkit.data_path import pin_to_cores, time_data_path

    cores = pin_to_cores(cores)
    from transformers import AutoTokenizer

    from paper_assets.engine.tokenization import TextTokenizer, TokenizerPool, default_workers

    backend = AutoTokenizer.from_pretrained(tokenizer_dir).backend_tokenizer.to_str()
    tokenizer = TextTokenizer(backend, 512, word_cache=mode != "rust")
    workers = (workers or default_workers("cuda", cores)) if mode == "workers" else 0
    pool = TokenizerPool(tokenizer, workers, cores) if workers else None  # returns with every worker started
    encode = pool.encode if pool is not None else tokenizer.encode
    timing = time_data_path(Path(source), Path(work) / f"papers-{cores}-{mode}.parquet",
                            lambda texts: int(encode(texts).lengths.sum()))
    if pool is not None:
        pool.close()
    return {"cores": cores, "mode": mode, "tokenizer_workers": workers, **timing.rates()}


def main() -> None:
    tokenizer_dir, source, work = sys.argv[1:4]
    Path(work).mkdir(parents=True, exist_ok=True)
    available = len(os.sched_getaffinity(0))
    runs = [(c, "word_cache", 0) for c in sorted({1, 2, available})]
    # The default worker count (one per 4 cores) was sized for Rust workers running several threads each; the word
    # cache's workers are one Python thread each, so one per 2 cores is measured beside it.
    runs += [(available, "rust", 0), (available, "workers", 0)]
    from paper_assets.engine.tokenization import default_workers

    half = max(1, min(8, available // 2))
    runs += [(available, "workers", half)] if half != default_workers("cuda", available) else []
    results = []
    for cores, mode, workers in runs:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            result = pool.submit(measure, tokenizer_dir, source, work, cores, mode, workers).result()
        results.append(result)
        count = f" x{result['tokenizer_workers']}" if result["tokenizer_workers"] else ""
        print(f"{cores:>2} core(s), {mode:>10}{count}: "
              f"data path {result['data_path_papers_per_second']:8.0f} papers/s = "
              f"{result['data_path_papers_per_second'] / cores:7.0f} per core (read+clean+write "
              f"{result['read_clean_write_papers_per_second']:7.0f}/s, tokenise "
              f"{result['tokenise_papers_per_second']:7.0f}/s)", flush=True)
    (Path(os.environ.get("OUT", work)) / "data_path.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
