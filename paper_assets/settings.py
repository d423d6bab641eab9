"""Configuration: environment variables, then ``$PAPER_ASSETS_HOME/paper_assets.json`` (written by
``paper-assets demo``), then built-in defaults. The HF token is never part of it: it is read from ``HF_TOKEN``
at the moment of publishing.

| variable                        | meaning                                               | default                        |
|---------------------------------|-------------------------------------------------------|--------------------------------|
| PAPER_ASSETS_HOME               | project home (Parquet, catalog, Dagster instance)     | ``.paper_assets`` in checkout  |
| PAPER_ASSETS_SOURCE             | cleaned S2 DuckDB file                                | ``$HOME/demo/source.duckdb``   |
| PAPER_ASSETS_SOURCE_TABLE       | table in it                                           | ``papers_with_abstracts``      |
| PAPER_ASSETS_SOURCE_HUB_REPO    | dataset repo holding the source file (instead of path)| unset                          |
| PAPER_ASSETS_SOURCE_HUB_FILE    | file in that repo                                     | ``S2_papers_cleaned.db``       |
| PAPER_ASSETS_SOURCE_REVISION    | pinned revision (commit sha, tag or branch)           | ``main``                       |
| PAPER_ASSETS_RANGE_WIDTH        | corpus ids per partition                              | 1000000                        |
| PAPER_ASSETS_BASE_MODEL         | base model id or folder                               | ``allenai/specter2_base``      |
| PAPER_ASSETS_ADAPTER            | adapter id or folder                                  | ``allenai/specter2``           |
| PAPER_ASSETS_DEVICE             | auto, cpu, cuda, cuda:N, mps                          | auto                           |
| PAPER_ASSETS_PRECISION          | auto, fp32, bf16, fp16                                | auto                           |
| PAPER_ASSETS_TOKEN_BUDGET       | padded tokens per forward batch                       | 16384                          |
| PAPER_ASSETS_CHUNK_ROWS         | rows per checkpointed chunk inside a partition        | 20000                          |
| PAPER_ASSETS_COMPILE            | 1 to use torch.compile                                | 0                              |
| PAPER_ASSETS_HUB_REPO           | dataset repo to publish to; unset: ``$HOME/hub``      | unset                          |
| PAPER_ASSETS_HUB_REVISION       | branch to publish to                                  | ``main``                       |
| PAPER_ASSETS_HUB_PRIVATE        | 1 to create the repo private                          | 0                              |
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

CONFIG_FILE = "paper_assets.json"


def default_home() -> Path:
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").exists() and (checkout / "paper_assets").is_dir():
        return checkout / ".paper_assets"
    return Path.cwd() / ".paper_assets"


def home_path() -> Path:
    return Path(os.environ.get("PAPER_ASSETS_HOME") or default_home()).resolve()


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
    token_budget: int = 16384
    chunk_rows: int = 20_000
    compile: bool = False
    hub_repo: str = ""
    hub_revision: str = "main"
    hub_private: bool = False

    def save(self) -> Path:
        path = Path(self.home) / CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in asdict(self).items() if k != "home"}
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        return path


def _coerce(kind: type, raw: str | object):
    if kind is bool or kind == "bool":
        return raw if isinstance(raw, bool) else str(raw).strip().lower() in {"1", "true", "yes", "on"}
    if kind is int or kind == "int":
        return int(raw)
    return str(raw)


def load_settings() -> Settings:
    home = home_path()
    stored: dict = {}
    config_file = home / CONFIG_FILE
    if config_file.exists():
        stored = json.loads(config_file.read_text(encoding="utf-8"))
    values: dict = {"home": str(home), "source": str(home / "demo" / "source.duckdb")}
    for spec in fields(Settings):
        if spec.name == "home":
            continue
        env = os.environ.get(f"PAPER_ASSETS_{spec.name.upper()}")
        if env is not None and env != "":
            values[spec.name] = _coerce(spec.type, env)
        elif spec.name in stored:
            values[spec.name] = _coerce(spec.type, stored[spec.name])
    return Settings(**values)
