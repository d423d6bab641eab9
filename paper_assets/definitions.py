"""The Dagster code location: ``dagster dev -w workspace.yaml`` loads ``defs`` from here."""

from __future__ import annotations

import os

from dagster import Definitions, EnvVar, load_asset_checks_from_modules
from dagster_duckdb import DuckDBResource

from .defs import embeddings, novelty, shards, source, verification
from .defs.executor import executor_for, steps_share_a_process
from .defs.resources import (
    NoveltyResource,
    ProjectHomeResource,
    S2SourceResource,
    ShardPublisherResource,
    Specter2Resource,
)
from .defs.run_worker import recording_run_worker
from .defs.sensors import novelty_sensor, s2_release_ranges_sensor, s2_source_release_sensor
from .engine.device import compile_choice
from .engine.home import ProjectHome
from .settings import S2_DATASETS_SOURCE, S2_KEY_VARIABLE, Settings, load_settings


def build_resources(settings: Settings) -> dict:
    home = ProjectHome(settings.home)
    # compile=auto compiles (on CUDA; on CPUs where it measured faster) only where the compiled model outlives the
    # step: on long-lived Celery workers. With a process per step, 24-57 s of compilation (BENCHMARKS.md) would
    # dwarf a partition's seconds of embedding.
    compile_model = settings.compile
    if compile_choice(compile_model) == "auto" and not steps_share_a_process(settings):
        compile_model = "off"
    return {
        "home": ProjectHomeResource(root=str(home.root)),
        "source": S2SourceResource(
            path=settings.source, table=settings.source_table, hub_repo=settings.source_hub_repo,
            hub_file=settings.source_hub_file, revision=settings.source_revision, range_width=settings.range_width,
            s2_api=settings.s2_api, s2_release=settings.s2_release, s2_filter=settings.s2_filter,
            s2_download_workers=settings.s2_download_workers, s2_min_interval=settings.s2_min_interval,
            s2_folder=str(home.local / "s2"),
            s2_api_key=EnvVar(S2_KEY_VARIABLE) if settings.source.strip() == S2_DATASETS_SOURCE else "",
        ),
        "specter2": Specter2Resource(
            base_model=settings.base_model, adapter=settings.adapter, device=settings.device,
            precision=settings.precision, token_budget=settings.token_budget, chunk_rows=settings.chunk_rows,
            compile=compile_model, tokenizer_workers=settings.tokenizer_workers,
            attn_implementation=settings.attn_implementation,
            device_lock_dir=str(home.local / ".locks" / "devices"),
            calibration_file=str(home.calibration_file), norm_k=settings.norm_k,
            max_norm_outlier_fraction=settings.max_norm_outlier_fraction,
        ),
        "publisher": ShardPublisherResource(
            hub_repo=settings.hub_repo, revision=settings.hub_revision, private=settings.hub_private,
            local_folder=str(home.hub_folder), token=EnvVar("HF_TOKEN") if settings.hub_repo else "",
        ),
        "catalog": DuckDBResource(database=str(home.warehouse)),
        "novelty_config": NoveltyResource(
            enabled=settings.novelty, k=settings.novelty_k, search=settings.novelty_search,
            first_month=settings.novelty_from,
            ef_search=settings.novelty_ef_search,
            min_recall=settings.novelty_min_recall, hnsw_m=settings.novelty_hnsw_m,
            ef_construction=settings.novelty_ef_construction, graph=settings.novelty_graph,
        ),
    }


def s2_verification(settings: Settings) -> tuple[list, list, dict]:
    """The matches_s2_specter2 check, the sensor that runs it after ranged runs, and its resource, where an S2 API
    key is set."""
    if not os.environ.get(S2_KEY_VARIABLE):
        return [], [], {}
    return [verification.matches_s2_specter2], [verification.s2_check_sensor], {
        "s2_graph": verification.S2GraphResource(api=settings.s2_api, api_key=EnvVar(S2_KEY_VARIABLE),
                                                 min_interval=settings.s2_min_interval)}


def build_definitions(settings: Settings | None = None) -> Definitions:
    settings = settings or load_settings()
    checks, check_sensors, check_resources = s2_verification(settings)
    return Definitions(
        assets=[source.s2_source, embeddings.papers, embeddings.paper_embeddings, shards.hub_shards,
                novelty.paper_index, novelty.paper_novelty, novelty.hub_novelty],
        asset_checks=[*load_asset_checks_from_modules([embeddings, shards, novelty]), *checks],
        sensors=[s2_source_release_sensor, s2_release_ranges_sensor, novelty_sensor, *check_sensors],
        resources={**build_resources(settings), **check_resources},
        executor=recording_run_worker(executor_for(settings)),
    )


defs = build_definitions()
