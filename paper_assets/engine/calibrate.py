"""What depends on the CPU, measured on first use and cached per machine kind instead of constants tuned on one CPU:
whether bf16 pays (``precision=auto``), whether ``torch.compile`` pays (``compile=auto``) and the token budget.

bf16: a CPU flag (AVX512-BF16, AMX) says bf16 *can* run natively, not that it is faster: on a 2-vCPU Intel Xeon
(model 207, AVX512-BF16, no AMX exposed) the bf16 GEMM measured 99 GFLOP/s against 171 in fp32. So ``auto`` times an
FFN-shaped GEMM in both precisions once and picks bf16 only when it is at least ``BF16_MIN_GAIN`` times faster.

The budget (padded tokens per forward batch) trades per-batch overhead against activations falling out of the
caches; where that balance lies depends on the CPU (cache sizes, AVX2 / AVX-512 / AMX kernels), the model shape and
the precision. On first use we time one forward pass per candidate budget on batches shaped like real papers
(256-token rows) and keep the smallest budget within 3% of the fastest. The result is stored in the home
(``stats/calibration.json``) under a key naming the CPU model, its native-bf16 flags, the core count, the model
shape and the precision, so each machine kind measures once (~10–30 s for BERT-base) and every later run reuses it.
GPUs keep their fixed default (measured there when a GPU is lent).

Compile: inductor with freezing folds the weights' bf16 casts and packs them for oneDNN once, with bias, GELU and
residual adds fused into the matmuls; where oneDNN has native bf16 kernels (AMX) that is most of the forward time
saved, elsewhere it may not repay a compilation that every run pays again (~40 s for BERT-base on 2 vCPUs). So
``auto`` times the eager and the compiled forward once per machine kind and model (``compile_measurement``) and
compiles where the gain repays the compilation within the run (``compile_pays_off``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .device import NATIVE_BF16_FLAGS, cpu_info
from .storage import FileLock, atomic_path

CANDIDATE_BUDGETS = (1024, 2048, 4096, 8192)
BF16_MIN_GAIN = 1.15
COMPILE_MIN_GAIN = 1.15
# A run whose eager forward passes take less than this is not worth a compilation (~40 s for BERT-base on 2 vCPUs).
COMPILE_WORTH_MEASURING_SECONDS = 120.0
ROW_TOKENS = 256  # a typical title [SEP] abstract is ~210-230 tokens
WITHIN = 0.97


def _cpu_key() -> str:
    name, flags = cpu_info()
    native = "+".join(sorted(flags & NATIVE_BF16_FLAGS)) or "no-native-bf16"
    return f"{name or 'unknown cpu'}|{native}|{os.cpu_count()} cores"


def machine_key(hidden: int, layers: int, precision: str) -> str:
    return f"{_cpu_key()}|{layers}x{hidden}|{precision}"


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


def measure_budget(forward: Callable[[np.ndarray, np.ndarray], object], vocab: int,
                   candidates: tuple[int, ...] = CANDIDATE_BUDGETS, repeats: int = 1) -> dict[int, float]:
    """Tokens per second per candidate budget: the best of ``repeats`` timed forward passes after one warm-up
    (``repeats=0``: the warm-up only, rates 0)."""
    rng = np.random.default_rng(0)
    rates = {}
    for budget in candidates:
        rows = max(2, budget // ROW_TOKENS)  # >= 2: a compiled graph would specialise on a batch of one
        ids = rng.integers(1000, max(vocab, 1001), size=(rows, ROW_TOKENS), dtype=np.int64)
        mask = np.ones_like(ids)
        forward(ids, mask)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            forward(ids, mask)
            best = min(best, time.perf_counter() - started)
        rates[budget] = rows * ROW_TOKENS / best if repeats else 0.0
    return rates


def choose(rates: dict[int, float]) -> int:
    best = max(rates.values())
    return min(budget for budget, rate in rates.items() if rate >= WITHIN * best)


def calibrated_budget(cache_file: Path, key: str, measure: Callable[[], dict[int, float]]) -> int:
    """The cached budget for ``key``, measured on first use."""

    def compute() -> dict:
        rates = measure()
        return {"token_budget": choose(rates), "tokens_per_second": {str(k): round(v, 1) for k, v in rates.items()}}

    return int(_cached(cache_file, key, compute)["token_budget"])


def _compile_key(key: str) -> str:
    return f"{key}|compile"


def cached_compile_measurement(cache_file: Path, key: str) -> dict | None:
    """The stored compile measurement for ``key`` (``machine_key``), None before the first one."""
    return _read(cache_file).get(_compile_key(key))


def compile_measurement(cache_file: Path, key: str, measure: Callable[[], tuple[float, float, float]]) -> dict:
    """Eager and compiled (inductor, freezing) forward rates on this CPU and the compile seconds: ``measure``
    returns them, once per key; later runs read them from the cache."""

    def compute() -> dict:
        eager, compiled, seconds = measure()
        return {"eager_tokens_per_second": round(eager, 1), "compiled_tokens_per_second": round(compiled, 1),
                "compile_seconds": round(seconds, 1)}

    return _cached(cache_file, _compile_key(key), compute)


def compile_pays_off(measured: dict, expected_tokens: int | None = None) -> bool:
    """Whether to compile: the compiled forward is ``COMPILE_MIN_GAIN`` times faster and, where the run's size is
    known, the time it saves on ``expected_tokens`` exceeds the compilation (a process compiles again every run;
    on a 2-vCPU Sapphire Rapids, BERT-base bf16 paid back its ~40 s after ~3,000 papers; BENCHMARKS.md)."""
    eager, compiled = measured["eager_tokens_per_second"], measured["compiled_tokens_per_second"]
    if compiled < COMPILE_MIN_GAIN * eager:
        return False
    return expected_tokens is None or expected_tokens * (1 / eager - 1 / compiled) > measured["compile_seconds"]


def matmul_gflops(dtype: torch.dtype, device: torch.device, seconds: float = 2.0) -> float:
    """Achievable GEMM rate on this device: an FFN-shaped matmul (tokens x 768 -> 3,072; 2,048 tokens on a CPU,
    65,536 on a GPU, whose launch overhead would otherwise dominate), best of repeats."""
    tokens = 65536 if device.type == "cuda" else 2048
    x = torch.randn(tokens, 768, device=device).to(dtype)
    w = torch.randn(768, 3072, device=device).to(dtype)
    flops = 2.0 * x.shape[0] * x.shape[1] * w.shape[1]
    best = 0.0
    with torch.inference_mode():
        for _ in range(3):
            x @ w
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(5):
                x @ w
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = max(best, 5 * flops / (time.perf_counter() - t0))
    return best / 1e9


def bf16_pays_off(cache_file: Path) -> bool:
    """Whether bf16 GEMMs beat fp32 ones on this CPU by ``BF16_MIN_GAIN`` (measured once, ~1 s, then cached)."""

    def compute() -> dict:
        cpu = torch.device("cpu")
        fp32, bf16 = matmul_gflops(torch.float32, cpu, 0.5), matmul_gflops(torch.bfloat16, cpu, 0.5)
        return {"fp32_gflops": round(fp32, 1), "bf16_gflops": round(bf16, 1), "bf16": bf16 >= BF16_MIN_GAIN * fp32}

    return bool(_cached(cache_file, f"{_cpu_key()}|gemm", compute)["bf16"])
