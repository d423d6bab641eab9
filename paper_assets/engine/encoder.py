"""The embedding engine: texts in, float32 CLS vectors out, in the input order.

Per chunk of texts: tokenise (truncation at max_length, no padding), plan length-sorted token-budget batches,
run them under ``torch.inference_mode``, put each vector back at its row. Tokenising the next chunk overlaps the
forward passes of the current one (a background thread feeding a bounded queue). On CUDA, host batches are
pinned and copied with ``non_blocking=True``. Reduced precision (bf16/fp16) is autocast on every device: weights
stay fp32, matmuls run in the low precision, LayerNorm/softmax/residual sums stay fp32. One autocast context spans
a chunk, so each weight is cast once per chunk (autocast's cache), not once per batch.

Failure rules (counted in :class:`EncodeStats`):
- a batch whose output has NaN/Inf is recomputed one row at a time (no padding, the known trigger); a row that
  is still non-finite raises :class:`NonFiniteEmbeddingError`;
- a batch that runs out of memory is split in half and retried, down to single rows.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import torch

from . import calibrate
from .batching import pad_batch, plan_batches
from .device import default_token_budget
from .model import LoadedModel

Payload = TypeVar("Payload")
TOKENIZE_ROWS = 2048


class NonFiniteEmbeddingError(RuntimeError):
    pass


@dataclass
class EncodeStats:
    rows: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    forward_seconds: float = 0.0
    nan_batches_recomputed: int = 0
    oom_splits: int = 0
    truncated_rows: int = 0

    def add(self, other: EncodeStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def token_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0


@dataclass
class TokenizedChunk(Generic[Payload]):
    """A chunk's token ids, flat: row ``i`` is ``flat_ids[offsets[i]:offsets[i + 1]]``."""

    payload: Payload
    flat_ids: np.ndarray
    offsets: np.ndarray
    truncated: int
    batches: list[np.ndarray] = field(default_factory=list)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def rows(self) -> int:
        return len(self.offsets) - 1


def _truncating_backend(tokenizer, max_length: int):
    """A private copy of a fast tokenizer's Rust backend that truncates like ``tokenizer(texts, truncation=True,
    max_length=...)`` and does not pad. Calling it directly skips transformers' per-row Python conversions (~1.5x
    faster tokenisation); ``None`` for a slow (Python) tokenizer, which is then called as usual."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_padding()
    copy.enable_truncation(max_length, stride=0, strategy="longest_first", direction="right")
    return copy


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class Encoder:
    def __init__(self, loaded: LoadedModel, token_budget: int | None = None, max_batch_rows: int | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.max_length = loaded.config.max_length
        self.max_batch_rows = max_batch_rows or loaded.config.max_batch_rows
        self.pad_id = int(self.tokenizer.pad_token_id)
        self._fast_tokenizer = _truncating_backend(self.tokenizer, self.max_length)
        self._forward_fn = self.model
        if loaded.config.compile:
            # Freezing (CPU): weights become constants, so their bf16 casts and oneDNN packing happen once.
            options = {"freezing": True} if self.device.type == "cpu" else None
            self._forward_fn = torch.compile(self.model, dynamic=True, options=options)
        self.token_budget = token_budget or loaded.config.token_budget or self._default_token_budget()

    def _default_token_budget(self) -> int:
        """By device; on a CPU with a calibration file, measured once per CPU kind and model (``calibrate``)."""
        if self.device.type != "cpu" or not self.loaded.config.calibration_file:
            return default_token_budget(self.device)
        loaded = self.loaded
        key = calibrate.machine_key(loaded.hidden_size, loaded.num_layers, loaded.precision)

        def measure() -> dict[int, float]:
            def forward(ids, mask):
                with torch.inference_mode(), self._autocast():
                    return self.forward(ids, mask)

            return calibrate.measure_budget(forward, int(loaded.model.config.vocab_size))

        return calibrate.calibrated_budget(Path(loaded.config.calibration_file), key, measure)

    # -- tokenisation ---------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str], payload: Payload = None) -> TokenizedChunk[Payload]:
        lengths = np.zeros(len(texts), dtype=np.int64)
        pieces: list[np.ndarray] = []
        # Sub-batches bound the tokenizer's per-token Python objects to a few thousand rows at a time.
        for start in range(0, len(texts), TOKENIZE_ROWS):
            batch = texts[start : start + TOKENIZE_ROWS]
            if self._fast_tokenizer is not None:
                encoded = [encoding.ids for encoding in self._fast_tokenizer.encode_batch(batch)]
            else:
                encoded = self.tokenizer(batch, truncation=True, max_length=self.max_length, padding=False,
                                         return_attention_mask=False, return_token_type_ids=False)["input_ids"]
            lengths[start : start + len(encoded)] = [len(ids) for ids in encoded]
            pieces.extend(np.asarray(ids, dtype=np.int32) for ids in encoded)
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
        chunk = TokenizedChunk(payload, flat, offsets, int(np.count_nonzero(lengths >= self.max_length)))
        chunk.batches = plan_batches(lengths, self.token_budget, self.max_batch_rows)
        return chunk

    # -- forward --------------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.loaded.dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.loaded.dtype)
        return nullcontext()

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """CLS vectors of one padded batch as float32 numpy (may contain NaN; callers check). Runs inside the
        ``inference_mode`` + autocast context that :meth:`encode_tokenized` holds for a whole chunk."""
        out = self._forward_fn(input_ids=self._to_device(input_ids), attention_mask=self._to_device(attention_mask))
        return out.last_hidden_state[:, 0, :].float().cpu().numpy()

    def _encode_rows(self, chunk: TokenizedChunk, rows: np.ndarray, stats: EncodeStats) -> np.ndarray:
        input_ids, attention = pad_batch(chunk.flat_ids, chunk.offsets, rows, self.pad_id)
        try:
            vectors = self.forward(input_ids, attention)
        except Exception as err:  # noqa: BLE001 - only out-of-memory is handled, everything else re-raised
            if not _is_oom(err) or len(rows) == 1:
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            stats.oom_splits += 1
            half = len(rows) // 2
            return np.concatenate(
                [self._encode_rows(chunk, rows[:half], stats), self._encode_rows(chunk, rows[half:], stats)]
            )
        stats.batches += 1
        stats.real_tokens += int(attention.sum())
        stats.padded_tokens += int(attention.size)
        if not np.isfinite(vectors).all():
            if len(rows) == 1:
                tokens = int(chunk.lengths[rows[0]])
                raise NonFiniteEmbeddingError(f"non-finite embedding for a row of {tokens} tokens")
            stats.nan_batches_recomputed += 1
            vectors = np.concatenate([self._encode_rows(chunk, rows[i : i + 1], stats) for i in range(len(rows))])
        return vectors

    def encode_tokenized(self, chunk: TokenizedChunk) -> tuple[np.ndarray, EncodeStats]:
        stats = EncodeStats(rows=chunk.rows, truncated_rows=chunk.truncated)
        out = np.empty((chunk.rows, self.loaded.hidden_size), dtype=np.float32)
        started = time.perf_counter()
        with torch.inference_mode(), self._autocast():
            for rows in chunk.batches:
                out[rows] = self._encode_rows(chunk, rows, stats)
        stats.forward_seconds = time.perf_counter() - started
        return out, stats

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.empty((0, self.loaded.hidden_size), dtype=np.float32)
        return self.encode_tokenized(self.tokenize(texts))[0]

    def encode_stream(
        self, chunks: Iterable[tuple[Payload, list[str]]], prefetch: int = 1
    ) -> Iterator[tuple[Payload, np.ndarray, EncodeStats]]:
        """Encode chunks in order while a background thread reads and tokenises the next ones.

        At most ``prefetch`` tokenised chunks wait in the queue (plus the one being tokenised and the one being
        encoded), so memory is bounded by a few chunks however long the stream is.
        """
        pending: queue.Queue = queue.Queue(maxsize=prefetch)
        done = object()
        stop = threading.Event()

        def produce() -> None:
            try:
                for payload, texts in chunks:
                    if stop.is_set():
                        return
                    pending.put(self.tokenize(texts, payload))
                pending.put(done)
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises it
                pending.put(err)

        worker = threading.Thread(target=produce, name="paper-assets-tokenizer", daemon=True)
        worker.start()
        try:
            while True:
                item = pending.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                vectors, stats = self.encode_tokenized(item)
                yield item.payload, vectors, stats
        finally:
            stop.set()
            while worker.is_alive():
                try:
                    pending.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.05)
