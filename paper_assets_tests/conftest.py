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
