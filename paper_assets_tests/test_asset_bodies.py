"""Asset bodies and their checks, invoked directly with stub resources (as Dagster's example projects test them):
a deterministic fake encoder stands in for the model, so these run in seconds and need no torch. The same bodies
run with the real tiny model in test_assets.py."""

import contextlib
import hashlib
import inspect
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
from dagster import AssetCheckResult, MaterializeResult, build_asset_context
from dagster_duckdb import DuckDBResource

from paper_assets.defs import embeddings
from paper_assets.defs.resources import ProjectHomeResource, Specter2Resource
from paper_assets.engine.encode_stats import EncodeStats
from paper_assets.engine.fs import read_parquet
from paper_assets.engine.home import ProjectHome
from paper_assets.engine.schemas import vectors_of
from paper_assets.engine.snapshot import build_snapshot
from paper_assets.engine.source import inspect_source

from .conftest import make_source

DIM = 16
KEY = "000000000-000999999"


@dataclass
class _FakeModel:
    active_adapters: object = "proximity"

    def set_active_adapters(self, adapters) -> None:
        self.active_adapters = adapters


@dataclass
class _FakeConfig:
    attn_implementation: str = "sdpa"
    adapter_name: str = "proximity"


@dataclass
class _FakeLoaded:
    hidden_size: int = DIM
    fingerprint: str = "fake-0001"
    precision: str = "fp32"
    device: str = "cpu"
    config: _FakeConfig = field(default_factory=_FakeConfig)
    model: _FakeModel = field(default_factory=_FakeModel)

    def metadata(self) -> dict:
        return {"base_model": "fake", "adapter": "fake", "adapter_name": "proximity", "fingerprint": self.fingerprint,
                "precision": self.precision, "device": self.device, "max_length": 512, "pooling": "cls",
                "attn_implementation": "sdpa"}


class FakeEncoder:
    """Vectors that depend only on the text (a seeded draw, norms within 1% of 10) and, like SPECTER2's, on whether
    the adapter is active: the engine's contract without a model."""

    compiled = False
    token_budget = 1024

    def __init__(self):
        self.loaded = _FakeLoaded()
        self.encoded_rows = 0

    def _vector(self, text: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        vector = np.random.default_rng(seed).normal(size=DIM)
        vector *= 10 * (1 + 0.01 * np.tanh(vector[0])) / np.linalg.norm(vector)
        if self.loaded.model.active_adapters is None:
            vector = np.roll(vector, 1)
        return vector.astype(np.float32)

    def encode(self, texts: list[str]) -> np.ndarray:
        self.encoded_rows += len(texts)
        return np.stack([self._vector(t) for t in texts]) if texts else np.empty((0, DIM), np.float32)

    def encode_stream(self, chunks):
        for payload, texts in chunks:
            yield payload, self.encode(texts), EncodeStats(rows=len(texts), batches=1)

    @contextlib.contextmanager
    def eager(self):
        yield self


class StubSpecter2(Specter2Resource):
    def get_encoder(self, expected_rows=None):
        return _ENCODER

    def is_loaded(self) -> bool:
        return True


_ENCODER = FakeEncoder()


def run_body(asset, resources: dict) -> SimpleNamespace:
    """Invoke an asset body on partition KEY: a one-partition run reports one materialisation and its checks."""
    out = asset(build_asset_context(partition_key=KEY), **resources)
    events = list(out) if inspect.isgenerator(out) else [out]
    [result] = [e for e in events if isinstance(e, MaterializeResult)]
    return SimpleNamespace(metadata=result.metadata,
                           check_results=[e for e in events if isinstance(e, AssetCheckResult)])


@pytest.fixture()
def stubbed(tmp_path, generated_papers):
    """A home with a current snapshot of 120 papers in one range, and the stub resources."""
    papers = [dict(p, corpusid=1000 + i) for i, p in enumerate(generated_papers[:120])]
    source = make_source(tmp_path / "source.duckdb", papers)
    layout = ProjectHome(str(tmp_path / "home"))
    build_snapshot([inspect_source(source)], layout.source_dir, "r1", 1_000_000)
    resources = {"specter2": StubSpecter2(chunk_rows=32), "home": ProjectHomeResource(root=str(layout.root)),
                 "catalog": DuckDBResource(database=str(tmp_path / "warehouse.duckdb"))}
    return layout, resources, papers


def test_papers_body_writes_the_range_and_reports_its_rules(stubbed):
    layout, resources, papers = stubbed
    result = run_body(embeddings.papers, resources)
    rows = read_parquet(layout.papers_file(embeddings.parse_range(KEY)))
    assert result.metadata["dagster/row_count"] == rows.num_rows <= len(papers)
    assert result.metadata["source_rows"] == len(papers)
    assert sum(v for k, v in result.metadata.items() if k.startswith("skipped_")) == len(papers) - rows.num_rows


def test_paper_embeddings_body_embeds_checks_and_reuses(stubbed):
    layout, resources, _ = stubbed
    run_body(embeddings.papers, resources)
    before = _ENCODER.encoded_rows
    result = run_body(embeddings.paper_embeddings, resources)
    rows = result.metadata["dagster/row_count"]
    assert rows > 0 and result.metadata["rows_embedded"] == rows and result.metadata["dimension"] == DIM
    assert result.metadata["quality_gate"] == "passed"
    assert {c.check_name for c in result.check_results} == set(embeddings.EMBEDDING_CHECKS)
    assert all(c.passed for c in result.check_results), [(c.check_name, c.description) for c in result.check_results]
    table = read_parquet(layout.embeddings_file(embeddings.parse_range(KEY)))
    np.testing.assert_allclose(np.linalg.norm(vectors_of(table), axis=1), 10, rtol=0.011)
    embedded = _ENCODER.encoded_rows - before

    again = run_body(embeddings.paper_embeddings, resources)
    assert again.metadata["rows_reused"] == rows and again.metadata["rows_embedded"] == 0
    assert _ENCODER.encoded_rows - before - embedded <= 2  # the canary only: every row's vector was reused


def test_a_switched_off_adapter_fails_the_canary_check(stubbed):
    layout, resources, _ = stubbed
    run_body(embeddings.papers, resources)
    run_body(embeddings.paper_embeddings, resources)  # stores the reference
    _ENCODER.loaded.model.active_adapters = None
    try:
        result = run_body(embeddings.paper_embeddings, resources)
    finally:
        _ENCODER.loaded.model.active_adapters = "proximity"
    canary = next(c for c in result.check_results if c.check_name == "adapter_canary")
    assert not canary.passed and result.metadata["quality_gate"].startswith("FAILED")
