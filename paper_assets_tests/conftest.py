"""Shared fixtures: a tiny model of SPECTER2's architecture built once per session, source databases, a home."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "0")

# huggingface_hub reads HF_ENDPOINT once, at import (CommitInfo parses commit URLs against it): the Hub-protocol
# test server therefore starts before anything imports huggingface_hub, and lives for the whole session.
from .hub_server import HubServer  # noqa: E402

HUB = HubServer().__enter__()
os.environ["HF_ENDPOINT"] = HUB.endpoint

from paper_assets.demo_kit import sample_source  # noqa: E402
from paper_assets.demo_kit.tiny_model import build_model  # noqa: E402
from paper_assets.processes import stop_process_group  # noqa: E402,F401 - shared with the tests

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_papers() -> list[dict]:
    path = SHARED_DATA / "scirepeval_sample_papers.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present (shared data lives beside the checkout)")
    return sample_source.read_jsonl_papers(path)


@pytest.fixture(scope="session")
def generated_papers() -> list[dict]:
    return sample_source.generate_papers(600, seed=11)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, generated_papers) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("tiny-model")
    texts = [f"{p['title']} {p['abstract'] or ''}" for p in generated_papers]
    base, adapter = build_model(folder, texts)
    return str(base), str(adapter)


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "home"
    root.mkdir()
    monkeypatch.setenv("PAPER_ASSETS_HOME", str(root))
    return root


def make_source(path: Path, papers: list[dict], id_type: str = "BIGINT") -> Path:
    return sample_source.write_source(path, papers, id_type=id_type)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 for the whole session (object-storage homes)."""
    try:
        import moto  # noqa: F401
        import upath  # noqa: F401
    except ImportError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the s3 extra / moto is not installed here: {err}")
    from paper_assets.local_services import moto_s3_server

    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture()
def s3_home(tmp_path, monkeypatch, s3_endpoint) -> str:
    """``PAPER_ASSETS_HOME=s3://<fresh bucket>/home`` with this machine's part in ``tmp_path/local``."""
    from paper_assets.local_services import S3_TEST_CREDENTIALS, temporary_bucket

    for name, value in {**S3_TEST_CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PAPER_ASSETS_LOCAL_HOME", str(tmp_path / "local"))
    with temporary_bucket(s3_endpoint) as bucket:
        uri = f"s3://{bucket}/home"
        monkeypatch.setenv("PAPER_ASSETS_HOME", uri)
        yield uri


def s3_keys(uri: str) -> list[str]:
    """Every key under an ``s3://bucket/prefix`` (relative to the prefix), listed with boto3, not with our code."""
    import boto3

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        keys += [item["Key"].removeprefix(prefix + "/") for item in page.get("Contents", [])]
    return sorted(keys)


# Test tiers (pyproject.toml's markers): `services` follows from the fixtures a test uses; `slow` is every test
# measured at 3 s or more on a 2-vCPU machine (end to end runs, fresh interpreters, the real tiny model), by id.
SERVICE_FIXTURES = {"pg_url", "redis_url", "amqp_url", "s3_endpoint", "s3_home", "chaos_services"}
SLOW_TESTS = {
    "paper_assets_tests/test_assets.py::test_demo_end_to_end_in_a_temporary_home",
    "paper_assets_tests/test_assets.py::test_failing_blocking_check_stops_hub_shards",
    "paper_assets_tests/test_assets.py::test_one_partition_of_each_asset",
    "paper_assets_tests/test_cli.py::test_bench_command_reports_every_figure",
    "paper_assets_tests/test_cli.py::test_bench_pipeline_reports_the_data_path_and_memory_of_processes_that_did_not_build_their_source",
    "paper_assets_tests/test_cli.py::test_bench_tokenises_the_real_abstracts_both_ways_to_the_same_ids",
    "paper_assets_tests/test_cli.py::test_embed_command_on_integer_and_varchar_sources",
    "paper_assets_tests/test_cli.py::test_embed_command_single_range",
    "paper_assets_tests/test_cli.py::test_embed_per_machine_into_one_home_then_publish_once",
    "paper_assets_tests/test_cli.py::test_engine_ab_tool_runs_each_checkout_from_its_own_folder_alternately",
    "paper_assets_tests/test_cli.py::test_expected_errors_are_one_line_and_exit_2",
    "paper_assets_tests/test_cli.py::test_gpu_hosts_data_path_probe_tokenises_every_paper_alike_in_every_mode",
    "paper_assets_tests/test_cli.py::test_publish_command_uses_the_asset_code",
    "paper_assets_tests/test_cli.py::test_publish_to_the_hub_without_a_token_is_a_one_line_error",
    "paper_assets_tests/test_device_knn.py::test_device_search_memory_is_bounded_by_its_blocks_not_by_the_priors",
    "paper_assets_tests/test_encoder.py::test_a_run_that_measured_the_compile_itself_keeps_the_compiled_model_its_time_being_paid",
    "paper_assets_tests/test_encoder.py::test_a_tokenizer_pool_is_ready_when_built_and_a_worker_that_cannot_start_is_raised_there",
    "paper_assets_tests/test_encoder.py::test_a_wrong_folder_or_device_fails_before_the_model_libraries_load",
    "paper_assets_tests/test_encoder.py::test_another_attention_kernel_is_calibrated_under_its_own_key",
    "paper_assets_tests/test_encoder.py::test_bf16_runs_base_and_adapter_matmuls_in_bf16_and_matches_loosely",
    "paper_assets_tests/test_encoder.py::test_canary_of_a_compiled_encoder_runs_without_recompiling_and_its_adapter_less_pass_once",
    "paper_assets_tests/test_encoder.py::test_compiled_model_is_compiled_once_at_load_and_gives_the_same_vectors",
    "paper_assets_tests/test_encoder.py::test_cpu_compile_auto_is_measured_once_per_machine_and_compiles_with_frozen_packed_weights",
    "paper_assets_tests/test_encoder.py::test_cpu_token_budget_is_measured_once_and_cached_per_machine",
    "paper_assets_tests/test_encoder.py::test_fp32_matches_the_notebook_recipe_tightly",
    "paper_assets_tests/test_encoder.py::test_text_cleaning_is_invisible_to_the_tokenizer_on_real_abstracts",
    "paper_assets_tests/test_encoder.py::test_unreachable_weights_explain_how_to_use_a_local_copy",
    "paper_assets_tests/test_encoder.py::test_worker_process_tokenisation_equals_in_process_tokenisation",
    "paper_assets_tests/test_hub.py::test_hub_shards_asset_publishes_a_backfill_in_one_commit",
    "paper_assets_tests/test_novelty.py::test_a_broken_graph_fails_the_recall_check",
    "paper_assets_tests/test_novelty.py::test_novelty_assets_checks_sensor_and_commands",
    "paper_assets_tests/test_object_storage.py::test_the_demo_runs_on_an_s3_home",
    "paper_assets_tests/test_readme.py::test_readme_commands_as_written",
    "paper_assets_tests/test_recovery.py::test_a_run_worker_killed_mid_backfill_is_retried_to_completion",
    "paper_assets_tests/test_releases.py::test_a_hub_source_with_a_new_revision_is_a_new_release",
    "paper_assets_tests/test_releases.py::test_a_model_change_re_embeds_everything",
    "paper_assets_tests/test_releases.py::test_an_emptied_range_ends_with_no_rows_locally_and_on_the_hub",
    "paper_assets_tests/test_releases.py::test_kill_during_update_then_update_again_reaches_the_same_state",
    "paper_assets_tests/test_releases.py::test_sensor_tick_reads_no_data",
    "paper_assets_tests/test_releases.py::test_source_setting_takes_several_files",
    "paper_assets_tests/test_releases.py::test_the_sensors_follow_a_release_and_request_nothing_on_a_current_home",
    "paper_assets_tests/test_releases.py::test_update_embeds_only_what_changed_and_deletes_what_left",
    "paper_assets_tests/test_reliability.py::test_bad_source_fails_before_work_and_leaves_outputs",
    "paper_assets_tests/test_reliability.py::test_dirty_rows_each_follow_a_counted_rule",
    "paper_assets_tests/test_reliability.py::test_disk_full_fails_cleanly_and_keeps_last_good_version",
    "paper_assets_tests/test_reliability.py::test_four_partition_runs_at_once",
    "paper_assets_tests/test_reliability.py::test_kill_during_embedding_resumes_from_checkpoints",
    "paper_assets_tests/test_reliability.py::test_kill_during_hub_publish_leaves_no_partial_commit",
    "paper_assets_tests/test_reliability.py::test_kill_during_parquet_write_leaves_the_previous_file",
    "paper_assets_tests/test_reliability.py::test_kill_during_publish_then_rerun_publishes_everything_once",
    "paper_assets_tests/test_reliability.py::test_token_never_reaches_logs_or_metadata",
    "paper_assets_tests/test_s2_source.py::test_the_sensors_follow_s2_releases",
    "paper_assets_tests/test_s2_source.py::test_update_follows_s2_by_diffs_and_embeds_only_what_changed",
    "paper_assets_tests/test_s2_source.py::test_a_wrong_or_missing_key_is_a_one_line_error",
    "paper_assets_tests/test_s2_verify.py::test_verify_and_the_check_read_1_against_our_own_vectors_and_fail_against_perturbed_ones",
    "paper_assets_tests/test_scale_out.py::test_a_worker_killed_mid_backfill_hands_its_step_to_the_other",
    "paper_assets_tests/test_scale_out.py::test_ui_backfill_of_8_partitions_on_two_workers_into_an_s3_home",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)
        if item.nodeid.split("[")[0] in SLOW_TESTS or item.nodeid in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
