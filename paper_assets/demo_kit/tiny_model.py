"""Offline stand-ins for SPECTER2: same architecture (BERT encoder + seq_bn adapter, reduction factor 16), saved in
the same on-disk formats (a transformers base-model folder and an adapters adapter folder), random weights.

They are NOT SPECTER2 and their vectors mean nothing; they exist so that the real loading, adapter activation,
batching and storage code runs where the real weights cannot be downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

NOT_SPECTER2 = (
    "# Offline stand-in model (NOT SPECTER2)\n\n"
    "Built by `paper_assets` with random weights in SPECTER2's architecture (BERT + seq_bn adapter `proximity`,\n"
    "reduction factor 16). Use it to exercise the pipeline offline; its embeddings carry no meaning.\n"
)


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    # BERT's 0.02 makes a random 12-layer model map every paper to nearly the same CLS vector (median cosine
    # between different papers 0.998), which hides numerical differences; 0.08 gives ~0.93, closer to a trained model.
    init_std: float = 0.08


TINY = ModelShape(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, vocab_size=8000)
# The smallest model of the architecture: the pipeline benchmark measures the data path around it.
PIPELINE = ModelShape(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=128, vocab_size=8000)
# Embeds at GPU-like rates on a CPU (hundreds of papers/s on 2 cores): what is not embedding shows as it would on a
# GPU, e.g. the seconds a Dagster run spends around each partition.
GPU_RATE = ModelShape(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512, vocab_size=31090)
# allenai/specter2_base: SciBERT scivocab (31,090 tokens), BERT-base encoder.
BERT_BASE = ModelShape(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, vocab_size=31090)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path):
    """A lower-cased WordPiece vocabulary (like scivocab_uncased) learned from the given texts."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wordpiece = BertWordPieceTokenizer(lowercase=True, strip_accents=None)
    wordpiece.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=1, show_progress=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    wordpiece.save_model(str(out_dir))
    tokenizer = BertTokenizerFast(vocab_file=str(out_dir / "vocab.txt"), do_lower_case=True)
    # SPECTER2's tokenizer sets no model_max_length either; callers must pass max_length=512 themselves.
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_model(
    out_dir: str | Path,
    texts: Iterable[str],
    shape: ModelShape = TINY,
    seed: int = 0,
    adapter_name: str = "proximity",
    adapter_init_std: float = 0.5,
    include_adapter_in_base: bool = False,
) -> tuple[Path, Path]:
    """Write ``out_dir/base`` (tokenizer + BERT) and ``out_dir/adapter`` (seq_bn adapter); return both paths.

    ``include_adapter_in_base`` also saves the adapter inside the base checkpoint: the broken layout that leaves
    no adapter active after ``load_adapter`` (used to test the guard).
    """
    from adapters import BertAdapterModel, SeqBnConfig
    from transformers import BertConfig

    out_dir = Path(out_dir)
    base_dir, adapter_dir = out_dir / "base", out_dir / "adapter"
    tokenizer = train_tokenizer(texts, shape.vocab_size, base_dir)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=max(shape.vocab_size, len(tokenizer)),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=512,
        initializer_range=shape.init_std,
    )
    model = BertAdapterModel(config)
    model.add_adapter(adapter_name, config=SeqBnConfig(reduction_factor=16))
    with torch.no_grad():
        # A visible effect, so that an adapter that is silently off changes the vectors measurably.
        for name, param in model.named_parameters():
            if f"adapters.{adapter_name}." in name and name.endswith("weight"):
                param.normal_(0.0, adapter_init_std)
            elif "LayerNorm.weight" in name:
                param.normal_(1.0, 0.3)  # trained models' norms vary between papers; fresh LayerNorms do not
            elif "LayerNorm.bias" in name:
                param.normal_(0.0, 0.2)
    model.save_adapter(str(adapter_dir), adapter_name)
    if not include_adapter_in_base:
        model.delete_adapter(adapter_name)
    model.save_pretrained(str(base_dir))
    for folder in (base_dir, adapter_dir):
        (folder / "README.md").write_text(NOT_SPECTER2, encoding="utf-8")
    (out_dir / "paper_assets_model.json").write_text(
        json.dumps({"kind": "offline stand-in, NOT SPECTER2", "shape": shape.__dict__, "seed": seed}, indent=2),
        encoding="utf-8",
    )
    return base_dir, adapter_dir
