import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from paper_assets.engine.schemas import file_metadata
from paper_assets.engine.text import paper_texts

from .conftest import REPO, make_source


def cli(*args, env=None, timeout=600):
    out = subprocess.run([sys.executable, "-m", "paper_assets.cli", *args], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, **(env or {})), timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("id_type", ["VARCHAR", "BIGINT"])
def test_embed_command_on_integer_and_varchar_sources(tmp_path, tiny_model, generated_papers, id_type):
    base, adapter = tiny_model
    papers = generated_papers[:80] + [{"corpusid": 5_000_123, "title": "Title only", "abstract": None}]
    src = make_source(tmp_path / "s.duckdb", papers, id_type)
    out = tmp_path / "out"
    cli("embed", "--source", str(src), "--out", str(out), "--base-model", base, "--adapter", adapter,
        "--device", "cpu", "--precision", "fp32", env={"PAPER_ASSETS_HOME": str(tmp_path / "h")})
    files = sorted(out.glob("embeddings-*.parquet"))
    assert [f.name for f in files][-1] == "embeddings-005000000-005999999.parquet"
    table = pa.concat_tables(pq.read_table(f) for f in files)
    assert table.num_rows == 81 and table.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    assert sorted(table.column("corpusid").to_pylist()) == sorted(int(p["corpusid"]) for p in papers)
    model_meta = file_metadata(files[0])["model"]
    assert model_meta["precision"] == "fp32" and model_meta["attn_implementation"] == "sdpa"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # work files cleaned up


def test_embed_command_single_range(tmp_path, tiny_model, generated_papers):
    base, adapter = tiny_model
    src = make_source(tmp_path / "s.duckdb", generated_papers[:50])
    ids = sorted(p["corpusid"] for p in generated_papers[:50])
    cli("embed", "--source", str(src), "--out", str(tmp_path / "o"), "--base-model", base, "--adapter", adapter,
        "--range", f"{ids[10]}-{ids[19]}", env={"PAPER_ASSETS_HOME": str(tmp_path / "h")})
    (only,) = (tmp_path / "o").glob("*.parquet")
    assert pq.read_table(only).column("corpusid").to_pylist() == ids[10:20]


def test_papers_are_prefetched_in_a_lower_priority_process():
    from paper_assets.cli import PREFETCH_NICENESS, papers_prefetcher

    with papers_prefetcher() as prefetch:
        child_niceness, child_pid = prefetch.submit(os.nice, 0).result(), prefetch.submit(os.getpid).result()
    assert child_pid != os.getpid()
    assert child_niceness == min(19, os.nice(0) + PREFETCH_NICENESS)


def test_bench_command_reports_every_figure(tmp_path, tiny_model, generated_papers):
    base, adapter = tiny_model
    src = make_source(tmp_path / "s.duckdb", generated_papers[:120])
    report = tmp_path / "bench.json"
    report.write_text(json.dumps({"novelty_300k_zen5": {"commit": "abc"}, "papers": 5}))  # entries of other runs
    stdout = cli("bench", "--source", str(src), "--base-model", base, "--adapter", adapter, "--papers", "96",
                 "--precision", "fp32", "--json", str(report), env={"PAPER_ASSETS_BENCH_DIR": str(tmp_path / "b")})
    result = json.loads(report.read_text())
    assert "speedup" in stdout and result["papers"] == 96 and result["novelty_300k_zen5"] == {"commit": "abc"}
    for side in ("reference", "engine"):
        for key in ("papers_per_second", "tokens_per_second", "token_efficiency", "peak_rss_mb"):
            assert result[side][key] > 0
    fidelity = result["fidelity"]
    assert fidelity["non_finite"] == 0 and fidelity["rows_compared"] > 80
    assert fidelity["cosine_min"] >= 0.99999 and fidelity["batch_composition_cosine_min"] >= 0.99999
    assert result["engine"]["token_efficiency"] > result["reference"]["token_efficiency"]
    flops = result["flops"]
    assert flops["per_token_estimate"] > 0 and flops["matmul_peak_gflops_fp32"] > 0
    assert flops["matmul_peak_gflops_engine_precision"] == flops["matmul_peak_gflops_fp32"]  # fp32 run
    # The engine runs the last layer on the CLS row only: fewer FLOPs than the notebook's full forward.
    assert flops["engine_computes_cls_only_in_last_layer"]
    assert flops["per_token_estimate"] < flops["per_token_full_forward"]
    assert flops["speedup_ceiling_at_matmul_peak"] == pytest.approx(
        flops["matmul_peak_gflops_fp32"] / flops["reference_gflops_per_second"]
        * flops["per_token_full_forward"] / flops["per_token_estimate"])
    assert "GEMM on this device" in stdout and result["machine"]["cores"] >= 1
    assert result["engine"]["second_pass_papers_per_second"] > 0 and "second pass" in stdout
    assert result["engine"]["second_pass_utilisation_of_matmul_peak"] > 0
    assert result["engine"]["attn_implementation"] == "sdpa"
    assert flops["engine_utilisation_of_best_gemm_seen"] <= flops["engine_utilisation_of_matmul_peak"]
    assert 0 < flops["matmul_median_call_gflops_engine_precision"] <= flops["matmul_peak_gflops_engine_precision"]
    assert flops["engine_utilisation_of_median_matmul_call"] >= flops["engine_utilisation_of_matmul_peak"]
    assert "median call" in stdout


def test_bench_refuses_to_write_its_results_over_json_that_is_not_an_object(tmp_path):
    from paper_assets.benchkit.bench import write_results
    from paper_assets.engine.errors import UserError

    report = tmp_path / "bench.json"
    report.write_text("[1, 2]")
    with pytest.raises(UserError, match="not an object"):
        write_results(report, {"papers": 1})
    assert report.read_text() == "[1, 2]"


def test_bench_pipeline_reports_the_data_path_and_memory_of_processes_that_did_not_build_their_source(tmp_path):
    """`bench --pipeline-papers N`: N and 10N papers each in a fresh process, data path on 1..all cores; the sources
    are written by a process of their own (generated papers left in the measured heap inflated its peak RSS), and a
    measured process that fails is an error, not a hang."""
    from paper_assets.benchkit.pipeline_bench import _pipeline_child, pipeline_source, run_pipeline
    from paper_assets.engine.model import ModelLoadError

    result = run_pipeline(30, tmp_path)
    assert [run["papers"] for run in result["runs"]] == [30, 300]
    assert all(run["peak_rss_mb"] > 0 and run["end_to_end_papers_per_second"] > 0 for run in result["runs"])
    assert result["rss_ratio_10x"] == result["runs"][1]["peak_rss_mb"] / result["runs"][0]["peak_rss_mb"]
    assert [r["cores"] for r in result["data_path_by_cores"]][0] == 1
    assert result["data_path_with_tokenizer_workers"]["tokenizer_workers"] >= 1
    assert pipeline_source(30, tmp_path).exists() and pipeline_source(300, tmp_path).exists()
    with pytest.raises(FileNotFoundError, match="process of its own"):
        _pipeline_child(40, str(tmp_path))
    broken = tmp_path / "broken"
    (broken / "pipeline-model" / "adapter").mkdir(parents=True)
    (broken / "pipeline-model" / "adapter" / "adapter_config.json").write_text("{}")  # no model to load
    with pytest.raises(ModelLoadError, match="base model folder .* does not exist"):  # the child's own error
        run_pipeline(30, broken)


def test_gpu_hosts_data_path_probe_tokenises_every_paper_alike_in_every_mode(tmp_path, tiny_model, generated_papers):
    """``tools/gpu/data_path.py``, which a GPU machine runs unattended: every core count and tokenising mode (word
    cache, Rust tokenizer alone, worker processes) reads every paper of the source and produces the same token ids
    count, through the same timed loop as ``bench --pipeline-papers``."""
    source = make_source(tmp_path / "source.duckdb", generated_papers)
    script = REPO / "tools" / "gpu" / "data_path.py"
    done = subprocess.run([sys.executable, str(script), tiny_model[0], str(source), str(tmp_path / "work")],
                          env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    runs = json.loads((tmp_path / "data_path.json").read_text())
    texts, _ = paper_texts(pa.array([p["title"] for p in generated_papers], pa.string()),
                           pa.array([p["abstract"] for p in generated_papers], pa.string()), "[SEP]")
    with_text = len(texts) - texts.null_count
    assert {run["mode"] for run in runs} == {"word_cache", "rust", "workers"} and runs[0]["cores"] == 1
    assert {run["papers"] for run in runs} == {with_text}
    assert len({run["tokens"] for run in runs}) == 1
    assert all(run["tokenizer_workers"] >= 1 for run in runs if run["mode"] == "workers")
    assert all(run["data_path_papers_per_second"] > 0 for run in runs)


def test_engine_ab_tool_runs_each_checkout_from_its_own_folder_alternately(tmp_path, tiny_model, generated_papers):
    """``tools/engine_ab.py``: both sides embed the same papers in processes of their own, importing paper_assets from
    the checkout named (here a copy of this one against this one), alternating round by round; a folder without the
    package is refused."""
    import shutil

    source = make_source(tmp_path / "source.duckdb", generated_papers)
    old = tmp_path / "old-checkout"
    shutil.copytree(REPO / "paper_assets", old / "paper_assets", ignore=shutil.ignore_patterns("__pycache__"))
    script = REPO / "tools" / "engine_ab.py"
    env = {**os.environ, "PAPER_ASSETS_BENCH_DIR": str(tmp_path / "work")}
    args = [sys.executable, str(script), str(old), str(REPO), "--papers", "12", "--rounds", "2", "--compile", "off",
            "--base", tiny_model[0], "--adapter", tiny_model[1], "--source", str(source),
            "--json", str(tmp_path / "ab.json")]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "ab.json").read_text())
    assert [len(result["runs"][side]) for side in ("old", "new")] == [2, 2]
    runs = result["runs"]["old"] + result["runs"]["new"]
    assert all(run["papers"] == 12 and run["papers_per_second"] > 0 and not run["compiled"] for run in runs)
    for side, checkout in (("old", old), ("new", REPO)):
        package = str((checkout / "paper_assets" / "__init__.py").resolve())
        assert {run["paper_assets"] for run in result["runs"][side]} == {package}
    assert len(result["new_over_old_each_round"]) == 2
    assert (tmp_path / "work" / "engine_ab_calibration_old.json").exists()
    assert [line.split()[2] for line in done.stdout.splitlines() if line.startswith("round")] == ["old", "new"] * 2

    refused = subprocess.run([*args[:2], str(tmp_path), *args[3:]], env=env, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode != 0 and "holds no paper_assets/ package" in refused.stderr


def test_bench_tokenises_the_real_abstracts_both_ways_to_the_same_ids(tmp_path, shared_papers):
    """The word cache against the Rust tokenizer on the SciRepEval abstracts, pinned to one core in a process of its
    own; the measurement itself refuses to report if the two disagree on any id."""
    from paper_assets.benchkit.bench import SHARED_PAPERS
    from paper_assets.benchkit.measure import in_a_fresh_process
    from paper_assets.benchkit.tokenizer_bench import measure

    result = in_a_fresh_process(measure, str(SHARED_PAPERS), str(tmp_path))
    assert result["ids_equal"] and result["cores"] == 1 and result["papers"] == len(shared_papers)
    assert result["non_ascii_rows"] > 0 and result["rows_beyond_the_bmp"] == 0 and result["distinct_words"] > 10_000
    assert result["word_cache_papers_per_second"] > 0 and result["rust_tokenizer_papers_per_second"] > 0
    assert result["speedup"] == result["word_cache_papers_per_second"] / result["rust_tokenizer_papers_per_second"]


def test_bench_takes_the_calibrations_fastest_gemm_call_in_the_engines_precision(tmp_path, monkeypatch):
    import torch

    from paper_assets.benchkit.measure import best_gemm_call_gflops
    from paper_assets.engine import calibrate

    cache = tmp_path / "calibration.json"
    assert best_gemm_call_gflops(None, "bf16") is None  # no calibration file yet
    rounds = {torch.float32: [249.3, 201.0], torch.bfloat16: [1827.4, 800.0]}  # GFLOP/s in two rounds
    monkeypatch.setattr(calibrate, "cpu_gemm_rates", lambda: rounds)
    calibrate.bf16_pays_off(cache)  # stores this CPU kind's GEMM measurement
    assert best_gemm_call_gflops(json.loads(cache.read_text()), "bf16") == 1827.4
    assert best_gemm_call_gflops(json.loads(cache.read_text()), "fp32") == 249.3
    other_cpu = {"Another CPU|no-native-bf16|2 cores|gemm": {"bf16": False, "bf16_gflops": 99.0, "fp32_gflops": 171.0}}
    assert best_gemm_call_gflops(other_cpu, "bf16") is None  # another CPU kind's record is not this machine's


@pytest.fixture(params=["local", "s3"])
def shared_home(request, tmp_path):
    """A home several machines share: a folder, or an S3 prefix (moto) with one local folder per machine."""
    if request.param == "local":
        return str(tmp_path / "home"), lambda machine: {}
    return request.getfixturevalue("s3_home"), lambda machine: {"PAPER_ASSETS_LOCAL_HOME": str(tmp_path / machine)}


def test_embed_per_machine_into_one_home_then_publish_once(tmp_path, tiny_model, generated_papers, shared_home):
    """The scale-out path without Dagster: each machine embeds its ranges into the shared home (quality gate
    included), then one `publish` takes them all through the same gate as hub_shards."""
    from concurrent.futures import ThreadPoolExecutor

    from paper_assets.engine.home import ProjectHome
    from paper_assets.engine.ranges import parse_range

    home, machine_env = shared_home
    base, adapter = tiny_model
    papers = [dict(p, corpusid=i % 2 * 1_000_000 + i) for i, p in enumerate(generated_papers[:120])]
    src = make_source(tmp_path / "s.duckdb", papers)
    ranges = ["0-999999", "1000000-1999999"]
    with ThreadPoolExecutor(2) as machines:
        outputs = list(machines.map(
            lambda r: cli("embed", "--source", str(src), "--range", r, "--base-model", base, "--adapter", adapter,
                          "--device", "cpu", env={"PAPER_ASSETS_HOME": home, **machine_env(r)}), ranges))
    assert all("quality gate passed" in out for out in outputs)
    layout = ProjectHome(home, local=machine_env("publisher").get("PAPER_ASSETS_LOCAL_HOME"))
    for key in ("000000000-000999999", "001000000-001999999"):
        assert layout.gate_file(parse_range(key)).exists()
    published = json.loads(cli("publish", env={"PAPER_ASSETS_HOME": home, **machine_env("publisher")}))
    assert sorted(published["uploaded"]) == ["data/embeddings-000000000-000999999.parquet",
                                             "data/embeddings-001000000-001999999.parquet"]
    assert published["mismatched"] == []
    hub = layout.hub_folder
    shard_ids = pa.concat_tables(pq.read_table(f) for f in hub.rglob("*.parquet")).column("corpusid").to_pylist()
    assert sorted(shard_ids) == sorted(p["corpusid"] for p in papers)


def test_publish_command_uses_the_asset_code(tmp_path):
    home = tmp_path / "h"
    (home / "embeddings").mkdir(parents=True)
    out = subprocess.run([sys.executable, "-m", "paper_assets.cli", "publish"], cwd=REPO, capture_output=True,
                         text=True, env=dict(os.environ, PAPER_ASSETS_HOME=str(home)), timeout=300)
    assert out.returncode == 2 and out.stderr.startswith("paper-assets: error: nothing to publish")


def bad_input_cases(tmp_path, demo_source):
    not_duckdb = tmp_path / "not.duckdb"
    not_duckdb.write_text("this is not a database")
    return {
        "missing source": (["embed", "--source", str(tmp_path / "nope.duckdb"), "--out", "o"], "check --source"),
        "not a DuckDB file": (["embed", "--source", str(not_duckdb), "--out", "o"], "not a readable DuckDB"),
        "unknown table": (["embed", "--source", str(demo_source), "--table", "nope", "--out", "o"],
                          "no table 'nope'"),
        "bad range": (["embed", "--source", str(demo_source), "--range", "9-3", "--out", "o"],
                      "invalid corpusid range"),
        "range not a range": (["embed", "--source", str(demo_source), "--range", "abc", "--out", "o"],
                              "is not a corpusid range"),
        "missing model folder": (["embed", "--source", str(demo_source), "--base-model", str(tmp_path / "m"),
                                  "--out", "o"], "check --base-model"),
        "missing adapter folder": (["embed", "--source", str(demo_source), "--adapter", "./no/adapter", "--out", "o"],
                                   "check --adapter"),
        "bad device": (["embed", "--source", str(demo_source), "--device", "tpu7", "--out", "o"], "is not a device"),
    }


def test_expected_errors_are_one_line_and_exit_2(tmp_path, generated_papers):
    src = make_source(tmp_path / "s.duckdb", generated_papers[:5])
    env = dict(os.environ, PAPER_ASSETS_HOME=str(tmp_path / "h"))
    for name, (args, hint) in bad_input_cases(tmp_path, src).items():
        out = subprocess.run([sys.executable, "-m", "paper_assets.cli", *args], cwd=tmp_path, capture_output=True,
                             text=True, env=env, timeout=300)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2, (name, out.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("paper-assets: error: "), (name, out.stderr[-2000:])
        assert hint in lines[0], (name, lines[0])
        assert "PAPER_ASSETS_SOURCE" not in lines[0], name  # hints name the flag that was used
    debug = subprocess.run([sys.executable, "-m", "paper_assets.cli", "--debug", "embed", "--source", "nope.duckdb",
                            "--out", "o"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.parametrize("repo_from", ["setting", "flag"])
def test_publish_to_the_hub_without_a_token_is_a_one_line_error(tmp_path, repo_from):
    env = dict(os.environ, PAPER_ASSETS_HOME=str(tmp_path / "h"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        env.pop(name, None)
    args = ["publish"]
    if repo_from == "setting":
        env["PAPER_ASSETS_HUB_REPO"] = "user/embeddings"  # wired as EnvVar("HF_TOKEN") in the resource
    else:
        args += ["--repo", "user/embeddings", "0-999999"]
    out = subprocess.run([sys.executable, "-m", "paper_assets.cli", *args], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "HF_TOKEN is not set" in lines[0], out.stderr[-2000:]


def test_every_option_has_help():
    from paper_assets.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
