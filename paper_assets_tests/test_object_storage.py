"""Homes on object storage (``PAPER_ASSETS_HOME=s3://bucket/prefix``) against moto's S3 server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import duckdb
import pyarrow as pa
import pytest

from paper_assets.engine.checkpoints import ChunkCheckpoints
from paper_assets.engine.fs import atomic_parquet_writer, read_parquet
from paper_assets.engine.home import ProjectHome
from paper_assets.engine.ranges import parse_range
from paper_assets.engine.versions import current_name, staged_version, switch_current

from .conftest import REPO, s3_keys


def test_the_demo_runs_on_an_s3_home(tmp_path, s3_home):
    env = dict(os.environ)
    env.pop("DAGSTER_HOME", None)
    out = subprocess.run([sys.executable, "-m", "paper_assets.cli", "demo", "--papers", "300"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    keys = s3_keys(s3_home)
    release = json.loads(ProjectHome(s3_home).source_dir.joinpath("current.json").read_text())["release"]
    build = json.loads(ProjectHome(s3_home).index_dir.joinpath("current.json").read_text())["build"]
    partition = "000000000-000999999"
    expected = {f"papers/papers-{partition}.parquet", f"embeddings/embeddings-{partition}.parquet",
                f"embeddings/embeddings-{partition}.checks.json", "source/current.json",
                f"source/{release}/papers.parquet", f"source/{release}/invalid_corpusid.parquet",
                f"source/{release}/manifest.json", "index/current.json", f"index/{build}/manifest.json",
                f"index/{build}/papers.parquet", f"index/{build}/vectors.npy", f"stats/norms/{partition}.json",
                "stats/published.json"}
    novelty = {k for k in keys if k.startswith("novelty/")}
    assert set(keys) - novelty == expected  # no temporary or partial objects, no checkpoints left behind
    assert len(novelty) == 24

    layout = ProjectHome(s3_home)
    local = layout.local
    assert local == (tmp_path / "local").resolve()
    assert not (local / "embeddings").exists() and not (local / "papers").exists()  # shared data lives on S3 only
    ids = read_parquet(layout.embeddings_file(parse_range(partition)), columns=["corpusid"]).column("corpusid")
    source_ids = read_parquet(layout.papers_file(parse_range(partition)), columns=["corpusid"]).column("corpusid")
    assert sorted(ids.to_pylist()) == sorted(source_ids.to_pylist()) and len(set(ids.to_pylist())) == len(ids) > 250
    published = list((layout.hub_folder / "data").glob("*.parquet"))
    assert [p.name for p in published] == [f"embeddings-{partition}.parquet"]
    assert published[0].read_bytes() == layout.embeddings_file(parse_range(partition)).read_bytes()

    with duckdb.connect(str(layout.warehouse)) as conn:  # the catalog's views read the Parquet on S3
        layout.register_filesystem(conn)
        layout.register_filesystem(conn)  # idempotent: refresh_catalog registers on connections it is given
        assert conn.execute("SELECT count(*), count(DISTINCT corpusid) FROM embeddings").fetchall() == [
            (len(ids), len(ids))]
        assert conn.execute("SELECT count(*) FROM paper_novelty").fetchall()[0][0] > 0

    corpusid = ids[0].as_py()
    similar = subprocess.run([sys.executable, "-m", "paper_assets.cli", "similar", str(corpusid), "--json"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert similar.returncode == 0, similar.stderr[-3000:]
    assert len(json.loads(similar.stdout)["neighbors"]) == 10
    assert (layout.index_cache / build / "vectors.npy").exists()  # memory-mapped from this machine's copy


def test_object_storage_writes_are_all_or_nothing(tmp_path, s3_home):
    layout = ProjectHome(s3_home)
    rng = parse_range("0-999")
    target = layout.papers_file(rng)
    good = pa.table({"corpusid": pa.array([1, 2, 3], pa.int64())})
    with atomic_parquet_writer(target, good.schema) as writer:
        writer.write_table(good)
    before = s3_keys(s3_home)

    with pytest.raises(RuntimeError), atomic_parquet_writer(target, good.schema) as writer:
        writer.write_table(pa.table({"corpusid": pa.array([9], pa.int64())}))
        raise RuntimeError("killed in the middle of a write")
    assert read_parquet(target).equals(good) and s3_keys(s3_home) == before

    # A version folder appears whole or not at all; a failed one leaves the current pointer where it was.
    root = layout.root / "versions"
    with staged_version(root, "v1") as folder:
        (folder / "data.bin").write_bytes(b"x" * 10)
        (folder / "manifest.json").write_text("{}")
    switch_current(root, "name", "v1")
    with pytest.raises(RuntimeError), staged_version(root, "v2") as folder:
        (folder / "data.bin").write_bytes(b"y")
        raise RuntimeError("failed while writing v2")
    assert current_name(root, "name") == "v1"
    assert not any(k.startswith("versions/v2") for k in s3_keys(s3_home))

    # Checkpoints of other inputs are discarded; matching ones survive a restart.
    folder = layout.checkpoint_dir(rng)
    chunk = pa.record_batch({"corpusid": pa.array([1], pa.int64())})
    ChunkCheckpoints(folder, {"papers": "a"}).write(0, chunk)
    assert ChunkCheckpoints(folder, {"papers": "a"}).has(0)
    assert not ChunkCheckpoints(folder, {"papers": "b"}).has(0)
    assert not layout.local.exists() or not any(layout.local.rglob("*.parquet"))


def test_machines_sharing_a_home_record_partition_norms_without_losing_or_failing_any(tmp_path, s3_home):
    """Every embedding step records its partition's norm statistics in the shared home and reads every partition's
    back (the norms_in_band reference). Two machines doing so at once (their locks are their own) must neither lose
    one another's partitions nor fail a read because the other replaced a record meanwhile (S3's 412
    PreconditionFailed on an object replaced between a read's HEAD and its GET)."""
    from concurrent.futures import ThreadPoolExecutor

    from paper_assets.engine.gate import norm_registry, update_norm_registry
    from paper_assets.engine.ranges import range_for

    machines = [ProjectHome(s3_home, local=tmp_path / f"machine-{i}") for i in range(2)]
    keys = [range_for(i * 1_000_000, 1_000_000).key for i in range(24)]

    def record(machine: int) -> None:
        for key in keys[machine::2]:
            stats = {"count": 40, "median": 1.0 + int(key[:3]) / 100, "mad": 0.01}
            seen = update_norm_registry(machines[machine], key, "fp-1", stats)
            assert seen[key]["median"] == stats["median"]  # its own record is part of what it reads back

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(record, range(2)))
    registry = norm_registry(machines[0])
    assert sorted(registry) == keys
    assert all(registry[key]["fingerprint"] == "fp-1" and registry[key]["count"] == 40 for key in keys)
    # A partition embedded again: every reader sees its new record, also one that read the old one before.
    update_norm_registry(machines[1], keys[0], "fp-2", {"count": 41, "median": 2.0, "mad": 0.02})
    assert norm_registry(machines[0])[keys[0]] == {"fingerprint": "fp-2", "count": 41, "median": 2.0, "mad": 0.02}
