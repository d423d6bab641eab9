"""Device and precision policy: CUDA -> MPS -> CPU; bf16 only where the hardware computes it natively.

torch is imported inside the functions that use it: the Dagster code location parses the compile setting here
(``compile_choice``) and stays free of the model libraries (``defs/resources.py``)."""

from __future__ import annotations

import fcntl
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from .errors import UserError

if TYPE_CHECKING:
    import torch

_CLAIMED: dict[str, int] = {}  # lock file -> open descriptor, held for the life of the process

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_CHOICES = ("auto", "on", "off")


class DeviceError(UserError, ValueError):
    """A device or precision that this machine cannot provide."""


def claim_slot(lock_dir: str | os.PathLike, slots: int, prefix: str = "cuda") -> int | None:
    """The first of ``slots`` devices no other process on this machine holds (an ``flock`` per device, released
    when the process exits). Concurrent partition runs thus land on different GPUs instead of all on cuda:0."""
    folder = Path(lock_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(slots):
        path = str(folder / f"{prefix}-{index}.lock")
        if path in _CLAIMED:
            return index
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _CLAIMED[path] = fd
        return index
    return None


def resolve_device(requested: str = "auto", lock_dir: str | os.PathLike | None = None) -> torch.device:
    """``auto``: CUDA (with several GPUs and a ``lock_dir``: the first one no other process has claimed), then MPS,
    then the CPU. An explicit device is used as given."""
    import torch

    if requested != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError as err:
            raise DeviceError(f"{requested!r} is not a device (auto, cpu, cuda, cuda:N, mps): {err}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"device {requested!r} requested but CUDA is not available (use cpu or auto)")
        return device
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count > 1 and lock_dir is not None:
            index = claim_slot(lock_dir, count)
            if index is None:
                raise DeviceError(f"all {count} GPUs are claimed by other runs; lower the 'gpu' pool limit")
            return torch.device(f"cuda:{index}")
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# Either one computes bf16 matmuls natively; without them they are emulated and slower than fp32.
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


class CpuInfo(NamedTuple):
    """What ``/proc/cpuinfo`` says about the first CPU ("" and an empty set where there is no such file)."""

    name: str
    flags: frozenset[str]
    family: str = ""
    model: str = ""

    @property
    def kind(self) -> str:
        """The model name and, where known, the family and model numbers. Cloud VMs often report one generic name
        for several generations ("Intel(R) Xeon(R) Processor": the AMX Xeons of BENCHMARKS.md, family 6 model 167
        and model 207, whose AMX ran at a third of the other's speed), so the name alone does not say which CPU a
        measurement belongs to."""
        if not self.family and not self.model:
            return self.name
        return f"{self.name} (family {self.family or '?'} model {self.model or '?'})"


def parse_cpuinfo(text: str) -> CpuInfo:
    lines = text.splitlines()

    def first(key: str) -> str:
        return next((line.split(":", 1)[1].strip() for line in lines
                     if line.split(":", 1)[0].strip() == key and ":" in line), "")

    return CpuInfo(first("model name"), frozenset(first("flags").split()), first("cpu family"), first("model"))


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's CPU from ``/proc/cpuinfo``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return parse_cpuinfo(cpuinfo.read())
    except OSError:
        return CpuInfo("", frozenset())


def cpu_has_native_bf16() -> bool:
    return bool(NATIVE_BF16_FLAGS & cpu_info().flags)


def default_token_budget(device: torch.device) -> int:
    """Padded tokens per batch. GPUs want large batches to fill their cores, as large as memory comfortably allows
    (BERT-base at 64k tokens needs a few GiB of activations in bf16); on CPUs small batches run faster (measured on
    BERT-base, 2 cores: 2048 -> 3.9 papers/s, 16384 -> 2.1; see BENCHMARKS.md), as activations then stay in cache,
    and the CPU budget is measured per machine where a calibration file is configured (``calibrate``)."""
    import torch

    if device.type == "cuda":
        memory_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
        return 65536 if memory_gib >= 40 else 32768 if memory_gib >= 16 else 16384
    return 2048


def default_pad_multiple(device: torch.device) -> int:
    """Batch widths are rounded up to this: on GPUs few distinct shapes (kernel choice and allocator blocks are
    made per shape) matter more than the padding; on CPUs padding costs compute, so only a small multiple."""
    return 64 if device.type == "cuda" else 8


def compile_choice(setting: str | bool) -> str:
    """The compile setting as one of ``COMPILE_CHOICES`` (booleans and 1/0, true/false, yes/no accepted)."""
    if isinstance(setting, bool):
        return "on" if setting else "off"
    value = str(setting).strip().lower()
    if value in {"on", "1", "true", "yes"}:
        return "on"
    if value in {"off", "0", "false", "no"}:
        return "off"
    if value in {"auto", ""}:
        return "auto"
    raise DeviceError(f"compile must be one of {COMPILE_CHOICES}, got {setting!r}")


def compile_wanted(setting: str | bool, device: torch.device) -> bool:
    """Whether to ``torch.compile`` the model. ``auto``: on CUDA, where fusing the elementwise work around the
    matmuls (autocast casts, residual adds, LayerNorm, GELU) is most of the gain (BENCHMARKS.md, GPU section) and a
    run embeds enough papers to repay the compilation; off on CPUs and MPS, unless the encoder measured (once per
    CPU kind, in the calibration file) that compiling pays on this CPU (``tuning.plan_encoding``)."""
    choice = compile_choice(setting)
    return device.type == "cuda" if choice == "auto" else choice == "on"


def resolve_precision(requested: str, device: torch.device) -> torch.dtype:
    import torch

    if requested not in PRECISIONS:
        raise DeviceError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested == "fp32":
        return torch.float32
    if requested == "bf16":
        return torch.bfloat16
    if requested == "fp16":
        if device.type == "cpu":
            raise DeviceError("fp16 is only supported on GPU devices; use bf16 or fp32 on the CPU")
        return torch.float16
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def precision_name(dtype: torch.dtype) -> str:
    import torch

    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
