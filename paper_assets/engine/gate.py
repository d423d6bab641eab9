"""What the Dagster checks decided, kept in the home so every publisher (the hub_shards asset, `paper-assets
publish`, a worker) applies the same quality gate without importing the asset modules.

- ``embeddings-<range>.checks.json``: the embeddings file's sha256, rows, model, passed / failed checks. A shard is
  published only when this record matches the current file and passed.
- ``stats/norms/<range>.json``: each partition's norm statistics, together the reference for the ``norms_in_band``
  check. One record per partition, written only by that partition's step: machines sharing an object-storage home
  have no lock in common, so one registry file rewritten by every step would lose records.
- ``stats/published.json``: what the last publish left on its target (path -> sha256), for the release planner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from . import quality
from .card import dataset_card
from .errors import UserError
from .fs import atomic_path, parquet_metadata, parquet_schema, read_record, read_records, sha256_file
from .home import ProjectHome
from .publish import Shard, shard_path
from .ranges import IdRange, parse_range
from .schemas import file_metadata


class PublishRefused(UserError):
    """Some ranges may not be published (not embedded, no gate record, failed checks)."""

    def __init__(self, refused: list[str]):
        super().__init__("refusing to publish: " + "; ".join(refused))
        self.refused = refused


@dataclass
class Gate:
    file_sha256: str
    rows: int
    passed: bool
    failed: list[str]
    model: dict


def write_gate(layout: ProjectHome, rng: IdRange, gate: Gate) -> None:
    with atomic_path(layout.gate_file(rng)) as tmp:
        tmp.write_text(json.dumps(vars(gate), indent=1, sort_keys=True), encoding="utf-8")


def read_gate(layout: ProjectHome, rng: IdRange) -> Gate | None:
    path = layout.gate_file(rng)
    if not path.exists():
        return None
    return Gate(**json.loads(read_record(path)))


def update_norm_registry(layout: ProjectHome, key: str, fingerprint: str, stats: dict) -> dict:
    """Record partition ``key``'s norm statistics; returns every partition's (see :func:`norm_registry`)."""
    with atomic_path(layout.stats_dir / "norms" / f"{key}.json") as tmp:
        tmp.write_text(json.dumps({"fingerprint": fingerprint, **stats}, indent=1, sort_keys=True), encoding="utf-8")
    return norm_registry(layout)


def norm_registry(layout: ProjectHome) -> dict:
    """Partition key -> its norm statistics and model fingerprint (one record per partition, ``stats/norms/``)."""
    return {name.removesuffix(".json"): record for name, record in read_records(layout.stats_dir / "norms").items()}


def norm_band(registry: dict, fingerprint: str, k: float, fixed: list[float] | None = None) -> tuple[float, float]:
    """A configured ``[low, high]`` band, else median ± k·MAD over the partitions of this model."""
    if fixed:
        low, high = fixed
        return float(low), float(high)
    entries = [e for e in registry.values() if e.get("fingerprint") == fingerprint and e.get("count")]
    return quality.norm_band([e["median"] for e in entries], [e["mad"] for e in entries], k)


def embedded_ranges(layout: ProjectHome) -> list[str]:
    return sorted(p.name.removeprefix("embeddings-").removesuffix(".parquet")
                  for p in layout.embeddings_dir.glob("embeddings-*.parquet"))


def collect_shards(layout: ProjectHome, range_keys: list[str]) -> list[Shard]:
    """The shards to publish for these ranges; refuses ranges whose embeddings did not pass their blocking checks.
    A range with no rows (every paper left the source) gives a shard to delete."""
    shards, refused = [], []
    for key in range_keys:
        rng = parse_range(key)
        path = layout.embeddings_file(rng)
        if not path.exists():
            refused.append(f"{key}: paper_embeddings not materialised")
            continue
        gate = read_gate(layout, rng)
        digest = sha256_file(path)
        if gate is None or gate.file_sha256 != digest:
            refused.append(f"{key}: no quality-gate record for the current embeddings file (re-materialise it)")
            continue
        if not gate.passed:
            refused.append(f"{key}: blocking checks failed ({', '.join(gate.failed)})")
            continue
        rows = parquet_metadata(path).num_rows
        shards.append(Shard(rng.key, path if rows else None, rows, digest if rows else None))
    if refused:
        raise PublishRefused(refused)
    return shards


def card_builder(layout: ProjectHome, release: str):
    """The dataset card for the shards present after a publish, naming the source release."""

    def build(present: list[str]) -> str:
        rows, model, dim = {}, {}, 768
        for key in embedded_ranges(layout):
            path = layout.embeddings_file(parse_range(key))
            meta = parquet_metadata(path)
            if meta.num_rows:
                rows[shard_path(key)] = meta.num_rows
                model = file_metadata(path).get("model", model)
                dim = parquet_schema(path).field("embedding").type.list_size
        return dataset_card(present, rows, model, release, dim, novelty=published_novelty(layout))

    return build


def published_novelty(layout: ProjectHome) -> dict[str, int]:
    """Months whose novelty file passed its checks (month -> rows): what hub_novelty publishes."""
    found = {}
    for path in sorted(layout.novelty_dir.glob("novelty-*.parquet")):
        if file_metadata(path).get("checks_passed"):
            found[path.name.removeprefix("novelty-").removesuffix(".parquet")] = parquet_metadata(path).num_rows
    return found


def record_published(layout: ProjectHome, target: str, remote_sha256: dict[str, str | None]) -> None:
    path = layout.stats_dir / "published.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"target": target, "shards": remote_sha256}, indent=1, sort_keys=True),
                       encoding="utf-8")


def read_published(layout: ProjectHome) -> dict:
    path = layout.stats_dir / "published.json"
    return json.loads(read_record(path)) if path.exists() else {"target": None, "shards": {}}
