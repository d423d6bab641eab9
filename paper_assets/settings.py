"""Configuration: environment variables ``PAPER_ASSETS_<FIELD>`` (see :class:`Settings` and the README's
configuration reference), then ``paper_assets.json`` in the home's local folder (written by ``paper-assets demo``),
then the defaults below. The HF token is never part of it: it is read from ``HF_TOKEN`` at the moment of publishing.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .engine.home import ProjectHome
from .engine.novelty_params import IndexParams, NoveltyParams
from .engine.quality import GatePolicy
from .engine.schemas import DEFAULT_CHUNK_ROWS


def default_home() -> Path:
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").exists() and (checkout / "paper_assets").is_dir():
        return checkout / ".paper_assets"
    return Path.cwd() / ".paper_assets"


def home_path() -> str:
    """``PAPER_ASSETS_HOME`` (a folder, resolved; or an ``s3://bucket/prefix`` kept as written), else the default."""
    raw = os.environ.get("PAPER_ASSETS_HOME") or str(default_home())
    return raw.rstrip("/") if "://" in raw else str(Path(raw).resolve())


@dataclass
class Settings:
    home: str
    source: str
    source_table: str = "papers_with_abstracts"
    source_hub_repo: str = ""
    source_hub_file: str = "S2_papers_cleaned.db"
    source_revision: str = "main"
    range_width: int = 1_000_000
    base_model: str = "allenai/specter2_base"
    adapter: str = "allenai/specter2"
    device: str = "auto"
    precision: str = "auto"
    token_budget: int = 0  # 0: by device
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    compile: str = "auto"  # auto: torch.compile on CUDA and on CPUs where it measured faster; on / off
    attn_implementation: str = "sdpa"  # sdpa or eager (matmul-softmax-matmul: faster on Zen 5, slower on AMX)
    tokenizer_workers: int = -1  # processes that tokenise; -1: by device (GPU hosts: cores / 4, at most 8), 0: none
    hub_repo: str = ""
    hub_revision: str = "main"
    hub_private: bool = False
    # Quality gate, shared by paper_embeddings and `paper-assets embed` into a home: norms must lie within median ±
    # norm_k·MAD of the home's partitions, with at most this fraction of outliers.
    norm_k: float = GatePolicy.norm_k
    max_norm_outlier_fraction: float = GatePolicy.max_norm_outlier_fraction
    # Scale-out (empty: one machine, SQLite instance, local processes). pg_url: the Dagster instance's PostgreSQL
    # (postgresql://user@host:5432/db); celery_broker/backend: Celery workers execute the steps (redis://host:6379/0).
    pg_url: str = ""
    executor: str = "auto"  # auto (celery when a broker is set, else local processes), multiprocess, celery, k8s
    # Novelty metrics and the similar-paper index (defaults: the metrics' authors' settings; see engine/novelty.py).
    # novelty: `update`/`demo` and novelty_sensor keep paper_index and paper_novelty current (the assets can always
    # be materialised from the UI).
    novelty: bool = True
    novelty_k: int = NoveltyParams.k
    novelty_search: str = NoveltyParams.search
    novelty_ef_search: int = NoveltyParams.ef_search
    novelty_min_recall: float = NoveltyParams.min_recall
    novelty_hnsw_m: int = IndexParams.hnsw_m
    novelty_ef_construction: int = IndexParams.ef_construction
    novelty_graph: str = IndexParams.graph
    celery_broker: str = ""
    celery_backend: str = ""

    def gate_policy(self) -> GatePolicy:
        return GatePolicy(norm_k=self.norm_k, max_norm_outlier_fraction=self.max_norm_outlier_fraction)

    def save(self) -> Path:
        path = ProjectHome(self.home).config_file
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in asdict(self).items() if k != "home"}
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        return path


# Every default of every setting, for the resources and the CLI (one place to change one).
DEFAULTS = Settings(home="", source="")


def _coerce(kind: type, raw: str | object):
    if kind is bool or kind == "bool":
        return raw if isinstance(raw, bool) else str(raw).strip().lower() in {"1", "true", "yes", "on"}
    if kind is int or kind == "int":
        return int(raw)
    if kind is float or kind == "float":
        return float(raw)
    return str(raw)


def load_settings() -> Settings:
    home = home_path()
    layout = ProjectHome(home)
    stored: dict = {}
    if layout.config_file.exists():
        stored = json.loads(layout.config_file.read_text(encoding="utf-8"))
    values: dict = {"home": home, "source": str(layout.demo_dir / "source.duckdb")}
    for spec in fields(Settings):
        if spec.name == "home":
            continue
        env = os.environ.get(f"PAPER_ASSETS_{spec.name.upper()}")
        if env is not None and env != "":
            values[spec.name] = _coerce(spec.type, env)
        elif spec.name in stored:
            values[spec.name] = _coerce(spec.type, stored[spec.name])
    return Settings(**values)
