"""The dataset card (README.md) of a published embeddings repo. Deterministic: same inputs, same bytes."""

from __future__ import annotations

from collections.abc import Mapping

NOVELTY_SECTION = [
    "",
    "## Novelty metrics (`novelty/`)",
    "",
    "One file per publication month: each paper of the month against its K nearest papers (cosine of the vectors "
    "above) among all papers published before that month. Missing neighbours (fewer than K earlier papers) count as "
    "cosine 0, so papers of the first month have every metric 1.0.",
    "",
    "| column | type | meaning |",
    "|---|---|---|",
    "| corpus_id | int64 | Semantic Scholar corpus id |",
    "| publication_date | date32 | the paper's publication date |",
    "| neighbors | int32 | earlier papers found (K unless fewer were published before the month) |",
    "| novelty_mean | float32 | 1 − mean cosine of the K neighbours |",
    "| novelty_max | float32 | 1 − the largest cosine (distance to the nearest earlier paper) |",
    "| novelty_min | float32 | 1 − the smallest cosine |",
    "| novelty_median | float32 | 1 − median cosine |",
    "| novelty_harmonic | float32 | K / Σ 1 / max(1 − cosine, 1e-6) |",
]


ATTRIBUTION = [
    "",
    "## Attribution",
    "",
    "Paper metadata comes from the Semantic Scholar Academic Graph (Kinney et al., 2023), released under the "
    "ODC-BY 1.0 license; SPECTER2 is by the Allen Institute for AI (Singh et al., 2023).",
    "",
]


def _config(name: str, folder: str) -> list[str]:
    """One dataset-viewer config of the card's YAML header: every Parquet file of ``folder``."""
    return [f"- config_name: {name}", "  data_files:", "  - split: train", f'    path: "{folder}/*.parquet"']


def dataset_card(shards: list[str], rows: Mapping[str, int], model: Mapping[str, str], source_release: str,
                 dim: int, novelty: Mapping[str, int] | None = None) -> str:
    """``novelty``: month (YYYY-MM) -> rows, for the months published beside the shards."""
    total = sum(rows.get(s, 0) for s in shards)
    lines = [
        "---",
        "license: odc-by",
        "task_categories:",
        "- feature-extraction",
        "tags:",
        "- specter2",
        "- embeddings",
        "- semantic-scholar",
        "configs:",
        *_config("default", "data"),
        *(_config("novelty", "novelty") if novelty else []),
        "---",
        "",
        "# SPECTER2 embeddings of Semantic Scholar papers",
        "",
        f"{total:,} papers in {len(shards)} shard(s), one per corpus-id range, made by "
        "[paper_assets](https://github.com/) from a cleaned Semantic Scholar database.",
        "",
        "## Schema",
        "",
        "| column | type | meaning |",
        "|---|---|---|",
        "| corpusid | int64 | Semantic Scholar corpus id |",
        f"| embedding | fixed_size_list<float32>[{dim}] | CLS vector of `title [SEP] abstract` (max 512 tokens) |",
        "| text_sha256 | string | sha256 of the exact text embedded |",
        "",
        "## Model",
        "",
        f"- base model: `{model.get('base_model', '?')}`",
        f"- adapter: `{model.get('adapter', '?')}` loaded as `{model.get('adapter_name', 'proximity')}`",
        f"- fingerprint (weights + max_length + pooling): `{model.get('fingerprint', '?')}`",
        f"- precision: {model.get('precision', '?')}",
        "",
        "## Source",
        "",
        f"- release: `{source_release}`",
        "",
        "| shard | rows |",
        "|---|---|",
    ]
    lines += [f"| `{s}` | {rows[s]:,} |" if s in rows else f"| `{s}` | (published elsewhere) |" for s in shards]
    if novelty:
        lines += NOVELTY_SECTION
        months = sorted(novelty)
        lines += ["", f"{sum(novelty.values()):,} papers in {len(novelty)} month file(s), {months[0]} to {months[-1]}."]
    return "\n".join(lines + ATTRIBUTION)
