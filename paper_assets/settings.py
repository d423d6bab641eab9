"""Configuration: environment variables ``PAPER_ASSETS_<FIELD>`` (see :class:`Settings` and the README's
configuration reference), then ``paper_assets.json`` in the home's local folder (written by ``paper-assets demo``),
then the defaults below. The HF token is never part of it: it is read from ``HF_TOKEN`` at the moment of publishing.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .engine.home import LOCAL_HOME_ENV, ProjectHome
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
    raw = os.environ.get(variable("home")) or str(default_home())
    return raw.rstrip("/") if "://" in raw else str(Path(raw).resolve())


def setting(default, help: str, shown: str | None = None):
    """One setting: its default and what it means (``shown``: how the reference shows a computed default). Its
    environment variable is ``PAPER_ASSETS_<NAME>`` (:func:`variable`)."""
    return field(default=default, metadata={"help": help, "shown": shown})


def variable(name: str) -> str:
    """The environment variable of setting ``name``."""
    return f"PAPER_ASSETS_{name.upper()}"


@dataclass
class Settings:
    home: str = setting("", "project home: a folder, or `s3://bucket/prefix` (endpoint and credentials from the AWS "
                        "variables)", shown="`.paper_assets` in the checkout")
    source: str = setting("", "cleaned S2 DuckDB file(s), comma-separated (merged by corpusid); or `s2-datasets`: "
                          "S2's Datasets API (`papers` + `abstracts`, followed by diffs; key in `S2_API_KEY`)",
                          shown="`$PAPER_ASSETS_HOME/demo/source.duckdb`")
    source_table: str = setting("papers_with_abstracts", "the source table")
    source_hub_repo: str = setting("", "read the source from this Hub dataset instead (at `source_revision`)")
    source_hub_file: str = setting("S2_papers_cleaned.db", "file(s) in `source_hub_repo`, comma-separated")
    source_revision: str = setting("main", "commit sha, tag or branch of `source_hub_repo` (pin a sha)")
    s2_api: str = setting("https://api.semanticscholar.org", "S2 API base URL (Datasets API and Graph API)")
    s2_release: str = setting("latest", "S2 release to follow: `latest` or a release id such as `2024-11-05`")
    s2_filter: str = setting("", "DuckDB predicate over S2's `papers` columns (corpusid, title, year, "
                             "publicationdate, citationcount, venue, externalids, s2fieldsofstudy, "
                             "publicationtypes) narrowing the papers kept, e.g. `year >= 2000`")
    s2_download_workers: int = setting(4, "S2 dataset files downloaded at once")
    s2_min_interval: float = setting(1.0, "seconds between two S2 API requests (an API key's rate: ~1 request/s)")
    range_width: int = setting(1_000_000, "corpus ids per partition (do not change on an existing home)")
    base_model: str = setting("allenai/specter2_base", "base model: Hub id or folder")
    adapter: str = setting("allenai/specter2", "proximity adapter: Hub id or folder (adapters format)")
    device: str = setting("auto", "`auto` (cuda → mps → cpu), `cpu`, `cuda`, `cuda:N`, `mps`")
    precision: str = setting("auto", "`auto` (bf16 on CUDA ≥ 8.0; on CPUs with AMX/AVX512-BF16 only where a bf16 "
                             "GEMM, measured once and cached, beats fp32; else fp32), `fp32`, `bf16`, `fp16`")
    token_budget: int = setting(0, "padded tokens per forward batch; `0`: by device (on a CPU measured once per CPU "
                                "kind, model and precision and cached in the home's `stats/calibration.json`; "
                                "65,536 on a GPU of ≥ 40 GiB)")
    chunk_rows: int = setting(DEFAULT_CHUNK_ROWS, "rows per checkpointed chunk inside a partition (a crash redoes "
                              "at most one)")
    compile: str = setting("auto", "`torch.compile` the model: `auto` (on CUDA; on CPUs where it measured faster and "
                           "the run repays it; for Dagster steps only on Celery workers), `on`, `off`")
    attn_implementation: str = setting("sdpa", "attention kernel: `sdpa` (torch's fused attention, as the notebook) "
                                       "or `eager` (matmul-softmax-matmul, which a compiled CPU model fuses); each "
                                       "keeps its own calibration, and the files record which one made the vectors")
    tokenizer_workers: int = setting(-1, "processes that tokenise; `-1`: one per 4 cores on GPU hosts (at most 8), "
                                     "none on CPUs; `0`: in the embedding process")
    hub_repo: str = setting("", "publishing target (a Hub dataset repo); unset: `$PAPER_ASSETS_HOME/hub`, same "
                            "layout")
    hub_revision: str = setting("main", "branch of `hub_repo` to publish to")
    hub_private: bool = setting(False, "create `hub_repo` private")
    norm_k: float = setting(GatePolicy.norm_k, "quality gate: norms within median ± k·MAD of the home's partitions")
    max_norm_outlier_fraction: float = setting(GatePolicy.max_norm_outlier_fraction, "quality gate: at most this "
                                               "fraction of a partition's norms outside the band")
    pg_url: str = setting("", "Dagster instance storage in PostgreSQL (`postgresql://user@host:5432/db`); unset: "
                          "SQLite in the home")
    executor: str = setting("auto", "`auto` (Celery when a broker is set, else local processes), `multiprocess`, "
                            "`celery`, `k8s` (a pod per step; needs `paper_assets[k8s]`)")
    partitions_per_run: int = setting(4, "corpus-id ranges a backfill puts in one run (`papers` + `paper_embeddings`): "
                                      "fewer runs, less overhead per range; `0`: every range in one run (one "
                                      "worker does all). Read when the code location loads")
    celery_broker: str = setting("", "Celery executor: steps run on `paper-assets worker`s (RabbitMQ hands a dead "
                                 "worker's step on at once; Redis after its visibility timeout)")
    celery_backend: str = setting("", "Celery result backend (default: the broker)")
    novelty: bool = setting(True, "`update`, `demo` and `novelty_sensor` keep `paper_index` and `paper_novelty` "
                            "current (`0`: embeddings only; the assets stay materialisable from the UI)")
    novelty_k: int = setting(NoveltyParams.k, "neighbours per paper")
    novelty_from: str = setting(NoveltyParams.first_month, "first publication month (`YYYY-MM`) with novelty scores; "
                                "papers of earlier months still count as prior papers", shown="the earliest paper's")
    novelty_search: str = setting(NoveltyParams.search, "`auto` (`device` on a GPU or a CPU with native "
                                  "bf16; else `exact` while a month's queries × prior papers ≤ 10¹⁰, else the HNSW "
                                  "graph), `device` (exact: bf16 "
                                  "candidates on the embedding device, rescored and certified in fp32), `exact` "
                                  "(FAISS, fp32), `hnsw`")
    novelty_ef_search: int = setting(NoveltyParams.ef_search, "HNSW search beam (the authors')")
    novelty_min_recall: float = setting(NoveltyParams.min_recall, "the `recall_at_k` check's threshold")
    novelty_hnsw_m: int = setting(IndexParams.hnsw_m, "HNSW graph degree (the authors')")
    novelty_ef_construction: int = setting(IndexParams.ef_construction, "HNSW build beam (the authors')")
    novelty_graph: str = setting(IndexParams.graph, "build the HNSW graph: `auto` (from 1,000,000 papers where "
                                 "`auto` search will use it: no GPU, no native bf16, and a month with more queries "
                                 "× prior papers than 10¹⁰), `always`, `never`")

    def gate_policy(self) -> GatePolicy:
        return GatePolicy(norm_k=self.norm_k, max_norm_outlier_fraction=self.max_norm_outlier_fraction)

    def save(self) -> Path:
        path = ProjectHome(self.home).config_file
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in asdict(self).items() if k != "home"}
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        return path


# Every default of every setting, for the resources and the CLI (one place to change one).
DEFAULTS = Settings()

BENCH_DIR_VARIABLE = "PAPER_ASSETS_BENCH_DIR"
S2_KEY_VARIABLE = "S2_API_KEY"
S2_DATASETS_SOURCE = "s2-datasets"

# Variables that are not settings of a home: read where they are used, listed here for the reference.
OTHER_VARIABLES = (
    (LOCAL_HOME_ENV, "this machine's part of an S3 home (catalog file, Dagster instance folder, locks, calibration, "
     "index copy, demo, local publishing folder); a local home is its own",
     "`~/.cache/paper_assets/s3/<bucket>/<prefix>`"),
    (BENCH_DIR_VARIABLE, "where `paper-assets bench` keeps its models and sources between runs",
     "`$TMPDIR/paper_assets_bench`"),
    ("HF_TOKEN", "Hub token (write access to publish); the publisher resource takes it as `EnvVar(\"HF_TOKEN\")`, so "
     "the UI and run records show only its name, and only publishing steps need it", "—"),
    (S2_KEY_VARIABLE, "Semantic Scholar API key: needed by `PAPER_ASSETS_SOURCE=s2-datasets` (taken as "
     "`EnvVar(\"S2_API_KEY\")`), by `paper-assets verify`, and it adds the `matches_s2_specter2` check", "—"),
    ("HF_ENDPOINT", "another Hub endpoint", "huggingface.co"),
    ("AWS_ENDPOINT_URL", "S3-compatible endpoint of an `s3://` home (MinIO, Ceph, moto); credentials from the "
     "standard AWS variables", "AWS"),
)


# Where a user sets each model path: named in the hints of a model that fails to load.
MODEL_SETTING_NAMES = {"base model": variable("base_model"), "adapter": variable("adapter")}


def help_of(name: str) -> str:
    """What setting ``name`` means (for resource field descriptions and CLI help)."""
    return next(spec.metadata["help"] for spec in fields(Settings) if spec.name == name)


def flag_help(name: str) -> str:
    """A CLI flag's help for setting ``name``: what it means, and what applies without the flag."""
    return f"{help_of(name)} (default: {variable(name)}, else {getattr(DEFAULTS, name)!r})".replace("%", "%%")


def from_setting(name: str):
    """A Dagster resource field that is setting ``name``: its default and description come from :class:`Settings`."""
    from pydantic import Field

    return Field(default=getattr(DEFAULTS, name), description=help_of(name))


def _shown(spec) -> str:
    if spec.metadata.get("shown"):
        return spec.metadata["shown"]
    default = spec.default
    if isinstance(default, bool):
        return f"`{int(default)}`"
    return f"`{default}`" if default not in ("", None) else "unset"


def configuration_document() -> str:
    """docs/configuration.md, generated from :class:`Settings` (``tools/write_configuration_doc.py``)."""
    rows = [f"| `{variable(spec.name)}` | {spec.metadata['help']} | {_shown(spec)} |" for spec in fields(Settings)]
    rows += [f"| `{name}` | {meaning} | {default} |" for name, meaning, default in OTHER_VARIABLES]
    return ("# Configuration reference\n\n"
            "Generated from `paper_assets/settings.py` by `tools/write_configuration_doc.py`; a test keeps it "
            "current.\n"
            "Each setting is read from its environment variable, then from `paper_assets.json` in the home's local "
            "folder\n(written by `paper-assets demo`), then its default.\n\n"
            "| variable | meaning | default |\n|---|---|---|\n" + "\n".join(rows) + "\n")


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
        env = os.environ.get(variable(spec.name))
        if env is not None and env != "":
            values[spec.name] = _coerce(spec.type, env)
        elif spec.name in stored:
            values[spec.name] = _coerce(spec.type, stored[spec.name])
    return Settings(**values)
