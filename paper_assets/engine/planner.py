"""What a release asks for: which ranges to (re)build and whether the Hub is behind. One planner, called by the
release sensors and by `paper-assets update`, reading only small files (the snapshot manifest, Parquet footers,
gate records): cheap enough for a sensor tick whatever the source size.

Per range (snapshot ranges plus every range the home already has):
- ``papers`` is stale when its file is missing or records another snapshot hash for the range; a range that left
  the snapshot but still has rows at home is stale too (re-running it empties it: the partition is kept with zero
  rows and its Hub shard is deleted);
- ``paper_embeddings`` is stale when its file is missing or was made from other papers content.
Stale ranges run ``papers`` + ``paper_embeddings``; row-level reuse then embeds only new or changed rows.
The Hub is behind when no range is pending and some range's current, gate-passed file differs from what the last
publish recorded (or a published shard's range has no rows any more).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from .fs import parquet_metadata
from .gate import embedded_ranges, read_gate, read_published
from .home import ProjectHome
from .publish import shard_path
from .ranges import parse_range
from .schemas import METADATA_KEY
from .snapshot import Snapshot


@dataclass
class ReleasePlan:
    release: str
    ranges: list[str] = field(default_factory=list)  # to run papers + paper_embeddings
    new_ranges: list[str] = field(default_factory=list)  # subset of ranges with no partition yet
    emptied_ranges: list[str] = field(default_factory=list)  # subset of ranges that left the source
    publish: bool = False
    publish_key: str = ""  # digest of the gate-passed files to publish (a sensor's run key)
    reasons: dict[str, str] = field(default_factory=dict)


def _footer(path) -> tuple[int, dict]:
    meta = parquet_metadata(path)
    return meta.num_rows, json.loads((meta.metadata or {}).get(METADATA_KEY, b"{}"))


def plan_release(layout: ProjectHome, snapshot: Snapshot, known_partitions: set[str] | None = None,
                 publish_target: str | None = None) -> ReleasePlan:
    plan = ReleasePlan(release=snapshot.version)
    wanted = snapshot.manifest.ranges
    at_home = {p.name.removeprefix("papers-").removesuffix(".parquet")
               for p in layout.papers_dir.glob("papers-*.parquet")} | set(embedded_ranges(layout))
    for key in sorted(set(wanted) | at_home):
        rng = parse_range(key)
        papers_file, embeddings_file = layout.papers_file(rng), layout.embeddings_file(rng)
        expected = wanted.get(key, {}).get("content_hash", "")
        reason = None
        if not papers_file.exists():
            reason = "new range" if key in wanted else None
        else:
            rows, meta = _footer(papers_file)
            if meta.get("source_range_hash", None) != expected and (key in wanted or rows):
                reason = "source changed" if key in wanted else "range left the source"
            elif not embeddings_file.exists():
                reason = "not embedded"
            else:
                _, embedded_meta = _footer(embeddings_file)
                if embedded_meta.get("papers_content_hash") != meta.get("content_hash"):
                    reason = "embeddings stale"
        if reason is None and key not in wanted and embeddings_file.exists() and not papers_file.exists():
            reason = "range left the source" if _footer(embeddings_file)[0] else None
        if reason:
            plan.ranges.append(key)
            plan.reasons[key] = reason
            if key not in wanted:
                plan.emptied_ranges.append(key)
            if known_partitions is not None and key not in known_partitions:
                plan.new_ranges.append(key)
    if not plan.ranges:
        plan.publish = hub_behind(layout, publish_target)
        if plan.publish:
            files = {key: getattr(read_gate(layout, parse_range(key)), "file_sha256", None)
                     for key in embedded_ranges(layout)}
            plan.publish_key = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    return plan


def hub_behind(layout: ProjectHome, target: str | None) -> bool:
    published = read_published(layout)
    if target is not None and published.get("target") != target:
        return bool(embedded_ranges(layout))
    remote = published.get("shards", {})
    for key in embedded_ranges(layout):
        rng = parse_range(key)
        gate = read_gate(layout, rng)
        if gate is None or not gate.passed:
            continue
        local = gate.file_sha256 if gate.rows else None
        if remote.get(shard_path(key)) != local:
            return True
    return False
