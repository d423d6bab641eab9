"""What the benchmarks measure with: peak memory, FLOPs per token, the device's name, a fresh process."""

from __future__ import annotations

import multiprocessing
import platform
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

import torch

from ..engine.calibrate import gemm_measurement
from ..engine.device import NATIVE_BF16_FLAGS, cpu_info

T = TypeVar("T")


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self) -> PeakRSS:
        import psutil  # a bench dependency (paper_assets[bench]), not a runtime one

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def flops_per_token(params_non_embedding: int, layers: int, hidden: int, mean_seq: float,
                    cls_only_last_layer: bool = False) -> float:
    """≈ 2·params (matmuls) + 4·layers·seq·hidden (QKᵀ and attention·V) per token: the full forward. With
    ``cls_only_last_layer`` what the engine runs: in the last layer every token but the CLS row only goes through
    the key and value projections (2 x 2·hidden² FLOPs)."""
    full = 2.0 * params_non_embedding + 4.0 * layers * mean_seq * hidden
    if not cls_only_last_layer or mean_seq <= 1:
        return full
    last_layer = 2.0 * params_non_embedding / layers + 4.0 * mean_seq * hidden
    return full - (1 - 1 / mean_seq) * (last_layer - 4.0 * hidden * hidden)


def non_embedding_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_info().kind or platform.processor() or device.type


def cpu_description() -> dict:
    cpu = cpu_info()
    return {"cpu": cpu.name or platform.processor() or platform.machine(), "family": cpu.family, "model": cpu.model,
            "native_bf16": sorted(NATIVE_BF16_FLAGS & cpu.flags), "avx512": "avx512f" in cpu.flags}


def best_gemm_call_gflops(calibration: dict | None, precision: str) -> float | None:
    """The fastest FFN GEMM call this CPU's calibration (the calibration file's entries) timed in ``precision`` (its
    interleaved rounds catch a shared VM's fast moments, which the 2 s peak measurement can miss; an AMX VM: 1,827
    against 744 GFLOP/s), if any."""
    measured = gemm_measurement(calibration or {})
    rate = (measured or {}).get(f"{precision}_gflops")
    return None if rate is None else float(rate)


def in_a_fresh_process(fn: Callable[..., T], *args) -> T:
    """``fn(*args)`` in a spawned process of its own (a fresh heap and thread pools, what a measurement needs); its
    exception is raised here, and a process that dies without one raises ``BrokenProcessPool``."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()
