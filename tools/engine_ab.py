"""The engine of two checkouts on this machine, head to head: the same papers and model, each embedded with its
checkout's production defaults (precision auto, calibrated token budget, compile auto) in a fresh process, the two
alternating round by round so that a shared VM's slow moments fall on both.

    .venv/bin/python tools/engine_ab.py OLD_CHECKOUT NEW_CHECKOUT [--papers 64] [--rounds 4] [--json FILE]

A checkout is a folder holding ``paper_assets/`` (``git worktree add /tmp/old <commit>``); its code runs with the
packages of this interpreter. Default model and papers: the bench's BERT-base-shaped stand-in and source in
$PAPER_ASSETS_BENCH_DIR (default /tmp/paper_assets_bench; built when missing); ``--base``/``--adapter``/``--source``
point elsewhere. Each checkout calibrates once, untimed, into a file of its own before the timed rounds. This is
how BENCHMARKS.md checks "no slower than the code when the issue was filed" on a given CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD_FLAG = "--child"


def _child(checkout: str, calibration: str, papers_file: str, papers: int, base: str, adapter: str,
           compile_mode: str) -> None:
    """Runs under PYTHONPATH=checkout: only APIs every version since issue 14 has (ModelConfig, Encoder.encode)."""
    import pyarrow.parquet as pq

    import paper_assets
    from paper_assets.engine.encoder import Encoder
    from paper_assets.engine.model import ModelConfig, load_model

    loaded_from = Path(paper_assets.__file__).resolve()
    if not loaded_from.is_relative_to(Path(checkout).resolve()):
        raise SystemExit(f"paper_assets came from {loaded_from}, not from the checkout {checkout}")
    texts = pq.read_table(papers_file, columns=["text"]).column("text").to_pylist()[:papers]
    options = {} if compile_mode == "auto" else {"compile": compile_mode == "on"}
    model = load_model(ModelConfig(base_model=base, adapter=adapter, precision="auto", device="cpu",
                                   calibration_file=calibration, **options))
    encoder = Encoder(model)
    encoder.encode(["warm up [SEP] " + "word " * 200] * 8)
    started = time.perf_counter()
    vectors = encoder.encode(texts)
    seconds = time.perf_counter() - started
    print(json.dumps({"papers": len(vectors), "seconds": seconds, "papers_per_second": len(vectors) / seconds,
                      "token_budget": encoder.token_budget, "precision": str(model.dtype).removeprefix("torch."),
                      "compiled": bool(getattr(encoder, "compiled", False)), "paper_assets": str(loaded_from)}))


def run_once(checkout: Path, calibration: Path, papers_file: Path, papers: int, base: str, adapter: str,
             compile_mode: str) -> dict:
    done = subprocess.run([sys.executable, __file__, CHILD_FLAG, str(checkout), str(calibration), str(papers_file),
                           str(papers), base, adapter, compile_mode],
                          env={**os.environ, "PYTHONPATH": str(checkout)}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the run of {checkout} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(old: Path, new: Path, papers: int, rounds: int, base: str, adapter: str, source: Path, work: Path,
            compile_mode: str = "auto") -> dict:
    from paper_assets.engine.pipeline import build_papers
    from paper_assets.engine.ranges import IdRange
    from paper_assets.engine.source import inspect_source

    for checkout in (old, new):
        if not (checkout / "paper_assets" / "__init__.py").exists():
            raise SystemExit(f"{checkout} holds no paper_assets/ package")
    papers_file = work / "engine_ab_papers.parquet"
    build_papers(inspect_source(source), IdRange(0, 10**12), papers_file)
    sides = {"old": old, "new": new}
    calibrations = {label: work / f"engine_ab_calibration_{label}.json" for label in sides}
    for label, checkout in sides.items():  # untimed: calibrate, so no timed round pays for it
        run_once(checkout, calibrations[label], papers_file, 8, base, adapter, compile_mode)
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for round_number in range(rounds):
        for label, checkout in sides.items():
            result = run_once(checkout, calibrations[label], papers_file, papers, base, adapter, compile_mode)
            runs[label].append(result)
            print(f"round {round_number + 1}  {label}  {result['papers_per_second']:7.3f} papers/s  "
                  f"({result['precision']}, budget {result['token_budget']}, compiled {result['compiled']})",
                  flush=True)
    rates = {label: [run["papers_per_second"] for run in results] for label, results in runs.items()}
    return {"old_checkout": str(old), "new_checkout": str(new), "papers": papers, "rounds": rounds,
            "runs": runs, "median_papers_per_second": {label: statistics.median(r) for label, r in rates.items()},
            "new_over_old_each_round": [n / o for n, o in zip(rates["new"], rates["old"], strict=True)]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == CHILD_FLAG:
        checkout, calibration, papers_file, papers, base, adapter, compile_mode = argv[1:]
        _child(checkout, calibration, papers_file, int(papers), base, adapter, compile_mode)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="the checkout to compare against")
    parser.add_argument("new", type=Path, help="the checkout under test")
    parser.add_argument("--papers", type=int, default=64, help="papers per timed run (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds (default %(default)s)")
    parser.add_argument("--base", help="base model folder (default: the bench's stand-in)")
    parser.add_argument("--adapter", help="adapter folder (default: the bench's stand-in's)")
    parser.add_argument("--source", type=Path, help="source DuckDB (default: the bench's)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="torch.compile in both (default auto: each checkout's own default)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    from paper_assets.benchkit.bench import bench_dir, benchmark_model, default_source

    work = bench_dir()

    source = args.source or default_source(work)
    if bool(args.base) != bool(args.adapter):
        parser.error("--base and --adapter go together")
    base, adapter = (args.base, args.adapter) if args.base else benchmark_model(work, source)
    result = compare(args.old.resolve(), args.new.resolve(), args.papers, args.rounds, base, adapter, source, work,
                     args.compile)
    medians = result["median_papers_per_second"]
    ratios = ", ".join(f"{r:.3f}" for r in result["new_over_old_each_round"])
    print(f"median papers/s: old {medians['old']:.3f}, new {medians['new']:.3f} "
          f"({medians['new'] / medians['old']:.3f}x); new/old each round: {ratios}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
