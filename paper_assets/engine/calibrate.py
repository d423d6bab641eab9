"""The CPU token budget, measured on first use and cached per machine, instead of a constant tuned on one CPU.

The budget (padded tokens per forward batch) trades per-batch overhead against activations falling out of the
caches; where that balance lies depends on the CPU (cache sizes, AVX2 / AVX-512 / AMX kernels), the model shape and
the precision. On first use we time one forward pass per candidate budget on batches shaped like real papers
(256-token rows) and keep the smallest budget within 3% of the fastest. The result is stored in the home
(``stats/token_budget.json``) under a key naming the CPU model, its native-bf16 flags, the core count, the model
shape and the precision, so each machine kind measures once (~10–30 s for BERT-base) and every later run reuses it.
GPUs keep their fixed default (measured there when a GPU is lent).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .device import NATIVE_BF16_FLAGS, cpu_info
from .storage import FileLock, atomic_path

CANDIDATE_BUDGETS = (1024, 2048, 4096, 8192)
ROW_TOKENS = 256  # a typical title [SEP] abstract is ~210-230 tokens
WITHIN = 0.97


def machine_key(hidden: int, layers: int, precision: str) -> str:
    name, flags = cpu_info()
    native = "+".join(sorted(flags & NATIVE_BF16_FLAGS)) or "no-native-bf16"
    return f"{name or 'unknown cpu'}|{native}|{os.cpu_count()} cores|{layers}x{hidden}|{precision}"


def measure_budget(forward: Callable[[np.ndarray, np.ndarray], object], vocab: int,
                   candidates: tuple[int, ...] = CANDIDATE_BUDGETS) -> dict[int, float]:
    """Tokens per second of one timed forward pass (after one warm-up) per candidate budget."""
    rng = np.random.default_rng(0)
    rates = {}
    for budget in candidates:
        rows = max(1, budget // ROW_TOKENS)
        ids = rng.integers(1000, max(vocab, 1001), size=(rows, ROW_TOKENS), dtype=np.int64)
        mask = np.ones_like(ids)
        forward(ids, mask)
        started = time.perf_counter()
        forward(ids, mask)
        rates[budget] = rows * ROW_TOKENS / (time.perf_counter() - started)
    return rates


def choose(rates: dict[int, float]) -> int:
    best = max(rates.values())
    return min(budget for budget, rate in rates.items() if rate >= WITHIN * best)


def calibrated_budget(cache_file: Path, key: str, measure: Callable[[], dict[int, float]]) -> int:
    """The cached budget for ``key``, measured and stored on first use (one process measures, others wait)."""
    with FileLock(cache_file.with_suffix(".lock")):
        cache = json.loads(cache_file.read_text(encoding="utf-8")) if cache_file.exists() else {}
        if key in cache:
            return int(cache[key]["token_budget"])
        rates = measure()
        cache[key] = {"token_budget": choose(rates), "tokens_per_second": {str(k): round(v, 1)
                                                                           for k, v in rates.items()}}
        with atomic_path(cache_file) as tmp:
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True), encoding="utf-8")
        return int(cache[key]["token_budget"])
