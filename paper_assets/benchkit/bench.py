"""``paper-assets bench``: the engine against a faithful re-implementation of the notebook, same process, data and
model; plus (``--pipeline-papers N``) the read -> tokenise -> embed -> write path with the tiny model at N and 10N.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow.parquet as pq
import torch

from ..demo_kit import sample_source
from ..demo_kit.tiny_model import BERT_BASE, GPU_RATE, build_model
from ..engine.calibrate import matmul_call_gflops
from ..engine.encoder import Encoder
from ..engine.errors import UserError
from ..engine.model import ModelConfig, load_model
from ..engine.pipeline import build_papers, embed_papers
from ..engine.ranges import IdRange
from ..engine.schemas import vectors_of
from ..engine.source import inspect_source
from ..settings import BENCH_DIR_VARIABLE
from . import tokenizer_bench
from .measure import (
    PeakRSS,
    best_gemm_call_gflops,
    cpu_description,
    device_name,
    flops_per_token,
    in_a_fresh_process,
    non_embedding_params,
)
from .pipeline_bench import run_pipeline
from .reference import read_reference, run_seed_recipe

T = TypeVar("T")
SHARED_PAPERS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "scirepeval_sample_papers.jsonl"


def default_source(work: Path) -> Path:
    source = work / "bench_source.duckdb"
    if not source.exists():
        if SHARED_PAPERS.exists():
            sample_source.write_source(source, sample_source.read_jsonl_papers(SHARED_PAPERS))
        else:
            sample_source.write_source(source, sample_source.generate_papers(3000, seed=7))
    return source


def _texts_of(source: Path) -> list[str]:
    import duckdb

    with duckdb.connect(str(source), read_only=True) as conn:
        return [f"{t or ''} {a or ''}" for t, a in conn.execute("SELECT title, abstract FROM papers_with_abstracts")
                .fetchall()]


STAND_INS = {"bert-base": BERT_BASE, "gpu-rate": GPU_RATE}


def benchmark_model(work: Path, source: Path, shape=BERT_BASE) -> tuple[str, str]:
    folder = work / f"model-{shape.hidden_size}x{shape.num_layers}"
    if not (folder / "adapter" / "adapter_config.json").exists():
        build_model(folder, _texts_of(source), shape=shape)
    return str(folder / "base"), str(folder / "adapter")


def _first_ids(source: Path, n: int) -> int:
    import duckdb

    with duckdb.connect(str(source), read_only=True) as conn:
        ids = conn.execute(
            "SELECT CAST(corpusid AS BIGINT) AS id FROM papers_with_abstracts ORDER BY corpusid LIMIT ?", [n]
        ).fetchall()
    return int(max(i[0] for i in ids))


def run_pair(options: BenchOptions, source: Path, base: str, adapter: str, work: Path) -> dict:
    """The notebook's loop and the engine on the first ``options.papers`` papers of ``source``: speed, fidelity,
    and the engine's share of this device's measured GEMM rate."""
    papers, info = options.papers, inspect_source(source)
    torch.manual_seed(0)
    if info.id_type != "integer":
        raise SystemExit("bench needs an integer corpusid source (the notebook orders by corpusid as text otherwise)")
    last_id = _first_ids(source, papers)
    reference_model, engine_model, encoder = _warm_models(options, base, adapter, work)
    ref_db = work / "reference.duckdb"
    ref_db.unlink(missing_ok=True)
    with PeakRSS() as ref_rss:
        t0 = time.perf_counter()
        ref_stats = run_seed_recipe(str(source), reference_model.tokenizer, reference_model.model,
                                    reference_model.device, ref_db, limit=papers)
        ref_seconds = time.perf_counter() - t0
    ref_ids, ref_vectors = read_reference(ref_db)

    papers_file, out = work / "papers.parquet", work / "embeddings.parquet"
    with PeakRSS() as eng_rss:
        t0 = time.perf_counter()
        papers_report = build_papers(info, IdRange(0, last_id), papers_file, sep_token=encoder.tokenizer.sep_token)
        report = embed_papers(papers_file, out, encoder, work / "checkpoints", chunk_rows=2048)
        eng_seconds = time.perf_counter() - t0
    fidelity, eng_vectors = _fidelity(ref_ids, ref_vectors, out, papers_file)
    # The same papers again, in memory, once every batch shape has been seen: what a long run settles at, once
    # oneDNN's per-shape kernels (~20 ms per new shape on AMX) and the allocator's blocks exist.
    all_texts = pq.read_table(papers_file, columns=["text"]).column("text").to_pylist()
    t0 = time.perf_counter()
    encoder.encode(all_texts)
    warm_seconds = time.perf_counter() - t0

    composition = _batch_composition_cosine_min(encoder, engine_model, all_texts)
    flops = _flops(engine_model, report, ref_stats, ref_seconds, eng_seconds, warm_seconds, work)
    ref_rate, eng_rate = papers / ref_seconds, report.rows / eng_seconds
    return {
        "papers": papers,
        "device": device_name(engine_model.device),
        "reference": {"papers_per_second": ref_rate, "seconds": ref_seconds,
                      "tokens_per_second": ref_stats["real_tokens"] / ref_seconds,
                      "token_efficiency": ref_stats["real_tokens"] / ref_stats["padded_tokens"],
                      "peak_rss_mb": ref_rss.peak / 2**20, "precision": "fp32", "batch": "64 unsorted"},
        "engine": {"papers_per_second": eng_rate, "seconds": eng_seconds,
                   "tokens_per_second": report.encode.real_tokens / eng_seconds,
                   "token_efficiency": report.encode.token_efficiency, "peak_rss_mb": eng_rss.peak / 2**20,
                   "precision": engine_model.precision, "compile": encoder.compiled,
                   "attn_implementation": engine_model.config.attn_implementation,
                   "second_pass_papers_per_second": len(all_texts) / warm_seconds,
                   "second_pass_utilisation_of_matmul_peak": flops.pop("second_pass_utilisation"),
                   "token_budget": encoder.token_budget,
                   "rows": report.rows, "skipped_no_text": sum(papers_report.skipped.values()),
                   "cpu_calibration": flops.pop("calibration")},
        "speedup": eng_rate / ref_rate,
        "fidelity": {**fidelity, "non_finite": int((~np.isfinite(eng_vectors)).sum()),
                     "batch_composition_cosine_min": composition},
        "model": {"base": base, "adapter": adapter, "parameters": engine_model.num_parameters,
                  "layers": engine_model.num_layers, "hidden": engine_model.hidden_size,
                  "fingerprint": engine_model.fingerprint},
        "flops": flops,
    }


def _warm_models(options: BenchOptions, base: str, adapter: str, work: Path):
    """The notebook's model (fp32, the full forward) and the engine's (CLS row only in the last layer, the options'
    precision and compile), each run once on a few texts so one-time costs (allocator, compile) are not timed."""
    reference_model = load_model(ModelConfig(base_model=base, adapter=adapter, precision="fp32", device=options.device,
                                             cls_only_last_layer=False))
    engine_model = load_model(ModelConfig(base_model=base, adapter=adapter, precision=options.precision,
                                          device=options.device, compile=options.compile,
                                          token_budget=options.token_budget,
                                          attn_implementation=options.attn_implementation,
                                          calibration_file=str(work / "calibration.json")))
    encoder = Encoder(engine_model, token_budget=options.token_budget)
    warm = ["warm up [SEP] " + "word " * 200] * 8
    encoder.encode(warm)
    from .reference import embed_batch

    embed_batch(warm, reference_model.tokenizer, reference_model.model, reference_model.device)
    return reference_model, engine_model, encoder


def _fidelity(ref_ids: np.ndarray, ref_vectors: np.ndarray, out: Path, papers_file: Path) -> tuple[dict, np.ndarray]:
    """Per-row cosine of the engine's vectors against the notebook's, on the papers with title and abstract (the
    notebook's text rule differs for the others); and the engine's vectors."""
    table = pq.read_table(out)
    eng_ids = table.column("corpusid").to_numpy()
    eng_vectors = vectors_of(table)
    rules = pq.read_table(papers_file, columns=["corpusid", "text_rule"])
    full_text = set(np.asarray(rules.column("corpusid"))[np.asarray(rules.column("text_rule")) == "title_abstract"])
    common = np.array(sorted(set(ref_ids) & set(eng_ids) & full_text), dtype=np.int64)
    ref_pos = {v: i for i, v in enumerate(ref_ids)}
    eng_pos = {v: i for i, v in enumerate(eng_ids)}
    a = ref_vectors[[ref_pos[i] for i in common]].astype(np.float64)
    b = eng_vectors[[eng_pos[i] for i in common]].astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    centre = a.mean(axis=0)
    ca, cb = a - centre, b - centre
    centred = (ca * cb).sum(1) / (np.linalg.norm(ca, axis=1) * np.linalg.norm(cb, axis=1))
    shuffled = a[np.random.default_rng(0).permutation(len(a))]
    between_papers = (a * shuffled).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(shuffled, axis=1))
    return {"rows_compared": int(len(common)), "cosine_min": float(cos.min()),
            "cosine_p0_1": float(np.percentile(cos, 0.1)), "cosine_median": float(np.median(cos)),
            "centred_cosine_min": float(centred.min()),
            "cosine_between_different_papers_median": float(np.median(between_papers))}, eng_vectors


def _batch_composition_cosine_min(encoder: Encoder, engine_model, texts: list[str]) -> float:
    """The same papers embedded alone and in other company must agree: the lowest cosine between the two."""
    texts = texts[:48]
    alone = np.stack([encoder.encode([t])[0] for t in texts[:16]])
    mixed = Encoder(engine_model, token_budget=4096).encode(list(reversed(texts)))[::-1][:16]
    return float(((alone * mixed).sum(1) / (np.linalg.norm(alone, axis=1) * np.linalg.norm(mixed, axis=1))).min())


def _flops(engine_model, report, ref_stats: dict, ref_seconds: float, eng_seconds: float, warm_seconds: float,
           work: Path) -> dict:
    """FLOP rates of both sides against the GEMM rates measured on this device in this run (and the best GEMM call
    the CPU's calibration timed)."""
    mean_seq = report.encode.real_tokens / max(report.rows, 1)
    shape = (non_embedding_params(engine_model.model), engine_model.num_layers, engine_model.hidden_size, mean_seq)
    full_fpt = flops_per_token(*shape)
    fpt = flops_per_token(*shape, cls_only_last_layer=engine_model.cls_only_last_layer)
    engine_gflops = fpt * report.encode.real_tokens / eng_seconds / 1e9
    # Useful FLOPs only (real tokens): what the notebook achieves (the full forward), what the engine runs, and
    # what the engine could reach at the GEMM peak.
    reference_gflops = full_fpt * ref_stats["real_tokens"] / ref_seconds / 1e9
    # The GEMM's best call is the peak the shares are against; its median call shows what a shared VM sustains.
    fp32_calls = matmul_call_gflops(torch.float32, engine_model.device)
    engine_calls = (fp32_calls if engine_model.dtype == torch.float32
                    else matmul_call_gflops(engine_model.dtype, engine_model.device))
    peak_fp32, peak_engine = max(fp32_calls), max(engine_calls)
    median_engine = float(np.median(engine_calls))
    calibration_file = work / "calibration.json"
    calibration = json.loads(calibration_file.read_text()) if calibration_file.exists() else None
    best_call = best_gemm_call_gflops(calibration, engine_model.precision)
    return {"per_token_estimate": fpt, "per_token_full_forward": full_fpt,
            "engine_computes_cls_only_in_last_layer": engine_model.cls_only_last_layer,
            "engine_gflops_per_second": engine_gflops,
            "engine_full_forward_equivalent_gflops_per_second": engine_gflops * full_fpt / fpt,
            "reference_gflops_per_second": reference_gflops, "mean_tokens_per_paper": mean_seq,
            "matmul_peak_gflops_fp32": peak_fp32, "matmul_peak_gflops_engine_precision": peak_engine,
            "engine_utilisation_of_matmul_peak": engine_gflops / peak_engine,
            "matmul_median_call_gflops_engine_precision": median_engine,
            "engine_utilisation_of_median_matmul_call": engine_gflops / median_engine,
            "speedup_ceiling_at_matmul_peak": peak_engine / reference_gflops * full_fpt / fpt,
            "best_gemm_call_gflops_in_calibration": best_call,
            "engine_utilisation_of_best_gemm_seen": engine_gflops / max(best_call or 0.0, peak_engine),
            "note": "utilisation of the FLOPs the engine runs, against a GEMM measured on this device in "
                    "this run; the notebook runs the full forward (per_token_full_forward)",
            "second_pass_utilisation": fpt * report.encode.real_tokens / warm_seconds / 1e9 / peak_engine,
            "calibration": calibration}



def _print(result: dict) -> None:
    if "reference" in result:
        ref, eng, fid = result["reference"], result["engine"], result["fidelity"]
        print(f"device: {result['device']}")
        print(f"papers: {result['papers']}  model: {result['model']['layers']} layers x {result['model']['hidden']} "
              f"({result['model']['parameters'] / 1e6:.1f}M params)")
        print(f"reference (notebook): {ref['papers_per_second']:8.2f} papers/s  {ref['tokens_per_second']:9.1f} tok/s  "
              f"token efficiency {ref['token_efficiency']:.3f}  peak RSS {ref['peak_rss_mb']:.0f} MB")
        print(f"engine ({eng['precision']}, {eng['attn_implementation']}): {eng['papers_per_second']:8.2f} papers/s  "
              f"{eng['tokens_per_second']:9.1f} tok/s  token efficiency {eng['token_efficiency']:.3f}  "
              f"peak RSS {eng['peak_rss_mb']:.0f} MB")
        print(f"speedup: {result['speedup']:.2f}x")
        print(f"fidelity over {fid['rows_compared']} rows: cosine min {fid['cosine_min']:.6f}  "
              f"p0.1 {fid['cosine_p0_1']:.6f}  centred min {fid['centred_cosine_min']:.6f}  "
              f"(different papers: median {fid['cosine_between_different_papers_median']:.4f})  "
              f"batch-composition min {fid['batch_composition_cosine_min']:.6f}  non-finite {fid['non_finite']}")
        flops = result["flops"]
        print(f"estimated {flops['engine_gflops_per_second']:.1f} GFLOP/s ({flops['per_token_estimate'] / 1e6:.1f} "
              f"MFLOP/token run; the full forward {flops['per_token_full_forward'] / 1e6:.1f}) = "
              f"{flops['engine_utilisation_of_matmul_peak']:.0%} of a {eng['precision']} GEMM on this "
              f"device ({flops['matmul_peak_gflops_engine_precision']:.0f} GFLOP/s; fp32 "
              f"{flops['matmul_peak_gflops_fp32']:.0f}); notebook {flops['reference_gflops_per_second']:.1f} useful "
              f"GFLOP/s: running the engine's FLOPs at that GEMM rate would be "
              f"{flops['speedup_ceiling_at_matmul_peak']:.1f}x")
        print(f"  the same GEMM's median call ran at {flops['matmul_median_call_gflops_engine_precision']:.0f} GFLOP/s "
              f"(the engine: {flops['engine_utilisation_of_median_matmul_call']:.0%} of that)")
        best_call = flops.get("best_gemm_call_gflops_in_calibration")
        if best_call and best_call > 1.2 * flops["matmul_peak_gflops_engine_precision"]:
            print(f"  (the CPU calibration's fastest {eng['precision']} GEMM call ran at {best_call:.0f} GFLOP/s: this "
                  f"machine's speed varies; against that the engine is at "
                  f"{flops['engine_utilisation_of_best_gemm_seen']:.0%})")
        print(f"engine, second pass over the same papers in memory (every batch shape seen): "
              f"{eng['second_pass_papers_per_second']:.2f} papers/s = "
              f"{eng['second_pass_utilisation_of_matmul_peak']:.0%} of the GEMM")
    if "pipeline" in result:
        for run in result["pipeline"]["runs"]:
            print(f"pipeline {run['papers']:>8,} papers: data path (read+clean+write+tokenise) "
                  f"{run['data_path_papers_per_second']:8.1f} papers/s = read+clean+write "
                  f"{run['read_clean_write_papers_per_second']:8.1f}/s then tokenise "
                  f"{run['tokenise_papers_per_second']:8.1f}/s ({run['tokenise_tokens_per_second'] / 1e3:.0f}k tok/s); "
                  f"with the model: {run['end_to_end_papers_per_second']:8.1f} papers/s end to end; "
                  f"peak RSS {run['peak_rss_mb']:.0f} MB")
        print(f"peak RSS ratio 10x papers: {result['pipeline']['rss_ratio_10x']:.3f}")
        for run in result["pipeline"]["data_path_by_cores"]:
            print(f"data path on {run['cores']} core(s), {run['papers']:,} papers: "
                  f"{run['data_path_papers_per_second']:8.1f} papers/s = "
                  f"{run['data_path_papers_per_second'] / run['cores']:8.1f} per core (read+clean+write "
                  f"{run['read_clean_write_papers_per_second']:8.1f}/s, "
                  f"tokenise {run['tokenise_papers_per_second']:8.1f}/s)")
        if "tokenizer_on_real_papers" in result["pipeline"]:
            tokenizer_bench.print_result(result["pipeline"]["tokenizer_on_real_papers"])
        run = result["pipeline"]["data_path_with_tokenizer_workers"]
        print(f"data path on {run['cores']} core(s), tokenised by {run['tokenizer_workers']} worker process(es): "
              f"{run['data_path_papers_per_second']:8.1f} papers/s "
              f"(tokenise {run['tokenise_papers_per_second']:8.1f}/s)")


@dataclass(frozen=True)
class BenchOptions:
    """What `paper-assets bench` measures; every figure of BENCHMARKS.md comes from one of these runs."""

    source: str | None = None  # default: ../shared/data papers, else generated ones
    base_model: str | None = None  # default: a BERT-base-shaped stand-in built offline
    adapter: str | None = None
    papers: int = 256  # engine vs the notebook's loop on this many papers (0: skip)
    precision: str = "auto"
    compile: str | bool = "auto"  # auto: on CUDA
    token_budget: int = 0
    attn_implementation: str = "sdpa"  # the engine's; the notebook reference always runs sdpa
    device: str = "auto"  # as in production: the GPU where there is one
    json: str | None = None
    pipeline_papers: int = 0  # data path and RSS at N and 10N papers (0: skip)
    release_rows: int = 0  # release-following costs on a synthetic source of this many rows (0: skip)
    dagster_partitions: int = 0  # the same papers through Dagster partition runs vs `embed` (0: skip)
    dagster_papers_per_partition: int = 2000
    retrieval: bool = False  # nDCG@10 on ../shared/data with trained weights: notebook, engine fp32/bf16, index
    novelty_papers: int = 0  # novelty backfill vs the authors' month-by-month loop on this many papers (0: skip)
    stand_in: str = "bert-base"  # the offline stand-in's shape where no model is given: bert-base | gpu-rate
    novelty_months: int = 24
    novelty_every: int = 1  # > 1: only the default search, timed on every novelty_every-th month
    corpus_papers: int = 0  # the whole job on a synthetic S2-shaped source of this many papers, and a tenth (0: skip)
    corpus_until: str = "catalog_queries"  # the last stage of the whole job the corpus bench runs


def bench_dir() -> Path:
    """Where the bench keeps its source, stand-in models and calibration between runs (created here); the tools in
    ``tools/`` read the same folder."""
    work = Path(os.environ.get(BENCH_DIR_VARIABLE) or Path(tempfile.gettempdir()) / "paper_assets_bench")
    work.mkdir(parents=True, exist_ok=True)
    return work


def run_benchmark(options: BenchOptions) -> int:
    missing = [name for name in ("pandas", "psutil") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"paper-assets bench needs {', '.join(missing)}: pip install 'paper_assets[bench]'")
    work = bench_dir()
    result: dict = {"machine": {**cpu_description(), "cores": os.cpu_count(),
                                "torch": torch.__version__, "threads": torch.get_num_threads()}}
    if options.papers > 0:
        source = Path(options.source) if options.source else default_source(work)
        if options.base_model and options.adapter:
            base, adapter = options.base_model, options.adapter
        else:
            base, adapter = benchmark_model(work, source, STAND_INS[options.stand_in])
        result.update(run_pair(options, source, base, adapter, work))
    if options.pipeline_papers:
        result["pipeline"] = run_pipeline(options.pipeline_papers, work)
        if SHARED_PAPERS.exists():
            result["pipeline"]["tokenizer_on_real_papers"] = in_a_fresh_process(tokenizer_bench.measure,
                                                                              str(SHARED_PAPERS), str(work))
    _print(result)
    if options.release_rows:
        from .releases import print_release_bench, run_release_bench

        result["releases"] = run_release_bench(options.release_rows, work)
        print_release_bench(result["releases"])
    if options.dagster_partitions:
        from .dagster_bench import print_dagster_bench, run_dagster_bench

        if options.base_model and options.adapter:
            base, adapter = options.base_model, options.adapter
        else:
            base, adapter = benchmark_model(work, default_source(work), STAND_INS[options.stand_in])
        backfill = run_dagster_bench(options.dagster_partitions, options.dagster_papers_per_partition, work, base,
                                     adapter, options.device, options.precision, SHARED_PAPERS)
        result["dagster_backfill"] = backfill
        result["dagster_papers_per_s"] = backfill["dagster_papers_per_s"]
        result["engine_papers_per_s"] = backfill["engine_papers_per_s"]
        print_dagster_bench(backfill)
    if options.retrieval:
        from .retrieval import run as run_retrieval

        if not SHARED_PAPERS.exists():
            raise UserError(f"bench --retrieval needs the SciRepEval samples in {SHARED_PAPERS.parent}")
        print(f"retrieval quality on {SHARED_PAPERS.parent} (trained MiniLM weights in SPECTER2's architecture):")
        result["retrieval"] = run_retrieval(SHARED_PAPERS.parent, work, options.device)
    if options.novelty_papers:
        from .novelty_sampled import novelty_report

        key, result[key] = novelty_report(options.novelty_papers, options.novelty_months, options.novelty_every)
    if options.corpus_papers:
        from .corpus_bench import print_corpus, run_corpus

        result["corpus"] = run_corpus(options.corpus_papers, work, until=options.corpus_until)
        print_corpus(result["corpus"])
    if options.json:
        write_results(Path(options.json), result)
    return 0


def write_results(path: Path, result: dict) -> None:
    """The run's results into ``path``: an existing JSON object keeps the keys this run did not produce (the
    entries BENCHMARKS.json keeps for other machines and benches)."""
    kept = json.loads(path.read_text(encoding="utf-8")) if path.exists() and path.stat().st_size else {}
    if not isinstance(kept, dict):
        raise UserError(f"{path} holds JSON that is not an object; bench --json writes its results into an object")
    path.write_text(json.dumps({**kept, **result}, indent=1) + "\n", encoding="utf-8")
