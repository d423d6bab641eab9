"""Texts to token ids, as flat arrays: in the calling process, or in worker processes.

The ids are those of ``tokenizer(texts, truncation=True, max_length=...)`` (no padding, special tokens added),
returned as one flat ``int32`` array plus per-row lengths, so no per-token Python object outlives a call. Most
rows are tokenised word by word through a map of the words already seen (:class:`_WordCache`, the Rust
tokenizer's own normaliser and WordPiece model behind it). A :class:`TokenizerPool` runs the same
:class:`TextTokenizer` in worker processes: that per-word Python work then holds no GIL of the process that
launches kernels, which on a GPU host is what the device waits on. This module imports neither torch nor
transformers, so workers start in a second.
"""

from __future__ import annotations

import functools
import itertools
import json
import multiprocessing
import os
import re
import time
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
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")
# Distinct words kept with their ids: ~50 MB at most (per process). 2,423 real abstracts hold ~32k distinct words;
# when the map is full, new words are still tokenised right (by the WordPiece model), just not remembered.
MAX_CACHED_WORDS = 200_000


def _char_class(chars: list[str]) -> str:
    """A regex character class (``[...]``, ranges joined) holding exactly ``chars``."""
    codes = sorted(ord(c) for c in chars)
    parts, i = [], 0
    while i < len(codes):
        j = i
        while j + 1 < len(codes) and codes[j + 1] == codes[j] + 1:
            j += 1
        parts.append(re.escape(chr(codes[i])) + ("-" + re.escape(chr(codes[j])) if j > i else ""))
        i = j + 1
    return "[" + "".join(parts) + "]"


@functools.lru_cache(maxsize=1)
def _bert_pre_token_pattern() -> re.Pattern:
    """The words and lone punctuation ``BertPreTokenizer`` cuts text into, as one regex. Which characters (of the
    Basic Multilingual Plane) it splits on and which it isolates are asked of the pre-tokenizer itself, in one call
    (~0.15 s), so the classes follow its Unicode tables, not Python's."""
    from tokenizers.pre_tokenizers import BertPreTokenizer

    chars = [chr(c) for c in range(0x10000) if not 0xD800 <= c <= 0xDFFF and chr(c) != "a"]
    pieces = [piece for piece, _ in BertPreTokenizer().pre_tokenize_str(" ".join("a" + c + "a" for c in chars))]
    spaces, isolated, at = [], [], 0
    for c in chars:
        if pieces[at] == "a" + c + "a":
            at += 1
        elif pieces[at : at + 3] == ["a", c, "a"]:
            isolated.append(c)
            at += 3
        elif pieces[at : at + 2] == ["a", "a"]:
            spaces.append(c)
            at += 2
        else:
            raise ValueError(f"BertPreTokenizer splits 'a{c}a' ({ord(c):#x}) as {pieces[at : at + 3]}")
    return re.compile(f"[^{_char_class(spaces + isolated)[1:]}+|{_char_class(isolated)}")


class _WordCache:
    """BERT tokenisation with each distinct word's WordPiece ids remembered: the same ids as the Rust tokenizer
    with its normaliser, pre-tokenizer, WordPiece model and post-processor, 2.5-3.8x faster on real abstracts.

    Papers repeat words, and the Rust tokenizer runs WordPiece (and, through its alignment-tracking strings, the
    normaliser and pre-tokenizer) on every occurrence. Here, per row: the text is split at the special tokens as
    written (the tokenizer matches them before normalising); each piece is normalised (ASCII without control
    characters: lower-casing in Python, which is all BERT's normaliser does to it; otherwise the tokenizer's own
    normaliser); the normalised text is cut into words by one regex whose character classes come from the
    pre-tokenizer itself; a word's ids come from the map, or from the tokenizer's WordPiece model once; the row is
    truncated to ``max_length`` and wrapped in the post-processor's special tokens. Rows with characters beyond the
    Basic Multilingual Plane take the full tokenizer. Used only for a WordPiece model behind ``BertNormalizer``
    (or none) and ``BertPreTokenizer`` whose added tokens are matched as written."""

    @staticmethod
    def models(spec: dict) -> bool:
        """Whether the tokenizer (its JSON, parsed) is one this cache reproduces."""
        normalizer = spec.get("normalizer")
        return ((spec.get("model") or {}).get("type") == "WordPiece"
                and (normalizer is None or normalizer.get("type") == "BertNormalizer")
                and (spec.get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer"
                and all(not t.get("normalized", True) and not t.get("single_word")
                        for t in spec.get("added_tokens", [])))

    def __init__(self, tokenizer, spec: dict, max_length: int):
        if not self.models(spec):
            raise ValueError("the word cache reproduces only BERT WordPiece tokenizers (see _WordCache.models)")
        normalizer, added = spec.get("normalizer"), spec.get("added_tokens", [])
        self.lowercase = bool(normalizer and normalizer.get("lowercase"))
        self.normalizer = tokenizer.normalizer
        self.model = tokenizer.model
        self.words = _bert_pre_token_pattern().findall
        contents = sorted((t["content"] for t in added), key=len, reverse=True)
        self.specials = re.compile("(" + "|".join(re.escape(t) for t in contents) + ")") if contents else None
        self.special_ids = {t["content"]: [t["id"]] for t in added}
        self.cache: dict[str, list[int]] = {}
        self.prefix, self.suffix = self._special_ids(tokenizer)
        self.limit = max_length - len(self.prefix) - len(self.suffix)

    def _special_ids(self, tokenizer) -> tuple[list[int], list[int]]:
        """What the post-processor puts before and after a row's ids, found by encoding one word."""
        probe = "paper"
        around = tokenizer.encode("").ids
        ids, word = tokenizer.encode(probe).ids, [token.id for token in self.model.tokenize(probe)]
        for cut in range(len(around) + 1):
            if ids == around[:cut] + word + around[cut:]:
                return around[:cut], around[cut:]
        raise ValueError(f"cannot place {word} in {ids}: the post-processor adds more than special tokens")

    def applies_to(self, text: str) -> bool:
        return _ASTRAL.search(text) is None

    def _normalise(self, piece: str) -> str:
        if piece.isascii() and _ASCII_CONTROLS.search(piece) is None:
            return piece.lower() if self.lowercase else piece
        return self.normalizer.normalize_str(piece) if self.normalizer is not None else piece

    def _word_ids(self, word: str) -> list[int]:
        ids = [token.id for token in self.model.tokenize(word)]
        if len(self.cache) < MAX_CACHED_WORDS:
            self.cache[word] = ids
        return ids

    def ids(self, text: str) -> list[int]:
        cache, words, normalise = self.cache, self.words, self._normalise
        pieces = self.specials.split(text) if self.specials is not None else [text]
        ids = list(self.prefix)
        for index, piece in enumerate(pieces):
            if index % 2:  # an added token, as written
                ids += self.special_ids[piece]
                continue
            for word in words(normalise(piece)):
                word_ids = cache.get(word)
                ids += word_ids if word_ids is not None else self._word_ids(word)
        del ids[len(self.prefix) + self.limit :]
        ids += self.suffix
        return ids


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
    max_length=...)`` and not padding, through the word cache where it applies. Calling the backend directly skips
    transformers' per-row Python conversions (~1.5x faster). ``word_cache=False``: every row through the Rust
    tokenizer (what the bench compares with). Pickles as its JSON (workers rebuild it)."""

    def __init__(self, backend_json: str, max_length: int, word_cache: bool = True):
        from tokenizers import Tokenizer

        self.backend_json, self.max_length, self.use_word_cache = backend_json, max_length, word_cache
        self.tokenizer = Tokenizer.from_str(backend_json)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length, stride=0, strategy="longest_first", direction="right")
        spec = json.loads(backend_json)
        self.word_cache = (_WordCache(self.tokenizer, spec, max_length)
                           if word_cache and _WordCache.models(spec) else None)

    def __reduce__(self):
        return TextTokenizer, (self.backend_json, self.max_length, self.use_word_cache)

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if self.word_cache is None:
            return _encode_batch(self.tokenizer, texts)
        ids = [self.word_cache.ids(text) if self.word_cache.applies_to(text) else None for text in texts]
        others = [row for row, row_ids in enumerate(ids) if row_ids is None]
        for row, row_ids in zip(others, _encode_batch(self.tokenizer, [texts[r] for r in others]), strict=True):
            ids[row] = row_ids
        return ids  # type: ignore[return-value]

    def encode(self, texts: list[str]) -> TokenArrays:
        lengths = np.zeros(len(texts), dtype=np.int64)
        pieces: list[np.ndarray] = []
        for start in range(0, len(texts), TOKENIZE_ROWS):
            encoded = self._ids(texts[start : start + TOKENIZE_ROWS])
            lengths[start : start + len(encoded)] = [len(ids) for ids in encoded]
            pieces.append(np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32,
                                      count=int(lengths[start : start + len(encoded)].sum())))
        flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
        return TokenArrays(flat, lengths)


_WORKER_TOKENIZER: TextTokenizer | None = None


def _start_worker(tokenizer: TextTokenizer, rayon_threads: int) -> None:
    global _WORKER_TOKENIZER
    # Before the first encode: the Rust tokenizer sizes its thread pool once, from this.
    os.environ["RAYON_NUM_THREADS"] = str(rayon_threads)
    _WORKER_TOKENIZER = TextTokenizer(tokenizer.backend_json, tokenizer.max_length, tokenizer.use_word_cache)


def _worker_pid() -> int:
    time.sleep(0.01)  # long enough that one worker cannot take every task of a round while the others start
    return os.getpid()


def _encode_in_worker(texts: list[str]) -> TokenArrays:
    assert _WORKER_TOKENIZER is not None, "worker started without a tokenizer"
    return _WORKER_TOKENIZER.encode(texts)


class TokenizerPool:
    """``workers`` processes (spawned, so nothing of the parent's CUDA or threads is inherited) each holding a
    :class:`TextTokenizer`; :meth:`encode` splits the texts between them and joins the arrays in order. The pool is
    ready when built: every worker has started and built its tokenizer (a worker that cannot is raised here), so
    no worker is still importing while the first chunk is timed or embedded."""

    def __init__(self, tokenizer: TextTokenizer, workers: int, cores: int | None = None,
                 start_timeout_s: float = 300.0):
        if workers < 1:
            raise ValueError(f"a tokenizer pool needs at least one worker, got {workers}")
        self.workers = workers
        self.worker_pids: set[int] = set()
        cores = cores or usable_cores()
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start_worker,
                                         initargs=(tokenizer, max(1, cores // workers)))
        try:
            self._wait_for_workers(start_timeout_s)
        except BaseException:
            self.close()
            raise

    def _wait_for_workers(self, timeout_s: float) -> None:
        started = self.worker_pids
        deadline = time.monotonic() + timeout_s
        try:
            while len(started) < self.workers:
                # One round submits a task per worker: the first round spawns them all, later ones meet those started.
                started.update(future.result(timeout=max(0.0, deadline - time.monotonic()))
                               for future in [self._pool.submit(_worker_pid) for _ in range(self.workers)])
        except TimeoutError:
            raise TimeoutError(f"{len(started)} of {self.workers} tokenizer workers started in {timeout_s:.0f} s") \
                from None

    def encode(self, texts: list[str]) -> TokenArrays:
        if not texts:
            return TokenArrays.concat([])
        size = -(-len(texts) // self.workers)
        return TokenArrays.concat(list(self._pool.map(_encode_in_worker,
                                                      [texts[i : i + size] for i in range(0, len(texts), size)])))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
