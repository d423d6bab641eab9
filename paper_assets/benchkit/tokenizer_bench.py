"""Tokenising real abstracts on one core: the word cache against the Rust tokenizer, same texts, same process.

The data path's synthetic papers repeat a few hundred words, which flatters a word cache; the SciRepEval samples
(2,423 papers, ~20% of rows with non-ASCII characters) do not. The tokenizer is a SciBERT-sized lower-cased
WordPiece vocabulary (31,090 pieces, like scivocab_uncased) learned from those texts; the rows are built by the
engine's own text rules (``title [SEP] abstract``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..demo_kit import sample_source
from ..demo_kit.tiny_model import BERT_BASE, train_tokenizer
from ..engine.text import paper_texts
from ..engine.tokenization import TextTokenizer, usable_cores
from .data_path import pin_to_cores

PASSES = 3


def _texts(papers_file: Path) -> list[str]:
    papers = sample_source.read_jsonl_papers(papers_file)
    text, _ = paper_texts(pa.array([p.get("title") for p in papers], pa.string()),
                          pa.array([p.get("abstract") for p in papers], pa.string()), "[SEP]")
    return [t for t in text.to_pylist() if t is not None]


def _rate(encode, texts: list[str]) -> tuple[float, object]:
    start = time.perf_counter()
    arrays = encode(texts)
    return len(texts) / (time.perf_counter() - start), arrays


def measure(papers_file: str, work: str) -> dict:
    """In a process of its own: pinned to one core, the Rust tokenizer on one thread."""
    machine_cores = usable_cores()
    pin_to_cores(1)
    texts = _texts(Path(papers_file))
    folder = Path(work) / "tokenizer-bench"
    tokenizer = train_tokenizer(texts, BERT_BASE.vocab_size, folder)
    cached = TextTokenizer(tokenizer.backend_tokenizer.to_str(), 512)
    rust = TextTokenizer(tokenizer.backend_tokenizer.to_str(), 512, word_cache=False)
    if cached.word_cache is None:
        raise RuntimeError("the word cache does not apply to a BERT WordPiece tokenizer: nothing to measure")
    cold, first = _rate(cached.encode, texts)
    warm = max(_rate(cached.encode, texts)[0] for _ in range(PASSES))
    rust_rates = [_rate(rust.encode, texts) for _ in range(PASSES)]
    reference = rust_rates[0][1]
    if not (np.array_equal(first.flat, reference.flat) and np.array_equal(first.lengths, reference.lengths)):
        raise AssertionError("the word cache's ids differ from the Rust tokenizer's on the real abstracts")
    rust_rate = max(rate for rate, _ in rust_rates)
    return {"papers": len(texts), "cores": 1, "usable_cores_of_machine": machine_cores,
            "non_ascii_rows": sum(not t.isascii() for t in texts),
            "rows_beyond_the_bmp": sum(not cached.word_cache.applies_to(t) for t in texts),
            "distinct_words": len(cached.word_cache.cache), "mean_tokens": float(reference.lengths.mean()),
            "word_cache_first_pass_papers_per_second": cold, "word_cache_papers_per_second": warm,
            "rust_tokenizer_papers_per_second": rust_rate, "speedup_first_pass": cold / rust_rate,
            "speedup": warm / rust_rate, "ids_equal": True,
            "note": "first pass: every word new to the map; later passes: best of 3, as is the Rust rate"}


def print_result(result: dict) -> None:
    print(f"tokenising {result['papers']:,} real abstracts on 1 core ({result['non_ascii_rows']} rows non-ASCII, "
          f"{result['distinct_words']:,} distinct words): word cache "
          f"{result['word_cache_first_pass_papers_per_second']:.0f} papers/s on the first pass, "
          f"{result['word_cache_papers_per_second']:.0f} later; Rust tokenizer "
          f"{result['rust_tokenizer_papers_per_second']:.0f} ({result['speedup_first_pass']:.1f}x / "
          f"{result['speedup']:.1f}x; same ids)")
