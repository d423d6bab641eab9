"""Texts to token ids, as flat arrays: in the calling process, or in worker processes.

The ids are those of ``tokenizer(texts, truncation=True, max_length=...)`` (no padding, special tokens added),
returned as one flat ``int32`` array plus per-row lengths, so no per-token Python object outlives a call. A
:class:`TokenizerPool` runs the same :class:`TextTokenizer` in worker processes: the per-token Python work (ids
lists to arrays, the ASCII fast path) then holds no GIL of the process that launches kernels, which on a GPU host is
what the device waits on. This module imports neither torch nor transformers, so workers start in a second.
"""

from __future__ import annotations

import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

# Sub-batches bound the tokenizer's per-token Python objects to a few thousand rows at a time.
TOKENIZE_ROWS = 2048


@dataclass
class TokenArrays:
    flat: np.ndarray  # int32, every row's ids one after another
    lengths: np.ndarray  # int64, ids per row

    @staticmethod
    def concat(parts: list[TokenArrays]) -> TokenArrays:
        if not parts:
            return TokenArrays(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64))
        return TokenArrays(np.concatenate([p.flat for p in parts]), np.concatenate([p.lengths for p in parts]))


# What BERT's normaliser deletes from ASCII text (clean_text: C0 controls but tab/newline/return, and DEL).
_ASCII_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class _AsciiFastPath:
    """Tokenises ASCII texts without running BERT's normaliser, to the same ids.

    On ASCII text free of control characters, ``BertNormalizer`` (clean text, CJK spacing, accent stripping via
    NFD, lowercase) changes nothing but the case of letters, and it costs ~40% of tokenisation: here the text is
    lowercased in Python (special tokens such as ``[SEP]`` kept as written, since the tokenizer matches them in the
    raw text before normalising) and given to a copy of the tokenizer without a normaliser. Other texts go through
    the full tokenizer. Used only when the tokenizer's normaliser is a ``BertNormalizer`` and every special token
    contains an upper-case letter (so lower-cased text can never form one that the raw text did not)."""

    def __init__(self, backend_json: str):
        import json

        from tokenizers import Tokenizer

        spec = json.loads(backend_json)
        normalizer = spec.get("normalizer") or {}
        raw_matched = [t["content"] for t in spec.get("added_tokens", []) if not t.get("normalized", True)]
        self.usable = normalizer.get("type") == "BertNormalizer" and all(
            any(c.isupper() for c in token) for token in raw_matched)
        self.lowercase = bool(normalizer.get("lowercase"))
        self._specials = (re.compile("(" + "|".join(re.escape(t) for t in sorted(raw_matched, key=len, reverse=True))
                                     + ")") if raw_matched else None)
        self.tokenizer = Tokenizer.from_str(backend_json)
        self.tokenizer.normalizer = None

    def applies_to(self, text: str) -> bool:
        return text.isascii() and _ASCII_CONTROLS.search(text) is None

    def normalise(self, text: str) -> str:
        if not self.lowercase:
            return text
        if self._specials is None:
            return text.lower()
        parts = self._specials.split(text)
        parts[::2] = [part.lower() for part in parts[::2]]
        return "".join(parts)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(device_type: str, cores: int | None = None) -> int:
    """Tokenizer worker processes when the setting is ``-1`` (auto): on a GPU host one per four cores (at most 8),
    each with the cores' share of Rust threads; on a CPU 0 (tokenise in process: the model is the bottleneck
    there and every core is already busy with it)."""
    if device_type != "cuda":
        return 0
    cores = cores or usable_cores()
    return max(1, min(8, cores // 4))


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we never read: ~20% faster.
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return [encoding.ids for encoding in encode(texts)]




class TextTokenizer:
    """A fast tokenizer's Rust backend (its JSON) truncating like ``tokenizer(texts, truncation=True,
    max_length=...)`` and not padding, with the ASCII fast path where it applies. Calling the backend directly skips
    transformers' per-row Python conversions (~1.5x faster). Pickles as its JSON (workers rebuild it)."""

    def __init__(self, backend_json: str, max_length: int):
        from tokenizers import Tokenizer

        self.backend_json, self.max_length = backend_json, max_length
        self.tokenizer = Tokenizer.from_str(backend_json)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length, stride=0, strategy="longest_first", direction="right")
        fast_path = _AsciiFastPath(self.tokenizer.to_str())
        self.ascii = fast_path if fast_path.usable else None

    def __reduce__(self):
        return TextTokenizer, (self.backend_json, self.max_length)

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if self.ascii is None:
            return _encode_batch(self.tokenizer, texts)
        ascii_rows, other_rows = [], []
        for row, text in enumerate(texts):
            (ascii_rows if self.ascii.applies_to(text) else other_rows).append(row)
        ids: list[list[int]] = [[] for _ in texts]
        for rows, tokenizer, prepare in ((ascii_rows, self.ascii.tokenizer, self.ascii.normalise),
                                         (other_rows, self.tokenizer, str)):
            for row, row_ids in zip(rows, _encode_batch(tokenizer, [prepare(texts[r]) for r in rows]), strict=True):
                ids[row] = row_ids
        return ids

    def encode(self, texts: list[str]) -> TokenArrays:
        lengths = np.zeros(len(texts), dtype=np.int64)
        pieces: list[np.ndarray] = []
        for start in range(0, len(texts), TOKENIZE_ROWS):
            encoded = self._ids(texts[start : start + TOKENIZE_ROWS])
            lengths[start : start + len(encoded)] = [len(ids) for ids in encoded]
            pieces.extend(np.asarray(ids, dtype=np.int32) for ids in encoded)
        flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
        return TokenArrays(flat, lengths)


_WORKER_TOKENIZER: TextTokenizer | None = None


def _start_worker(tokenizer: TextTokenizer, rayon_threads: int) -> None:
    global _WORKER_TOKENIZER
    # Before the first encode: the Rust tokenizer sizes its thread pool once, from this.
    os.environ["RAYON_NUM_THREADS"] = str(rayon_threads)
    _WORKER_TOKENIZER = TextTokenizer(tokenizer.backend_json, tokenizer.max_length)


def _encode_in_worker(texts: list[str]) -> TokenArrays:
    assert _WORKER_TOKENIZER is not None, "worker started without a tokenizer"
    return _WORKER_TOKENIZER.encode(texts)


class TokenizerPool:
    """``workers`` processes (spawned, so nothing of the parent's CUDA or threads is inherited) each holding a
    :class:`TextTokenizer`; :meth:`encode` splits the texts between them and joins the arrays in order."""

    def __init__(self, tokenizer: TextTokenizer, workers: int, cores: int | None = None):
        if workers < 1:
            raise ValueError(f"a tokenizer pool needs at least one worker, got {workers}")
        self.workers = workers
        cores = cores or usable_cores()
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start_worker,
                                         initargs=(tokenizer, max(1, cores // workers)))

    def encode(self, texts: list[str]) -> TokenArrays:
        if not texts:
            return TokenArrays.concat([])
        size = -(-len(texts) // self.workers)
        return TokenArrays.concat(list(self._pool.map(_encode_in_worker,
                                                      [texts[i : i + size] for i in range(0, len(texts), size)])))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
