"""What depends on the CPU, measured on first use and cached per machine kind instead of constants tuned on one CPU:
whether bf16 pays (``precision=auto``), whether ``torch.compile`` pays (``compile=auto``) and the token budget.

bf16: a CPU flag (AVX512-BF16, AMX) says bf16 *can* run natively, not that it is faster: on a 2-vCPU Intel Xeon
(model 207, AVX512-BF16, no AMX exposed) the bf16 GEMM measured 99 GFLOP/s against 171 in fp32. So ``auto`` times an
FFN-shaped GEMM in both precisions once and picks bf16 only when it is at least ``BF16_MIN_GAIN`` times faster.

The budget (padded tokens per forward batch) trades per-batch overhead against activations falling out of the
caches; where that balance lies depends on the CPU (cache sizes, AVX2 / AVX-512 / AMX kernels), the model shape and
the precision. On first use we time forward passes at each candidate budget on batches shaped like real papers
(256-token rows), interleaved over a few rounds (``interleaved_seconds``: a shared VM's speed drifts), and keep the
smallest budget whose median share of its round's fastest is within 3% of the best (``choose``). The result is
stored in the home (``stats/calibration.json``) under a key naming the CPU (model name, family and model numbers),
its native-bf16 flags, the core count, the model shape and the precision, so each machine kind measures once (~20–60 s
for BERT-base on 2 vCPUs) and every later run reuses it.
GPUs keep their fixed default (measured on an H200, BENCHMARKS.md).

Compile: inductor with freezing folds the weights' bf16 casts and packs them for oneDNN once, with bias, GELU and
residual adds fused into the matmuls; where oneDNN has native bf16 kernels (AMX) that is most of the forward time
saved, elsewhere it may not repay a compilation that every run pays again (~40–100 s for BERT-base on 2 vCPUs).
So ``auto`` times the eager and the compiled forward once per machine kind and model, interleaved
(``compile_measurement``), and compiles where the gain repays the compilation within the run (``compile_pays_off``).

Every decision compares candidates round by round and takes the median of the rounds (``median_gain``, ``choose``);
the best round of each is what gets recorded as its rate. Best-of alone would let one fast moment decide: on a
2-vCPU Emerald Rapids VM, whose speed changed up to 2.7x between two calls a second apart, best-of chose the eager
forward although compiled was 1.3-1.6x faster, because one fast moment had met eager only. Over 21 rounds measured
there, a 7-round median of per-round ratios made the right choice in every window, best-of in 14 of 15.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from .device import NATIVE_BF16_FLAGS, cpu_info
from .fs import FileLock, atomic_path

CANDIDATE_BUDGETS = (1024, 2048, 4096, 8192)
BUDGET_ROUNDS = 5  # each round times every candidate budget once (~15k tokens: 2-10 s for BERT-base on 2 vCPUs)
COMPILE_ROUNDS = 7  # each round times the eager and the compiled forward once at the default budget
GEMM_ROUNDS = 21  # each round times the fp32 and the bf16 FFN GEMM once (~1 s in all on 2 vCPUs)
BF16_MIN_GAIN = 1.15
# Above the interleaved measurement's spread (Zen 4, five fresh measurements: 1.13-1.18x), below the gain worth
# having: there compiled `bench` ran 1.13x eager's papers/s in the same VM phase (76% vs 68% of the GEMM), and at
# 1.15 the choice flipped between machines of one kind. Short runs are guarded by the payback rule, not by this.
COMPILE_MIN_GAIN = 1.05
# A run whose eager forward passes take less than this is not worth a compilation (~40 s for BERT-base on 2 vCPUs).
COMPILE_WORTH_MEASURING_SECONDS = 120.0
ROW_TOKENS = 256  # a typical title [SEP] abstract is ~210-230 tokens
WITHIN = 0.97

K = TypeVar("K", bound=Hashable)
Forward = Callable[[np.ndarray, np.ndarray], object]


def _cpu_key() -> str:
    cpu = cpu_info()
    native = "+".join(sorted(cpu.flags & NATIVE_BF16_FLAGS)) or "no-native-bf16"
    return f"{cpu.kind or 'unknown cpu'}|{native}|{os.cpu_count()} cores"


def machine_key(hidden: int, layers: int, precision: str, attn_implementation: str = "sdpa") -> str:
    """This CPU kind's entry for a model shape and precision. A non-default attention kernel gets entries of its
    own (it runs at another rate: eager attention measured 12% faster than sdpa on a Zen 5 and 33% slower on an
    AMX Xeon), while sdpa keeps the key that earlier calibration files hold."""
    key = f"{_cpu_key()}|{layers}x{hidden}|{precision}"
    return key if attn_implementation == "sdpa" else f"{key}|{attn_implementation}"


def _read(cache_file: Path) -> dict:
    """The calibration file's entries (written atomically, so readable without the lock)."""
    return json.loads(cache_file.read_text(encoding="utf-8")) if cache_file.exists() else {}


def _cached(cache_file: Path, key: str, compute: Callable[[], dict]) -> dict:
    """The entry ``key`` of the calibration file, computed and stored on first use (one process measures, the
    others wait for it on the lock)."""
    with FileLock(cache_file.with_suffix(".lock")):
        cache = _read(cache_file)
        if key not in cache:
            cache[key] = compute()
            with atomic_path(cache_file) as tmp:
                tmp.write_text(json.dumps(cache, indent=1, sort_keys=True), encoding="utf-8")
        return cache[key]


def interleaved_seconds(runs: Mapping[K, Callable[[], object]], rounds: int) -> dict[K, list[float]]:
    """Each run's wall time in each of ``rounds`` interleaved rounds, after one warm-up each. Each round runs every
    candidate once, starting one further along each time. On a shared VM the speed drifts for seconds at a time (a
    2-vCPU AMX Xeon the same GEMM took 4.3 to 19 ms from call to call), so candidates timed one after
    another would compare the machine's phases, not themselves; interleaved, each round compares them in about
    the same phase (``rounds=0``: the warm-ups only, no times)."""
    for run in runs.values():
        run()
    names = list(runs)
    seconds: dict[K, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - started)
    return seconds


def median_gain(faster_rates: list[float], slower_rates: list[float]) -> float:
    """The median over rounds of ``faster_rates[i] / slower_rates[i]`` (two candidates' rates, timed in the same
    rounds): a VM's fast moment that meets one candidate only moves one round, not the decision."""
    return float(np.median(np.asarray(faster_rates) / np.asarray(slower_rates)))


def measure_rates(forwards: Mapping[str, Forward], vocab: int, budgets: tuple[int, ...],
                  rounds: int = BUDGET_ROUNDS) -> dict[str, dict[int, list[float]]]:
    """Tokens per second of each forward at each budget in each round, on batches of paper-length rows of random
    ids, timed by ``interleaved_seconds`` (no rates where ``rounds=0``: compile and warm up only)."""
    rng = np.random.default_rng(0)
    batches = {}
    for budget in budgets:
        rows = max(2, budget // ROW_TOKENS)  # >= 2: a compiled graph would specialise on a batch of one
        ids = rng.integers(1000, max(vocab, 1001), size=(rows, ROW_TOKENS), dtype=np.int64)
        batches[budget] = (ids, np.ones_like(ids))
    runs = {(name, budget): functools.partial(forward, *batches[budget])
            for name, forward in forwards.items() for budget in budgets}
    seconds = interleaved_seconds(runs, rounds)
    return {name: {budget: [batches[budget][0].size / s for s in seconds[name, budget]] for budget in budgets}
            for name in forwards}


def median_shares(rates: dict[int, list[float]]) -> dict[int, float]:
    """Each budget's median, over rounds, of its rate as a share of that round's fastest budget."""
    rounds = np.array([rates[budget] for budget in rates])  # budgets x rounds
    shares = np.median(rounds / rounds.max(axis=0), axis=1)
    return {budget: float(share) for budget, share in zip(rates, shares, strict=True)}


def choose(rates: dict[int, list[float]]) -> int:
    """The smallest budget whose median share of its round's fastest is within ``WITHIN`` of the highest median
    share (which is under 1 where no budget was the fastest in most rounds)."""
    shares = median_shares(rates)
    best = max(shares.values())
    return min(budget for budget, share in shares.items() if share >= WITHIN * best)


def calibrated_budget(cache_file: Path, key: str, measure: Callable[[], dict[int, list[float]]]) -> int:
    """The cached budget for ``key``, measured on first use (each budget's best round is recorded as its rate)."""

    def compute() -> dict:
        rates = measure()
        return {"token_budget": choose(rates),
                "tokens_per_second": {str(k): round(max(v), 1) for k, v in rates.items()},
                "median_share_of_fastest": {str(k): round(v, 3) for k, v in median_shares(rates).items()}}

    return int(_cached(cache_file, key, compute)["token_budget"])


def cached_budget(cache_file: Path, key: str) -> int | None:
    """The stored budget for ``key``, None where none was measured (nothing is measured here)."""
    entry = _read(cache_file).get(key)
    return int(entry["token_budget"]) if entry else None


def _compile_key(key: str) -> str:
    return f"{key}|compile"


def cached_compile_measurement(cache_file: Path, key: str) -> dict | None:
    """The stored compile measurement for ``key`` (``machine_key``), None before the first one."""
    return _read(cache_file).get(_compile_key(key))


def compile_measurement(cache_file: Path, key: str,
                        measure: Callable[[], tuple[list[float], list[float], float]]) -> dict:
    """Eager and compiled (inductor, freezing) forward rates on this CPU, round by round, and the compile seconds:
    ``measure`` returns them, once per key; stored are each one's best round and the median gain (``median_gain``),
    which later runs read from the cache."""

    def compute() -> dict:
        eager, compiled, seconds = measure()
        return {"eager_tokens_per_second": round(max(eager), 1), "compiled_tokens_per_second": round(max(compiled), 1),
                "compiled_gain_median_of_rounds": round(median_gain(compiled, eager), 3),
                "compile_seconds": round(seconds, 1)}

    return _cached(cache_file, _compile_key(key), compute)


def compile_pays_off(measured: dict, expected_tokens: int | None = None) -> bool:
    """Whether to compile: the compiled forward is ``COMPILE_MIN_GAIN`` times faster and, where the run's size is
    known, the time it saves on ``expected_tokens`` exceeds the compilation (a process compiles again every run;
    on a 2-vCPU Sapphire Rapids, BERT-base bf16 paid back its ~40 s after ~3,000 papers). The gain is the median
    of the rounds' ratios."""
    eager = measured["eager_tokens_per_second"]
    gain = measured["compiled_gain_median_of_rounds"]
    if gain < COMPILE_MIN_GAIN:
        return False
    return expected_tokens is None or expected_tokens / eager * (1 - 1 / gain) > measured["compile_seconds"]


def _ffn_gemm(dtype: torch.dtype, device: torch.device) -> tuple[Callable[[], object], float]:
    """FFN-shaped matmuls (tokens x 768 -> 3,072; 2,048 tokens on a CPU; on a GPU five of 65,536 tokens per
    synchronisation, whose launch and sync overhead would otherwise dominate) as a call that returns when they are
    done, and their FLOPs."""
    tokens, repeats = (65536, 5) if device.type == "cuda" else (2048, 1)
    x = torch.randn(tokens, 768, device=device).to(dtype)
    w = torch.randn(768, 3072, device=device).to(dtype)

    def run() -> None:
        with torch.inference_mode():
            for _ in range(repeats):
                x @ w
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    return run, 2.0 * tokens * 768 * 3072 * repeats


def matmul_call_gflops(dtype: torch.dtype, device: torch.device, seconds: float = 2.0) -> list[float]:
    """GFLOP/s of each call of ``_ffn_gemm`` repeated for ``seconds`` (after three untimed calls)."""
    run, flops = _ffn_gemm(dtype, device)
    for _ in range(3):
        run()
    rates = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        run()
        rates.append(flops / (time.perf_counter() - started) / 1e9)
    return rates


def cpu_gemm_rates(rounds: int = GEMM_ROUNDS) -> dict[torch.dtype, list[float]]:
    """GFLOP/s of the FFN-shaped GEMM on this CPU in fp32 and in bf16, per round, timed interleaved
    (``interleaved_seconds``)."""
    gemms = {dtype: _ffn_gemm(dtype, torch.device("cpu")) for dtype in (torch.float32, torch.bfloat16)}
    seconds = interleaved_seconds({dtype: run for dtype, (run, _) in gemms.items()}, rounds)
    return {dtype: [flops / s / 1e9 for s in seconds[dtype]] for dtype, (_, flops) in gemms.items()}


def _gemm_key() -> str:
    return f"{_cpu_key()}|gemm"


def gemm_measurement(calibration: Mapping[str, dict]) -> dict | None:
    """This CPU kind's GEMM measurement (``fp32_gflops``, ``bf16_gflops``, ``bf16``) among a calibration file's
    entries, None before the first."""
    return calibration.get(_gemm_key())


def bf16_pays_off(cache_file: Path) -> bool:
    """Whether bf16 GEMMs beat fp32 ones on this CPU by ``BF16_MIN_GAIN`` in the median round (measured once, ~1 s,
    then cached with each precision's best round, the fastest this CPU was seen to run that GEMM)."""

    def compute() -> dict:
        rates = cpu_gemm_rates()
        fp32, bf16 = rates[torch.float32], rates[torch.bfloat16]
        gain = median_gain(bf16, fp32)
        return {"fp32_gflops": round(max(fp32), 1), "bf16_gflops": round(max(bf16), 1),
                "bf16_gain_median_of_rounds": round(gain, 3), "bf16": gain >= BF16_MIN_GAIN}

    return bool(_cached(cache_file, _gemm_key(), compute)["bf16"])
