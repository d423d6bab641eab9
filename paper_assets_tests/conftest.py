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

from paper_assets.benchkit import sample_source  # noqa: E402
from paper_assets.benchkit.services import stop_process_group  # noqa: E402,F401 - shared with the tests
from paper_assets.benchkit.tiny_model import build_model  # noqa: E402

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
    from paper_assets.benchkit.services import moto_s3_server

    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture()
def s3_home(tmp_path, monkeypatch, s3_endpoint) -> str:
    """``PAPER_ASSETS_HOME=s3://<fresh bucket>/home`` with this machine's part in ``tmp_path/local``."""
    from paper_assets.benchkit.services import S3_TEST_CREDENTIALS, temporary_bucket

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
SLOW_TESTS: set[str] = set()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)
        if item.nodeid.split("[")[0] in SLOW_TESTS or item.nodeid in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
