"""Loading SPECTER2 (base model + proximity adapter) the way the notebook does, with guards it lacked.

- The adapter must end up active: ``str(model.active_adapters) == "Stack[<name>]"``, or loading is refused
  (adapters logs "none are activated" during a load that works, so its log is not the truth).
- Weights stay fp32 on every device, adapter included (adapters loads adapters in fp32; casting the base before
  ``load_adapter`` gives "mat1 and mat2 must have the same dtype"). bf16/fp16 is applied by autocast in the
  encoder, which casts base and adapter weights alike: measured on the BERT-base stand-in, autocast bf16 is as
  fast as bf16 weights and closer to fp32 (min cosine vs the notebook 0.99936 vs 0.99892, BENCHMARKS.md), as
  LayerNorm and residuals stay fp32.
- The fingerprint hashes base + adapter weights (fp32, as loaded), max_length and pooling, so a vector can be
  traced to the exact model that made it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import calibrate
from .cls_pooling import compute_cls_only_in_last_layer
from .device import precision_name, resolve_device, resolve_precision
from .errors import UserError

log = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "allenai/specter2_base"
DEFAULT_ADAPTER = "allenai/specter2"
DEFAULT_ADAPTER_NAME = "proximity"
POOLING = "cls"
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


class ModelLoadError(UserError, RuntimeError):
    pass


class AdapterNotActiveError(ModelLoadError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    base_model: str = DEFAULT_BASE_MODEL
    adapter: str = DEFAULT_ADAPTER
    adapter_name: str = DEFAULT_ADAPTER_NAME
    device: str = "auto"
    precision: str = "auto"
    max_length: int = 512
    compile: str | bool = "auto"  # auto: on CUDA; on a CPU by measurement (tuning.plan_encoding)
    # Processes that tokenise (-1: by device, tokenization.default_workers; 0: in this process).
    tokenizer_workers: int = -1
    # Seq-len-sorted batches are cut so that rows * longest row <= token_budget (padded tokens); 0: by device.
    token_budget: int = 0
    max_batch_rows: int = 512
    # Padded batch widths are multiples of this; 0: by device (64 on GPUs, 8 on CPUs).
    pad_multiple: int = 0
    # Where processes claim GPUs when several are present (device "auto"); None: always cuda:0.
    device_lock_dir: str | None = None
    # Where CPU measurements are cached (the token budget when it is 0, bf16 vs fp32 when precision is auto);
    # None: the fixed CPU defaults (budget 2048, bf16 wherever the CPU has native bf16 instructions).
    calibration_file: str | None = None
    # CLS pooling reads one row of the last layer: compute only that row there (cls_pooling). False: the full
    # forward, as the notebook runs it (the benchmark's reference).
    cls_only_last_layer: bool = True
    # The attention kernel: "sdpa" (torch's scaled_dot_product_attention: flash kernels on GPUs, the notebook's
    # default) or "eager" (BERT's matmul-softmax-matmul, which a compiled CPU model fuses; measured 12% faster on a
    # Zen 5 CPU and 33% slower on an AMX Xeon, BENCHMARKS.md). Same function, so vectors agree to fp32 rounding.
    attn_implementation: str = "sdpa"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    hidden_size: int
    config: ModelConfig
    num_parameters: int
    num_layers: int
    cls_only_last_layer: bool = False  # the last layer computes the CLS row only (cls_pooling)

    @property
    def precision(self) -> str:
        return precision_name(self.dtype)

    def metadata(self) -> dict:
        """What made a vector: recorded in every embeddings file and quality-gate record."""
        config = self.config
        return {"base_model": config.base_model, "adapter": config.adapter, "adapter_name": config.adapter_name,
                "fingerprint": self.fingerprint, "precision": self.precision, "device": str(self.device),
                "max_length": config.max_length, "pooling": POOLING,
                "attn_implementation": config.attn_implementation}


# Where the user sets each model path, for the hints of a failed load; callers pass the names their user sees
# (settings.MODEL_SETTING_NAMES, or the CLI's own flags).
SETTING_NAMES = {"base model": "the base model setting", "adapter": "the adapter setting"}


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything rooted, relative or deeper is a folder."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def _check_local(name: str, what: str, settings: dict[str, str]) -> None:
    if _looks_like_path(name) and not os.path.isdir(os.path.expanduser(name)):
        raise ModelLoadError(f"the {what} folder {name} does not exist (check {settings[what]})")


def _offline_help(name: str, what: str, err: Exception, settings: dict[str, str]) -> ModelLoadError:
    env = settings[what]
    return ModelLoadError(
        f"could not load the {what} {name!r}: {type(err).__name__}: {err}\n"
        f"If this machine is offline, download it where the Hub is reachable, e.g.\n"
        f"  huggingface-cli download {name} --local-dir /models/{name.split('/')[-1]}\n"
        f"copy that folder here and point {env} (or the specter2 resource's config) at it."
    )


def weights_fingerprint(model: torch.nn.Module, max_length: int, adapter_name: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"max_length={max_length};pooling={POOLING};adapter={adapter_name}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
        digest.update(np.ascontiguousarray(data).view(np.uint8).tobytes())
    return digest.hexdigest()[:16]


def check_adapter_active(model: torch.nn.Module, adapter_name: str) -> None:
    active = str(getattr(model, "active_adapters", None))
    if active != f"Stack[{adapter_name}]":
        raise AdapterNotActiveError(
            f"adapter {adapter_name!r} is not active after loading (model.active_adapters = {active}); refusing "
            "to embed with the bare base model. A base checkpoint that already contains an adapter with that name "
            "causes this: load a clean base model or choose another adapter name."
        )


class _DuringLoadFilter(logging.Filter):
    """adapters warns "none are activated" while loading even when loading works (adapters#815); the truth is
    checked right after by :func:`check_adapter_active`, so the misleading line is dropped during the load only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "none are activated for the forward pass" not in record.getMessage()


@contextlib.contextmanager
def adapter_warning_silenced() -> Iterator[None]:
    """Drop adapters' "none are activated" line where we cause it on purpose (loading, the canary's pass with the
    adapter switched off); everywhere else it stays visible, as it would reveal a real missing adapter."""
    adapters_log = logging.getLogger("adapters.model_mixin")
    quiet = _DuringLoadFilter()
    adapters_log.addFilter(quiet)
    try:
        yield
    finally:
        adapters_log.removeFilter(quiet)


def load_model(config: ModelConfig, setting_names: dict[str, str] | None = None) -> LoadedModel:
    """Load base + adapter, refuse to go on unless the adapter is active. ``setting_names`` maps "base model" and
    "adapter" to where the user configured them (for error hints)."""
    with adapter_warning_silenced():
        loaded = _load_model(config, {**SETTING_NAMES, **(setting_names or {})})
    log.info("adapter %s active (base %s, adapter %s, fingerprint %s, %s on %s)", config.adapter_name,
             config.base_model, config.adapter, loaded.fingerprint, loaded.precision, loaded.device)
    return loaded


def _load_model(config: ModelConfig, settings: dict[str, str]) -> LoadedModel:
    if config.attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ModelLoadError(f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
                             f"not {config.attn_implementation!r}")
    _check_local(config.base_model, "base model", settings)
    _check_local(config.adapter, "adapter", settings)
    device = resolve_device(config.device, config.device_lock_dir)  # before any download or load: fail fast
    dtype = resolve_precision(config.precision, device)
    if config.precision == "auto" and device.type == "cpu" and dtype == torch.bfloat16 and config.calibration_file \
            and not calibrate.bf16_pays_off(Path(config.calibration_file)):
        dtype = torch.float32  # the CPU has bf16 instructions, but they are slower than fp32 here (measured)
    # Imported after every check above: adapters + transformers take 5-8 s to import on 2 vCPUs, and a typo in a
    # folder or device name should not wait for them.
    from adapters import AutoAdapterModel
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(config.base_model)
        model = AutoAdapterModel.from_pretrained(config.base_model, attn_implementation=config.attn_implementation)
    except (OSError, ValueError) as err:
        raise _offline_help(config.base_model, "base model", err, settings) from err
    source = "hf" if not os.path.isdir(config.adapter) else None
    try:
        kwargs = {"source": source} if source else {}
        model.load_adapter(config.adapter, load_as=config.adapter_name, set_active=True, **kwargs)
    except (OSError, ValueError) as err:
        raise _offline_help(config.adapter, "adapter", err, settings) from err
    check_adapter_active(model, config.adapter_name)
    model.eval()
    fingerprint = weights_fingerprint(model, config.max_length, config.adapter_name)
    cls_only = config.cls_only_last_layer and compute_cls_only_in_last_layer(model)
    model.to(device)
    hidden = int(model.config.hidden_size)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        fingerprint=fingerprint,
        hidden_size=hidden,
        config=config,
        num_parameters=sum(p.numel() for p in model.parameters()),
        num_layers=int(model.config.num_hidden_layers),
        cls_only_last_layer=cls_only,
    )
