"""Quality rules for a partition's embeddings (pure functions; the Dagster checks report them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .fs import parquet_file
from .ranges import IdRange
from .schemas import vectors_of

CANARY_TEXT = (
    "SPECTER2 canary [SEP] A fixed paper used to verify that the proximity adapter is active and that the "
    "weights and precision produce the vectors they were fingerprinted with."
)


@dataclass(frozen=True)
class GatePolicy:
    """The thresholds of a partition's quality gate (the settings' and the resource's defaults come from here)."""

    norm_k: float = 8.0  # norm band: median ± k·MAD across the home's partitions
    norm_band: tuple[float, float] | None = None  # a fixed [low, high] band instead
    max_norm_outlier_fraction: float = 0.001


@dataclass
class Outcome:
    name: str
    passed: bool
    description: str
    metadata: dict = field(default_factory=dict)


@dataclass
class EmbeddingScan:
    """One streaming pass over an embeddings file."""

    rows: int = 0
    dim: int = 0
    non_finite_rows: int = 0
    zero_rows: int = 0
    duplicate_ids: int = 0
    out_of_range_ids: int = 0
    norms: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))


def scan_embeddings(path, rng: IdRange) -> EmbeddingScan:
    parquet = parquet_file(path)
    scan = EmbeddingScan(dim=parquet.schema_arrow.field("embedding").type.list_size)
    ids, norms = [], []
    for batch in parquet.iter_batches(batch_size=8192, columns=["corpusid", "embedding"]):
        vectors = vectors_of(batch)
        finite = np.isfinite(vectors).all(axis=1)
        scan.non_finite_rows += int((~finite).sum())
        scan.zero_rows += int((np.abs(vectors).max(axis=1, initial=0.0) == 0).sum())
        batch_norms = np.linalg.norm(np.where(np.isfinite(vectors), vectors, 0.0), axis=1)
        norms.append(batch_norms.astype(np.float32))
        ids.append(batch.column("corpusid").to_numpy())
        scan.rows += batch.num_rows
    all_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    scan.duplicate_ids = int(len(all_ids) - len(np.unique(all_ids)))
    scan.out_of_range_ids = int(((all_ids < rng.lo) | (all_ids > rng.hi)).sum())
    scan.norms = np.concatenate(norms) if norms else np.zeros(0, dtype=np.float32)
    return scan


def robust_stats(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {"count": 0}
    median = float(np.median(values))
    return {
        "count": int(len(values)),
        "min": float(values.min()),
        "median": median,
        "max": float(values.max()),
        "mad": float(np.median(np.abs(values - median))),
    }


def check_count(rows: int, eligible: int, skipped: dict) -> Outcome:
    return Outcome(
        "row_count",
        rows == eligible,
        f"{rows} embeddings for {eligible} eligible source rows",
        {"embeddings": rows, "eligible_source_rows": eligible, **{f"skipped_{k}": v for k, v in skipped.items()}},
    )


def check_vectors(scan: EmbeddingScan, hidden_size: int) -> Outcome:
    passed = scan.non_finite_rows == 0 and scan.zero_rows == 0 and scan.dim == hidden_size
    return Outcome(
        "vectors_valid",
        passed,
        "no NaN/Inf or all-zero vectors, dimension equals the model's hidden size",
        {"non_finite_rows": scan.non_finite_rows, "zero_rows": scan.zero_rows, "dimension": scan.dim,
         "hidden_size": hidden_size},
    )


def check_ids(scan: EmbeddingScan, rng: IdRange) -> Outcome:
    return Outcome(
        "corpusid_unique_in_range",
        scan.duplicate_ids == 0 and scan.out_of_range_ids == 0,
        f"every corpusid unique and inside {rng.key}",
        {"duplicate_ids": scan.duplicate_ids, "out_of_range_ids": scan.out_of_range_ids},
    )


def norm_band(reference_medians: list[float], reference_mads: list[float], k: float) -> tuple[float, float]:
    """median ± k·MAD pooled over partitions (MAD floored at 1% of the median so a very tight set stays usable)."""
    median = float(np.median(reference_medians))
    mad = max(float(np.median(reference_mads)), 0.01 * abs(median))
    return median - k * mad, median + k * mad


def check_norms(norms: np.ndarray, band: tuple[float, float], max_outlier_fraction: float) -> Outcome:
    stats = robust_stats(norms)
    low, high = band
    outliers = int(((norms < low) | (norms > high)).sum()) if len(norms) else 0
    fraction = outliers / len(norms) if len(norms) else 0.0
    return Outcome(
        "norms_in_band",
        fraction <= max_outlier_fraction,
        f"L2 norms inside [{low:.4g}, {high:.4g}] for all but {max_outlier_fraction:.2%} of rows",
        {**{f"norm_{k}": v for k, v in stats.items() if k != "count"}, "band_low": low, "band_high": high,
         "outliers": outliers, "outlier_fraction": fraction},
    )


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def canary_tolerance(precision: str) -> float:
    return 0.99999 if precision == "fp32" else 0.999


def check_canary(current: np.ndarray, reference: np.ndarray, without_adapter: np.ndarray, precision: str) -> Outcome:
    """The canary must reproduce its reference vector, and the adapter must change it measurably."""
    similarity = cosine(current, reference)
    adapter_effect = 1.0 - cosine(reference, without_adapter)
    tolerance = canary_tolerance(precision)
    return Outcome(
        "adapter_canary",
        similarity >= tolerance and adapter_effect > 1e-4,
        "the canary text embeds to its fingerprinted reference vector and differs from the adapter-less vector",
        {"cosine_to_reference": similarity, "required": tolerance, "adapter_effect_1_minus_cos": adapter_effect},
    )


def markdown_histogram(values: np.ndarray, bins: int = 12, width: int = 30, title: str = "L2 norm") -> str:
    """A Markdown table of equal-width bins: lower and upper edge, rows, and a bar scaled to the fullest bin."""
    if len(values) == 0:
        return "_no rows_"
    low, high = float(values.min()), float(values.max())
    if high - low <= 1e-6 * max(abs(high), 1.0):
        bins, low, high = 1, low - 0.5e-6, high + 0.5e-6
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    peak = max(int(counts.max()), 1)
    lines = [f"| {title} from | to | rows | |", "|---:|---:|---:|:---|"]
    for count, lo, hi in zip(counts, edges[:-1], edges[1:], strict=True):
        bar = "█" * int(round(width * count / peak))
        lines.append(f"| {lo:.4g} | {hi:.4g} | {int(count):,} | {bar} |")
    return "\n".join(lines)
