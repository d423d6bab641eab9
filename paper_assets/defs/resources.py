"""Resources: where the source is, which model embeds, where shards are published, where the home is.

The model libraries (torch, transformers, adapters) are imported by the step that embeds, not here: the code
server, the daemon, run coordinators and the steps that build papers or publish shards load this module and never
embed (torch alone is ~1.7 s and ~150 MB per process on 2 vCPUs)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dagster import ConfigurableResource, EnvVar
from pydantic import Field

from ..engine import publish, publish_targets
from ..engine.home import ProjectHome
from ..engine.novelty_params import IndexParams, NoveltyParams
from ..engine.quality import GatePolicy
from ..engine.s2_api import S2Client
from ..engine.s2_release import S2Release, release_record
from ..engine.snapshot import release_id
from ..engine.source import SourceError, SourceInfo, inspect_source, local_version
from ..settings import MODEL_SETTING_NAMES, S2_DATASETS_SOURCE, S2_KEY_VARIABLE, from_setting, variable

if TYPE_CHECKING:
    from ..engine.encoder import Encoder
    from ..engine.model import ModelConfig


class ProjectHomeResource(ConfigurableResource):
    root: str = Field(description="PAPER_ASSETS_HOME: Parquet partitions, catalog, Dagster instance")

    def layout(self) -> ProjectHome:
        return ProjectHome(self.root)


def split_list(value: str) -> list[str]:
    """Several source files are given as one comma-separated setting."""
    return [part.strip() for part in value.split(",") if part.strip()]


class S2SourceResource(ConfigurableResource):
    """The source of a release: cleaned S2 DuckDB file(s) (local paths, or files of a Hub dataset repo at one
    revision), or S2's Datasets API (``path == "s2-datasets"``: ``papers`` + ``abstracts`` of an S2 release,
    followed by S2's diffs; ``engine/s2_release.py``).

    Several files (e.g. ``S2_papers_cleaned.db,S2_papers_cleaned_additional_papers.db``) are merged by corpusid
    in the snapshot (duplicate rule in ``engine/snapshot.py``); later files win ties.
    """

    path: str = Field(default="", description="local DuckDB file(s), comma-separated (used when hub_repo is empty)")
    table: str = from_setting("source_table")
    hub_repo: str = Field(default="", description="dataset repo id holding the source file(s)")
    hub_file: str = from_setting("source_hub_file")
    revision: str = from_setting("source_revision")
    range_width: int = from_setting("range_width")
    hub_endpoint: str = Field(default="", description="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    s2_api: str = from_setting("s2_api")
    s2_api_key: str = Field(default="", description="S2 API key: EnvVar('S2_API_KEY'), never a literal")
    s2_release: str = from_setting("s2_release")
    s2_filter: str = from_setting("s2_filter")
    s2_download_workers: int = from_setting("s2_download_workers")
    s2_min_interval: float = from_setting("s2_min_interval")
    s2_folder: str = Field(default="", description="where S2 releases are kept (the home's local `s2` folder)")

    @property
    def is_s2_datasets(self) -> bool:
        return self.path.strip() == S2_DATASETS_SOURCE

    def _s2_keyed_client(self) -> S2Client:
        # Inside a run or a sensor Dagster has resolved the EnvVar; `update` calls this on the unresolved resource.
        key = self.s2_api_key.get_value() if isinstance(self.s2_api_key, EnvVar) else self.s2_api_key
        if not key:
            raise SourceError(f"PAPER_ASSETS_SOURCE={S2_DATASETS_SOURCE} needs an S2 API key in {S2_KEY_VARIABLE}")
        return S2Client(self.s2_api, key, min_interval=self.s2_min_interval)

    def _api(self):
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.hub_endpoint or None, token=publish.token_from_env(required=False))

    def local_paths(self) -> list[str]:
        paths = split_list(self.path)
        if not paths:
            raise SourceError("no source database configured (set PAPER_ASSETS_SOURCE, or run `paper-assets demo`)")
        if len(set(paths)) != len(paths):
            raise SourceError(f"a source file is listed twice in {self.path!r}")
        return paths

    def current_version(self) -> str:
        """Cheap (no data read): file identities for local sources, the revision's commit sha for a Hub source,
        the release id for S2's Datasets API (one small request when following ``latest``)."""
        if self.is_s2_datasets:
            client = self._s2_keyed_client()
            return f"s2-{self.s2_release if self.s2_release != 'latest' else client.latest_release()}"
        if self.hub_repo:
            publish.validate_repo_id(self.hub_repo)
            sha = self._api().repo_info(self.hub_repo, repo_type="dataset", revision=self.revision).sha
            return f"hub-{sha}"
        versions = []
        for path in self.local_paths():
            if not os.path.isfile(path):
                raise SourceError(f"source database {path} does not exist (check PAPER_ASSETS_SOURCE)")
            versions.append(local_version(path))
        return release_id(versions)

    def s2_release_record(self, version: str) -> dict:
        """For an S2 release already in the home: how it was built and its counts (``{}`` for other sources)."""
        if not self.is_s2_datasets:
            return {}
        return release_record(Path(self.s2_folder), version.removeprefix("s2-")) or {}

    def resolve(self, log: Callable[[str], None] = print) -> list[SourceInfo]:
        """Every input of the current release, validated (a Hub source or an S2 release is downloaded here, never
        in a sensor)."""
        version = self.current_version()
        if self.is_s2_datasets:
            release = S2Release(Path(self.s2_folder), self._s2_keyed_client(), self.s2_download_workers,
                                self.s2_filter, log)
            database = release.ensure(version.removeprefix("s2-"))
            return [inspect_source(database, "papers_with_abstracts", version=version)]
        if not self.hub_repo:
            return [inspect_source(path, self.table, version=version, setting=variable("source"))
                    for path in self.local_paths()]
        from huggingface_hub import hf_hub_download

        files = split_list(self.hub_file)
        if not files:
            raise SourceError("PAPER_ASSETS_SOURCE_HUB_FILE names no file")
        local = [hf_hub_download(self.hub_repo, name, repo_type="dataset", revision=version.removeprefix("hub-"),
                                 endpoint=self.hub_endpoint or None, token=publish.token_from_env(required=False))
                 for name in files]
        return [inspect_source(path, self.table, version=version) for path in local]


_MODEL_CACHE: dict[ModelConfig, Encoder] = {}
_MODEL_LOCK = threading.Lock()


class Specter2Resource(ConfigurableResource):
    """SPECTER2 (base + proximity adapter), loaded once per process on the best device."""

    base_model: str = from_setting("base_model")
    adapter: str = from_setting("adapter")
    adapter_name: str = "proximity"
    device: str = from_setting("device")
    precision: str = from_setting("precision")
    max_length: int = 512
    token_budget: int = from_setting("token_budget")
    max_batch_rows: int = 512
    pad_multiple: int = Field(default=0, description="padded batch widths are multiples of this (0: 64 on GPU, 8 "
                              "on CPU)")
    compile: str = from_setting("compile")
    attn_implementation: str = from_setting("attn_implementation")
    tokenizer_workers: int = from_setting("tokenizer_workers")
    chunk_rows: int = from_setting("chunk_rows")
    sep_token: str = "[SEP]"
    device_lock_dir: str = Field(default="", description="GPU claims for device=auto on multi-GPU machines")
    calibration_file: str = Field(default="", description="cache of the CPU measurements made on "
                                  "first use: bf16 vs fp32, compiled vs eager, the token budget")
    norm_k: float = from_setting("norm_k")
    norm_band: list[float] = Field(default_factory=list, description="fixed [low, high] norm band instead")
    max_norm_outlier_fraction: float = from_setting("max_norm_outlier_fraction")

    def model_config_key(self) -> ModelConfig:
        from ..engine.model import ModelConfig

        return ModelConfig(
            base_model=self.base_model, adapter=self.adapter, adapter_name=self.adapter_name, device=self.device,
            precision=self.precision, max_length=self.max_length, compile=self.compile,
            attn_implementation=self.attn_implementation,
            tokenizer_workers=self.tokenizer_workers,
            token_budget=self.token_budget, max_batch_rows=self.max_batch_rows, pad_multiple=self.pad_multiple,
            device_lock_dir=self.device_lock_dir or None, calibration_file=self.calibration_file or None,
        )

    def is_loaded(self) -> bool:
        """Whether this process already holds the configured model (a long-lived worker after its first step)."""
        with _MODEL_LOCK:
            return self.model_config_key() in _MODEL_CACHE

    def get_encoder(self, expected_rows: int | None = None) -> Encoder:
        """The process's encoder, ready for a step of ``expected_rows`` rows: with ``compile=auto`` on a CPU it
        compiles once a step is long enough to repay the compilation, as `paper-assets embed` decides for its run
        (None: a long-lived encoder, compiled wherever compiling is faster)."""
        from ..engine.encoder import Encoder
        from ..engine.model import load_model

        key = self.model_config_key()
        with _MODEL_LOCK:
            if key not in _MODEL_CACHE:
                encoder = Encoder(load_model(key, setting_names=MODEL_SETTING_NAMES), expected_rows=expected_rows)
                sep = encoder.tokenizer.sep_token
                if sep != self.sep_token:
                    raise ValueError(f"tokenizer sep token {sep!r} differs from the configured {self.sep_token!r}")
                _MODEL_CACHE[key] = encoder
            elif expected_rows is not None:
                _MODEL_CACHE[key].prepare_for(expected_rows)
            return _MODEL_CACHE[key]

    def gate_policy(self) -> GatePolicy:
        return GatePolicy(norm_k=self.norm_k, norm_band=tuple(self.norm_band) if self.norm_band else None,
                          max_norm_outlier_fraction=self.max_norm_outlier_fraction)


class ShardPublisherResource(ConfigurableResource):
    """Where hub_shards go: a Hub dataset repo or a local folder.

    The token is wired as ``EnvVar("HF_TOKEN")``: the UI and the run records show the variable's name, Dagster
    resolves it in the step (and fails that step, before any upload, when it is not set), and steps that do not
    publish never need it. Built in code without a token, the resource reads ``HF_TOKEN`` when it publishes."""

    hub_repo: str = Field(default="", description="dataset repo id; empty publishes to local_folder")
    revision: str = from_setting("hub_revision")
    private: bool = from_setting("hub_private")
    local_folder: str = ""
    endpoint: str = Field(default="", description="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    max_files_per_commit: int = Field(default=publish.MAX_FILES_PER_COMMIT, description="shards per Hub commit")
    token: str = Field(default="", description="Hub token with write access: EnvVar('HF_TOKEN'), never a literal")

    def description(self) -> str:
        """Names the target without connecting (the release planner compares it with the last publish)."""
        if self.hub_repo:
            return f"hf://datasets/{self.hub_repo}@{self.revision}"
        return f"folder {Path(self.local_folder).resolve()}"

    def target(self) -> publish.PublishTarget:
        if self.hub_repo:
            return publish_targets.HubTarget(self.hub_repo, revision=self.revision, private=self.private,
                                     endpoint=self.endpoint or None, token=self.token or None)
        return publish_targets.LocalFolderTarget(Path(self.local_folder))


class NoveltyResource(ConfigurableResource):
    """How paper_index is built and paper_novelty searches it (defaults: the metrics' authors' settings)."""

    enabled: bool = from_setting("novelty")
    k: int = from_setting("novelty_k")
    search: str = from_setting("novelty_search")
    exact_max_pairs: int = NoveltyParams.exact_max_pairs
    ef_search: int = from_setting("novelty_ef_search")
    recall_sample: int = Field(default=NoveltyParams.recall_sample, description="papers per month checked against "
                               "exact search")
    device_recall_sample: int = Field(default=NoveltyParams.device_recall_sample, description="papers per month "
                                      "the certified device search is checked on against exact search")
    min_recall: float = from_setting("novelty_min_recall")
    hnsw_m: int = from_setting("novelty_hnsw_m")
    ef_construction: int = from_setting("novelty_ef_construction")
    graph: str = from_setting("novelty_graph")
    graph_min_papers: int = IndexParams.graph_min_papers
    first_month: str = from_setting("novelty_from")

    def params(self) -> NoveltyParams:
        return NoveltyParams(k=self.k, search=self.search, exact_max_pairs=self.exact_max_pairs,
                             ef_search=self.ef_search, recall_sample=self.recall_sample,
                             device_recall_sample=self.device_recall_sample, min_recall=self.min_recall,
                             first_month=self.first_month)

    def index_params(self) -> IndexParams:
        return IndexParams(hnsw_m=self.hnsw_m, ef_construction=self.ef_construction, graph=self.graph,
                           graph_min_papers=self.graph_min_papers, exact_max_pairs=self.exact_max_pairs)
