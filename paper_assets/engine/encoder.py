"""The embedding engine: texts in, float32 CLS vectors out, in the input order.

Per chunk of texts: tokenise (truncation at max_length, no padding) into one flat id array, plan length-sorted
token-budget batches of a few padded widths (``batching``), copy the chunk's ids to the device once, and for each
batch gather the padded ids and mask there, run the model under ``torch.inference_mode`` and keep the CLS rows on
the device. The chunk's vectors come back in one copy, after the next chunk's batches are queued: the launching
thread never waits for the GPU between batches, and the GPU never waits for the host between chunks. Tokenising
the next chunks overlaps all of it (a background thread feeding a bounded queue; on GPU hosts the tokenisation runs
in worker processes, ``tokenization.TokenizerPool``, since its word cache is Python that holds the GIL; on a CPU it
takes ~0.2% of a chunk's time beside a BERT-base forward). CPU and CUDA
run this same algorithm; on the CPU the copies are no-ops. Reduced precision (bf16/fp16) is autocast on every
device: weights stay fp32, matmuls run in the low precision, LayerNorm/softmax/residual sums stay fp32. One
autocast context spans a chunk, but autocast's weight cache does not work under ``inference_mode``, so an eager
model casts every weight in every batch. On CUDA the model is ``torch.compile``d by default (``device.compile_wanted``),
which fuses those casts and sums; on a CPU, where compiling is measured to pay (``tuning``), inductor's
freezing folds the casts and packs the weights for oneDNN once. How it runs (compiled or eager, the token budget)
is decided before the first chunk by ``tuning.plan_encoding``; the forward pass itself is ``forward.ModelForward``.

Failure rules (counted in :class:`EncodeStats`):
- a batch whose output has NaN/Inf is recomputed one row at a time (no padding, the known trigger); a row that
  is still non-finite raises :class:`NonFiniteEmbeddingError`;
- a batch that runs out of memory is split in half and retried, down to single rows.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
import torch

from .batching import bucket_rows, full_rows, pad_on_device, padded_width, plan_batches
from .device import default_pad_multiple
from .encode_stats import EncodeStats
from .forward import ModelForward
from .model import LoadedModel
from .tokenization import TextTokenizer, TokenArrays, TokenizerPool, default_workers
from .tuning import plan_encoding

Payload = TypeVar("Payload")


class NonFiniteEmbeddingError(RuntimeError):
    pass


@dataclass
class TokenizedChunk(Generic[Payload]):
    """A chunk's token ids, flat: row ``i`` is ``flat_ids[offsets[i]:offsets[i + 1]]``. Batch ``b`` is the rows
    ``order[bounds[b]:bounds[b + 1]]`` (``order`` sorts the rows longest first), padded to ``widths[b]`` and run as
    ``run_rows[b]`` rows (its rows, then copies of its last row up to a bucketed row count)."""

    payload: Payload
    flat_ids: np.ndarray
    offsets: np.ndarray
    truncated: int
    order: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    bounds: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    widths: list[int] = field(default_factory=list)
    run_rows: list[int] = field(default_factory=list)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def rows(self) -> int:
        return len(self.offsets) - 1

    @property
    def batches(self) -> list[np.ndarray]:
        return [self.order[a:b] for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True)]


@dataclass
class _LaunchedChunk:
    """A chunk whose batches are queued on the device; :meth:`Encoder._finish` waits for and collects them."""

    chunk: TokenizedChunk
    stats: EncodeStats
    sorted_lengths: np.ndarray  # row lengths in batch order (host)
    started: float = 0.0  # when its batches began to run (or to be queued)
    flat_ids: torch.Tensor | None = None  # the chunk's ids, starts and lengths (sorted order) on the device
    starts: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    vectors: torch.Tensor | None = None  # sorted order, float32, on the host once copied
    copied: torch.cuda.Event | None = None


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class Encoder:
    def __init__(self, loaded: LoadedModel, token_budget: int | None = None, max_batch_rows: int | None = None,
                 pad_multiple: int | None = None, expected_rows: int | None = None):
        """``expected_rows``: how many rows this encoder will embed, where the caller knows (``compile=auto`` on a
        CPU then compiles only if the run is long enough to repay the compilation); None: a long-lived encoder."""
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.max_length = loaded.config.max_length
        self.max_batch_rows = max_batch_rows or loaded.config.max_batch_rows
        self.pad_multiple = pad_multiple or loaded.config.pad_multiple or default_pad_multiple(self.device)
        self.pad_id = int(self.tokenizer.pad_token_id)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)  # None: a slow (Python) tokenizer
        self.text_tokenizer = TextTokenizer(backend.to_str(), self.max_length) if backend is not None else None
        workers = loaded.config.tokenizer_workers
        if workers < 0:
            workers = default_workers(self.device.type)
        self._pool = TokenizerPool(self.text_tokenizer, workers) if workers and self.text_tokenizer else None
        self._positions = torch.arange(max(self.max_length, 1), device=self.device)
        self._forward = ModelForward(loaded)
        self._configured_budget = token_budget
        plan = plan_encoding(self._forward, expected_rows, token_budget)
        self.compiled, self.token_budget = plan.compiled, plan.token_budget
        if self.compiled or self.device.type == "cuda":
            self.warm_up()

    def prepare_for(self, rows: int) -> None:
        """A long-lived encoder about to embed ``rows`` rows decides as a run of that size would: an eager one
        compiles now where that many rows repay the compilation (``compile=auto`` on a CPU); compiled stays compiled.
        """
        if self.compiled or self.device.type == "cuda":
            return
        plan = plan_encoding(self._forward, rows, self._configured_budget)
        if plan.compiled:
            self.compiled, self.token_budget = True, plan.token_budget
            self.warm_up()

    def warm_up(self) -> None:
        """Every padded width (and on a GPU the partial batches' row counts) once, before the first chunk."""
        self._forward.warm_up(self.forward, self.token_budget, self.max_batch_rows, self.pad_multiple, self.max_length)

    @contextlib.contextmanager
    def eager(self) -> Iterator[Encoder]:
        """Inside the block the uncompiled model runs: for one-off passes through a changed model (the canary with
        the adapter switched off), which a compiled graph would recompile for."""
        compiled, self.compiled = self.compiled, False
        try:
            yield self
        finally:
            self.compiled = compiled

    # -- tokenisation ---------------------------------------------------------------------------------------------
    def _token_arrays(self, texts: list[str]) -> TokenArrays:
        if self._pool is not None:
            return self._pool.encode(texts)
        if self.text_tokenizer is not None:
            return self.text_tokenizer.encode(texts)
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=False,
                             return_attention_mask=False, return_token_type_ids=False)["input_ids"] if texts else []
        return TokenArrays.concat([TokenArrays(np.asarray(row, dtype=np.int32), np.array([len(row)]))
                                   for row in ids])

    def tokenize(self, texts: list[str], payload: Payload = None) -> TokenizedChunk[Payload]:
        arrays = self._token_arrays(texts)
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(arrays.lengths, out=offsets[1:])
        truncated = int(np.count_nonzero(arrays.lengths >= self.max_length))
        return self.plan(TokenizedChunk(payload, arrays.flat, offsets, truncated))

    def close(self) -> None:
        """Stop the tokenizer worker processes, if any (they also stop when this process exits)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def plan(self, chunk: TokenizedChunk) -> TokenizedChunk:
        """Cut a tokenised chunk into this encoder's batches (sets ``order``, ``bounds`` and ``widths``)."""
        lengths = chunk.lengths
        batches = plan_batches(lengths, self.token_budget, self.max_batch_rows, self.pad_multiple, self.max_length)
        chunk.order = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
        chunk.bounds = np.zeros(len(batches) + 1, dtype=np.int64)
        np.cumsum([len(batch) for batch in batches], out=chunk.bounds[1:])
        chunk.widths = [padded_width(int(lengths[b].max()), self.pad_multiple, self.max_length) for b in batches]
        chunk.run_rows = [bucket_rows(len(batch), full_rows(width, self.token_budget, self.max_batch_rows))
                          for batch, width in zip(batches, chunk.widths, strict=True)]
        return chunk

    # -- forward --------------------------------------------------------------------------------------------------
    def _upload(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """CLS vectors (float32, on the device) of one padded batch already on the device; may contain NaN
        (checked per chunk). Runs inside the ``inference_mode`` + autocast context held for a whole chunk."""
        return self._forward.cls(input_ids, attention_mask, self.compiled)

    def _encode_slice(self, launched: _LaunchedChunk, first: int, end: int, width: int,
                      run_rows: int | None = None) -> torch.Tensor:
        """Vectors of the sorted rows ``first:end`` padded to ``width`` and run as ``run_rows`` rows (copies of the
        last row fill the batch; their vectors are dropped); out of memory: halves, down to one row."""
        stats = launched.stats
        starts, lengths = launched.starts[first:end], launched.lengths[first:end]
        run_rows = max(run_rows or 0, end - first)
        if run_rows > end - first:
            extra = run_rows - (end - first)
            starts, lengths = torch.cat([starts, starts[-1:].expand(extra)]), torch.cat([lengths,
                                                                                        lengths[-1:].expand(extra)])
        ids, mask = pad_on_device(launched.flat_ids, starts, lengths, width, self.pad_id, self._positions)
        try:
            vectors = self.forward(ids, mask)[: end - first]
        except Exception as err:  # noqa: BLE001 - only out-of-memory is handled, everything else re-raised
            if not _is_oom(err) or end - first == 1:
                raise
            del ids, mask
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            stats.oom_splits += 1
            middle = (first + end) // 2
            middle_width = padded_width(int(launched.sorted_lengths[middle]), self.pad_multiple, self.max_length)
            return torch.cat([self._encode_slice(launched, first, middle, width),
                              self._encode_slice(launched, middle, end, middle_width)])
        stats.batches += 1
        stats.real_tokens += int(launched.sorted_lengths[first:end].sum())
        stats.padded_tokens += run_rows * width
        return vectors

    def _launch(self, chunk: TokenizedChunk) -> _LaunchedChunk:
        """Queue every batch of ``chunk`` on the device and the copy of its vectors back; does not wait.

        A CPU has no queue to put work on: there the batches run when the chunk is collected (:meth:`_finish`),
        in the same order, so a stream's clock charges each chunk with its own compute on either device."""
        launched = _LaunchedChunk(chunk, EncodeStats(rows=chunk.rows, truncated_rows=chunk.truncated),
                                  chunk.lengths[chunk.order])
        if self.device.type == "cuda":
            self._run_batches(launched)
        return launched

    def _run_batches(self, launched: _LaunchedChunk) -> None:
        chunk = launched.chunk
        launched.started = time.perf_counter()
        if not chunk.rows:
            launched.vectors = torch.empty((0, self.loaded.hidden_size), dtype=torch.float32)
            return
        with torch.inference_mode(), self._forward.autocast():
            launched.flat_ids = self._upload(chunk.flat_ids).long()
            launched.starts = self._upload(chunk.offsets[:-1][chunk.order])
            launched.lengths = self._upload(launched.sorted_lengths)
            vectors = torch.empty((chunk.rows, self.loaded.hidden_size), dtype=torch.float32, device=self.device)
            for first, end, width, run_rows in zip(chunk.bounds[:-1].tolist(), chunk.bounds[1:].tolist(),
                                                   chunk.widths, chunk.run_rows, strict=True):
                vectors[first:end] = self._encode_slice(launched, first, end, width, run_rows)
            if self.device.type == "cuda":
                launched.vectors = torch.empty(vectors.shape, dtype=torch.float32, pin_memory=True)
                launched.vectors.copy_(vectors, non_blocking=True)
                launched.copied = torch.cuda.Event()
                launched.copied.record()
            else:
                launched.vectors = vectors.to("cpu")

    def _finish(self, launched: _LaunchedChunk) -> tuple[np.ndarray, EncodeStats]:
        """Wait for a launched chunk, apply the NaN rule, and return its vectors in the chunk's row order."""
        if launched.vectors is None:
            self._run_batches(launched)
        if launched.copied is not None:
            launched.copied.synchronize()
        chunk, stats, sorted_lengths = launched.chunk, launched.stats, launched.sorted_lengths
        sorted_vectors = launched.vectors.numpy()
        bad = np.flatnonzero(~np.isfinite(sorted_vectors).all(axis=1))
        for batch in np.unique(np.searchsorted(chunk.bounds, bad, side="right") - 1).tolist():
            first, end = int(chunk.bounds[batch]), int(chunk.bounds[batch + 1])
            if end - first > 1:
                stats.nan_batches_recomputed += 1
                with torch.inference_mode(), self._forward.autocast():
                    for row in range(first, end):
                        sorted_vectors[row] = self._encode_slice(launched, row, row + 1,
                                                                 int(sorted_lengths[row])).cpu().numpy()
            finite = np.isfinite(sorted_vectors[first:end]).all(axis=1)
            if not finite.all():
                tokens = int(sorted_lengths[first + int(np.argmin(finite))])
                raise NonFiniteEmbeddingError(f"non-finite embedding for a row of {tokens} tokens")
        out = np.empty_like(sorted_vectors)
        out[chunk.order] = sorted_vectors
        stats.forward_seconds = time.perf_counter() - launched.started
        return out, stats

    def encode_tokenized(self, chunk: TokenizedChunk) -> tuple[np.ndarray, EncodeStats]:
        return self._finish(self._launch(chunk))

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.empty((0, self.loaded.hidden_size), dtype=np.float32)
        return self.encode_tokenized(self.tokenize(texts))[0]

    def encode_stream(
        self, chunks: Iterable[tuple[Payload, list[str]]], prefetch: int = 2
    ) -> Iterator[tuple[Payload, np.ndarray, EncodeStats]]:
        """Encode chunks in order while a background thread reads and tokenises the next ones.

        At most ``prefetch`` tokenised chunks wait in the queue (plus the one being tokenised, the one queued on
        the device and the one being collected), so memory is bounded by a few chunks however long the stream is.
        Chunk ``i`` is collected after chunk ``i + 1`` is queued, so the device always has work.
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
        in_flight: _LaunchedChunk | None = None
        try:
            while True:
                item = pending.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                launched = self._launch(item)
                if in_flight is not None:
                    yield (in_flight.chunk.payload, *self._finish(in_flight))
                in_flight = launched
            if in_flight is not None:
                yield (in_flight.chunk.payload, *self._finish(in_flight))
        finally:
            stop.set()
            while worker.is_alive():
                try:
                    pending.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.05)
