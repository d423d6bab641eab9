"""The quality gate of one embedded partition, outside Dagster: the same checks `paper_embeddings` runs as blocking
asset checks, recorded in the home (``embeddings-<range>.checks.json``) so that `paper-assets publish` can publish
what the assets made and what `paper-assets embed` made into a home alike."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import gate, quality
from .fs import atomic_path, sha256_file
from .home import ProjectHome
from .quality import GatePolicy
from .ranges import IdRange

if TYPE_CHECKING:
    from .encoder import Encoder


@dataclass
class PartitionVerdict:
    gate: gate.Gate
    outcomes: list[quality.Outcome]
    scan: quality.EmbeddingScan
    norm_stats: dict


# The canary's adapter-less vector per encoder: a property of the base model, which a process never changes, so it
# is computed once per encoder instead of once per partition (on a CPU, a BERT-base pass of its own per range).
_WITHOUT_ADAPTER: weakref.WeakKeyDictionary[Encoder, np.ndarray] = weakref.WeakKeyDictionary()


def canary_vectors(encoder: Encoder, layout: ProjectHome) -> dict[str, np.ndarray]:
    """The canary text's vector now (through the same forward as the partitions: compiled where they were), its
    stored reference for this fingerprint + precision (stored on first use), and with the adapter switched off."""
    loaded = encoder.loaded
    current = encoder.encode([quality.CANARY_TEXT])[0]
    reference_file = layout.canary_file(loaded.fingerprint, loaded.precision)
    if not reference_file.exists():
        with atomic_path(reference_file) as tmp, open(tmp, "wb") as handle:
            np.save(handle, current)
    reference = np.load(reference_file)
    if encoder not in _WITHOUT_ADAPTER:
        active = loaded.model.active_adapters
        # Eager: a compiled graph would recompile for the switched-off adapter (~40 s on a CPU with freezing).
        from .model import adapter_warning_silenced

        with adapter_warning_silenced(), encoder.eager():
            loaded.model.set_active_adapters(None)
            try:
                _WITHOUT_ADAPTER[encoder] = encoder.encode([quality.CANARY_TEXT])[0]
            finally:
                loaded.model.set_active_adapters(active)
    return {"current": current, "reference": reference, "without_adapter": _WITHOUT_ADAPTER[encoder]}


def evaluate_partition(layout: ProjectHome, rng: IdRange, embeddings_file: Path, encoder: Encoder,
                       papers_meta: dict, model_meta: dict, policy: GatePolicy) -> PartitionVerdict:
    """Run every blocking check on a partition's embeddings file and record the verdict in the home."""
    loaded = encoder.loaded
    scan = quality.scan_embeddings(embeddings_file, rng)
    norm_stats = quality.robust_stats(scan.norms)
    registry = gate.update_norm_registry(layout, rng.key, loaded.fingerprint, norm_stats)
    canary = canary_vectors(encoder, layout)
    band = list(policy.norm_band) if policy.norm_band else []
    outcomes = [
        quality.check_count(scan.rows, int(papers_meta.get("rows", -1)), papers_meta.get("skipped", {})),
        quality.check_vectors(scan, loaded.hidden_size),
        quality.check_ids(scan, rng),
        quality.check_norms(scan.norms, gate.norm_band(registry, loaded.fingerprint, policy.norm_k, band),
                            policy.max_norm_outlier_fraction),
        quality.check_canary(canary["current"], canary["reference"], canary["without_adapter"], loaded.precision),
    ]
    decision = gate.Gate(file_sha256=sha256_file(embeddings_file), rows=scan.rows,
                         passed=all(o.passed for o in outcomes), failed=[o.name for o in outcomes if not o.passed],
                         model=model_meta)
    gate.write_gate(layout, rng, decision)
    return PartitionVerdict(decision, outcomes, scan, norm_stats)
