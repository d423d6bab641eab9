"""Our vectors against the SPECTER2 vectors S2 serves for the same papers.

S2's vectors are not normalised and ours need not be, so the comparison is the cosine. A paper whose weights,
adapter, text rule and precision match S2's reads ~1.0; S2 embeds its own current title and abstract, which can
differ from a release's text, so the verdict allows a few papers below the bar: it passes when at least
``min_share`` (95%) of the compared papers reach cosine ``bar`` (0.99). Ids S2 does not know (or has no vector
for) are counted, not compared.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import UserError
from .fs import read_parquet
from .home import ProjectHome
from .ranges import parse_range
from .s2_api import S2Client
from .schemas import vectors_of

BAR = 0.99
MIN_SHARE = 0.95


@dataclass
class VerifyReport:
    requested: int
    compared: int
    unknown_to_s2: int
    dimension_mismatch: int
    cosine_min: float | None
    cosine_p1: float | None
    cosine_median: float | None
    share_at_least_bar: float | None
    bar: float = BAR
    min_share: float = MIN_SHARE
    passed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        if not self.compared:
            return f"no paper compared ({self.unknown_to_s2} of {self.requested} unknown to S2)"
        return (f"{self.compared} papers compared: cosine min {self.cosine_min:.4f}, p1 {self.cosine_p1:.4f}, "
                f"median {self.cosine_median:.4f}; {self.share_at_least_bar:.1%} at >= {self.bar} "
                f"(needs {self.min_share:.0%}); {self.unknown_to_s2} unknown to S2, {self.dimension_mismatch} of "
                "another dimension")


def sample_embedded(layout: ProjectHome, sample: int, range_key: str | None = None,
                    seed: int = 0) -> dict[int, np.ndarray]:
    """``sample`` embedded papers drawn at random (seeded) from the home, or from one partition."""
    if range_key:
        files = [layout.embeddings_file(parse_range(range_key))]
        if not files[0].exists():
            raise UserError(f"partition {range_key} has no embeddings in {layout.embeddings_dir}")
    else:
        files = sorted(layout.embeddings_dir.glob("embeddings-*.parquet"))
    ids = [read_parquet(f, columns=["corpusid"]).column("corpusid").to_numpy() for f in files]
    total = sum(len(i) for i in ids)
    if not total:
        raise UserError(f"no embeddings in {layout.embeddings_dir} yet: materialise paper_embeddings first")
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=min(sample, total), replace=False))
    starts = np.cumsum([0] + [len(i) for i in ids])
    vectors: dict[int, np.ndarray] = {}
    for f, file_ids, start, end in zip(files, ids, starts[:-1], starts[1:], strict=True):
        corpusids = file_ids[chosen[(chosen >= start) & (chosen < end)] - start]
        if not len(corpusids):
            continue
        table = read_parquet(f, columns=["corpusid", "embedding"])
        table = table.filter(pc.is_in(table.column("corpusid"), value_set=pa.array(corpusids, pa.int64())))
        vectors.update(zip(table.column("corpusid").to_pylist(), vectors_of(table), strict=True))
    return vectors


def compare(ours: dict[int, np.ndarray], theirs: dict[int, np.ndarray | None], bar: float = BAR,
            min_share: float = MIN_SHARE) -> VerifyReport:
    cosines, unknown, mismatch = [], 0, 0
    for corpusid, vector in ours.items():
        reference = theirs.get(corpusid)
        if reference is None:
            unknown += 1
        elif reference.shape != vector.shape:
            mismatch += 1
        else:
            a, b = vector.astype(np.float64), reference.astype(np.float64)
            cosines.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
    report = VerifyReport(requested=len(ours), compared=len(cosines), unknown_to_s2=unknown,
                          dimension_mismatch=mismatch, cosine_min=None, cosine_p1=None, cosine_median=None,
                          share_at_least_bar=None, bar=bar, min_share=min_share)
    if cosines:
        values = np.array(cosines)
        report.cosine_min, report.cosine_median = float(values.min()), float(np.median(values))
        report.cosine_p1 = float(np.percentile(values, 1))
        report.share_at_least_bar = float((values >= bar).mean())
        report.passed = report.share_at_least_bar >= min_share
    return report


def verify_home(layout: ProjectHome, client: S2Client, sample: int, range_key: str | None = None,
                seed: int = 0) -> VerifyReport:
    ours = sample_embedded(layout, sample, range_key, seed)
    return compare(ours, client.specter_v2(sorted(ours)))
