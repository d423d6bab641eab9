"""The data path and memory benchmark (``paper-assets bench --pipeline-papers N``): read -> clean -> write papers ->
tokenise -> embed with the smallest model of the architecture, at N and 10N papers, in fresh processes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ..demo_kit import sample_source
from ..demo_kit.tiny_model import PIPELINE, build_model
from ..engine.encoder import Encoder
from ..engine.model import ModelConfig, load_model
from ..engine.pipeline import embed_papers
from .data_path import pin_to_cores, time_data_path
from .measure import PeakRSS, in_a_fresh_process


def pipeline_source(n: int, work: Path) -> Path:
    return work / f"pipeline-{n}.duckdb"


def _write_pipeline_source(n: int, work: str) -> None:
    source = pipeline_source(n, Path(work))
    if not source.exists():
        sample_source.write_source(source, sample_source.generate_papers(n, seed=3, id_gap=40))


def _pipeline_child(n: int, work: str, cores: int = 0, data_path_only: bool = False,
                    tokenizer_workers: int = 0) -> dict:
    cores = pin_to_cores(cores)
    torch.set_num_threads(cores)
    work_dir = Path(work)
    source = pipeline_source(n, work_dir)
    if not source.exists():
        raise FileNotFoundError(f"{source}: run_pipeline writes it in a process of its own before measuring")
    base, adapter = str(work_dir / "pipeline-model" / "base"), str(work_dir / "pipeline-model" / "adapter")
    encoder = Encoder(load_model(ModelConfig(base_model=base, adapter=adapter, precision="fp32", device="cpu",
                                             tokenizer_workers=tokenizer_workers)))
    papers, out, checkpoints = (work_dir / f"{stem}-{n}" for stem in ("papers", "embeddings", "checkpoints"))
    with PeakRSS() as rss:  # sampled: ru_maxrss would carry the parent's peak across fork + exec
        timing = time_data_path(source, papers.with_suffix(".parquet"),
                                lambda texts: int(encoder.tokenize(texts).offsets[-1]))
        data_path = {"cores": cores, **timing.rates()}
        if data_path_only:
            encoder.close()
            return {**data_path, "tokenizer_workers": tokenizer_workers}
        started = time.perf_counter()
        report = embed_papers(papers.with_suffix(".parquet"), out.with_suffix(".parquet"), encoder, checkpoints)
        embed_seconds = time.perf_counter() - started
    return {**data_path, "embed_stage_papers_per_second": report.rows / embed_seconds,
            "forward_seconds": report.encode.forward_seconds,
            "end_to_end_papers_per_second": n / (timing.build_seconds + embed_seconds), "peak_rss_mb": rss.peak / 2**20}


def run_pipeline(n: int, work: Path) -> dict:
    model_dir = work / "pipeline-model"
    if not (model_dir / "adapter" / "adapter_config.json").exists():
        build_model(model_dir, [p["title"] + " " + (p["abstract"] or "") for p in sample_source.generate_papers(500)],
                    shape=PIPELINE)
    for count in (n, 10 * n):  # in a process of its own: the papers generated in memory would stay in the
        # measured process's heap and raise its peak RSS by the source's size (1.34 instead of 1.07 on Zen 4)
        in_a_fresh_process(_write_pipeline_source, count, str(work))
    results = [in_a_fresh_process(_pipeline_child, count, str(work)) for count in (n, 10 * n)]
    available = len(os.sched_getaffinity(0))
    by_cores = [in_a_fresh_process(_pipeline_child, n, str(work), cores, True) for cores in sorted({1, available})]
    # The same data path with the tokenisation in one worker process per core (the GPU hosts' default).
    with_workers = in_a_fresh_process(_pipeline_child, n, str(work), available, True, available)
    return {"runs": results, "rss_ratio_10x": results[1]["peak_rss_mb"] / results[0]["peak_rss_mb"],
            "data_path_by_cores": by_cores, "data_path_with_tokenizer_workers": with_workers,
            "data_path_papers_per_second_per_core": {str(r["cores"]): r["data_path_papers_per_second"] / r["cores"]
                                                     for r in by_cores},
            "model": f"pipeline {PIPELINE}"}
