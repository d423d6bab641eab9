"""Several partitions through one encoder stream (`embed_partitions`, what `paper-assets embed` runs) give each
partition the file, report and resume behaviour that embedding it alone gives."""

import threading

import numpy as np
import pytest

from paper_assets.engine.encoder import Encoder
from paper_assets.engine.fs import read_parquet
from paper_assets.engine.model import ModelConfig, load_model
from paper_assets.engine.pipeline import EmbedJob, build_papers, embed_papers, embed_partitions
from paper_assets.engine.ranges import range_for
from paper_assets.engine.schemas import vectors_of
from paper_assets.engine.source import inspect_source, range_stats

from .conftest import make_source

WIDTH = 300_000


@pytest.fixture(scope="module")
def encoder(tiny_model):
    base, adapter = tiny_model
    return Encoder(load_model(ModelConfig(base_model=base, adapter=adapter, precision="fp32", device="cpu")),
                   token_budget=2048)


@pytest.fixture()
def papers_files(tmp_path, generated_papers):
    info = inspect_source(make_source(tmp_path / "source.duckdb", generated_papers[:300]))
    stats, _ = range_stats(info, WIDTH)
    files = []
    for lo in sorted(stats):
        path = tmp_path / "papers" / f"papers-{lo}.parquet"
        build_papers(info, range_for(lo, WIDTH), path)
        files.append(path)
    assert len(files) >= 3
    return files


def jobs_for(files, out_dir, checkpoints_dir, encoder):
    return [EmbedJob(f, out_dir / f.name.replace("papers", "embeddings"), checkpoints_dir / f.stem,
                     {"model": encoder.loaded.metadata(), "range": f.stem}, context=f.stem) for f in files]


def test_one_stream_over_partitions_equals_each_partition_alone(encoder, papers_files, tmp_path):
    alone = {}
    for job in jobs_for(papers_files, tmp_path / "alone", tmp_path / "ck-alone", encoder):
        report = embed_papers(job.papers_path, job.out_path, encoder, job.checkpoint_dir, chunk_rows=32,
                              file_metadata=job.file_metadata)
        alone[job.context] = (read_parquet(job.out_path), report)

    streamed = list(embed_partitions(jobs_for(papers_files, tmp_path / "one", tmp_path / "ck-one", encoder), encoder,
                                     chunk_rows=32))
    assert [job.context for job, _ in streamed] == [f.stem for f in papers_files]  # in order, each once
    for job, report in streamed:
        table, single = read_parquet(job.out_path), alone[job.context][1]
        expected = alone[job.context][0]
        assert table.column("corpusid").to_pylist() == expected.column("corpusid").to_pylist()
        assert table.column("text_sha256").to_pylist() == expected.column("text_sha256").to_pylist()
        np.testing.assert_allclose(vectors_of(table), vectors_of(expected), rtol=0, atol=1e-5)
        assert (report.rows, report.chunks, report.rows_embedded) == (single.rows, single.chunks, single.rows)
        assert report.encode.rows == single.rows and report.seconds > 0
        assert b"range" in table.schema.metadata[b"paper_assets"]  # the job's own file metadata
        assert not job.checkpoint_dir.exists()  # assembled, then the checkpoints are gone


def test_an_interrupted_stream_resumes_each_partition_where_it_stopped(encoder, papers_files, tmp_path):
    jobs = jobs_for(papers_files, tmp_path / "out", tmp_path / "ck", encoder)
    chunks_written = []

    def stop_in_the_second_partition(done, total, seconds):
        chunks_written.append(done)
        if len(chunks_written) == len(_chunks(papers_files[0])) + 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        for _ in embed_partitions(jobs, encoder, chunk_rows=32, progress=stop_in_the_second_partition):
            pass
    assert jobs[0].out_path.exists() and not jobs[1].out_path.exists()
    assert len(list(jobs[1].checkpoint_dir.glob("chunk-*.parquet"))) == 1

    reports = dict((job.context, report) for job, report in embed_partitions(jobs, encoder, chunk_rows=32))
    first, second, third = (reports[f.stem] for f in papers_files[:3])
    assert first.rows_reused == first.rows and first.rows_embedded == 0  # finished before: reused bit for bit
    assert second.resumed_chunks == 1 and second.encode.rows == second.rows - 32
    assert third.resumed_chunks == 0 and third.rows_embedded == third.rows
    for job in jobs:
        assert read_parquet(job.out_path).num_rows == read_parquet(job.papers_path).num_rows


def test_files_are_written_off_the_embedding_thread_and_a_failed_write_is_raised(encoder, papers_files, tmp_path,
                                                                                 monkeypatch):
    from paper_assets.engine.checkpoints import ChunkCheckpoints

    writing_threads = []
    write = ChunkCheckpoints.write

    def write_until_the_disk_fills(self, index, batch):
        writing_threads.append(threading.current_thread().name)
        if len(writing_threads) == 3:
            raise OSError("No space left on device")
        write(self, index, batch)

    monkeypatch.setattr(ChunkCheckpoints, "write", write_until_the_disk_fills)
    jobs = jobs_for(papers_files, tmp_path / "out", tmp_path / "ck", encoder)
    assert len(_chunks(papers_files[0])) > 3
    with pytest.raises(OSError, match="No space left"):
        for _ in embed_partitions(jobs, encoder, chunk_rows=32):
            pass
    assert writing_threads[:3] and all(name.startswith("paper-assets-writer") for name in writing_threads)
    assert not jobs[0].out_path.exists()  # its third chunk never reached the disk: no partial file

    monkeypatch.setattr(ChunkCheckpoints, "write", write)
    reports = {job.context: report for job, report in embed_partitions(jobs, encoder, chunk_rows=32)}
    first = reports[papers_files[0].stem]
    # Only the chunk whose write failed is embedded again; the ones written before (and after) it are resumed.
    assert first.resumed_chunks == first.chunks - 1 >= 2 and first.encode.rows == 32
    for job in jobs:
        assert read_parquet(job.out_path).num_rows == read_parquet(job.papers_path).num_rows


def _chunks(papers_file, chunk_rows=32):
    return range(0, read_parquet(papers_file).num_rows, chunk_rows)


def test_free_heap_pages_go_back_to_the_os_after_each_chunk(encoder, papers_files, tmp_path, monkeypatch):
    """glibc keeps freed pages between live blocks; each chunk's write hands them back, so RSS follows what is in
    use over a long partition (measured: 965 -> 893 MB peak over 200k papers)."""
    import ctypes

    from paper_assets.engine import pipeline

    if pipeline._MALLOC_TRIM is None:
        pytest.skip("not glibc: nothing to trim")

    def rss_anon_mb() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("RssAnon")) // 1024

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    blocks = [libc.malloc(64 * 1024) for _ in range(3200)]  # 200 MB of heap blocks, touched
    for block in blocks:
        ctypes.memset(block, 1, 64 * 1024)
    for block in blocks[:-1]:  # the last one pins the top of the heap: only a trim can return the rest
        libc.free(block)
    held = rss_anon_mb()
    pipeline.release_free_heap()
    assert rss_anon_mb() < held - 150
    libc.free(blocks[-1])

    trims = []
    monkeypatch.setattr(pipeline, "release_free_heap", lambda: trims.append(threading.current_thread().name))
    jobs = jobs_for(papers_files, tmp_path / "out", tmp_path / "ck", encoder)
    for _ in embed_partitions(jobs, encoder, chunk_rows=32):
        pass
    chunks = sum(len(_chunks(job.papers_path)) for job in jobs)
    assert len(trims) == chunks and all(name.startswith("paper-assets-writer") for name in trims)


def test_streaming_a_parquet_file_holds_about_one_row_group(tmp_path):
    """A partition's files are read a row group at a time and the Arrow memory stays at about one row group however
    long the file is (pyarrow's pre-buffer cache would keep every column chunk read until the file is closed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from paper_assets.engine.fs import parquet_file

    rng = np.random.default_rng(5)
    path = tmp_path / "long.parquet"
    group_rows, groups = 2_000, 30
    with pq.ParquetWriter(path, pa.schema([("corpusid", pa.int64()), ("text", pa.string())]),
                          compression="none") as writer:
        for g in range(groups):  # ~0.35 MB of text per row group
            words = rng.integers(0, 2**62, size=(group_rows, 8)).astype(str)
            texts = [" ".join(row) for row in words]
            writer.write_table(pa.table({"corpusid": np.arange(g * group_rows, (g + 1) * group_rows),
                                         "text": texts}))
    group_bytes = pq.ParquetFile(path).metadata.row_group(0).total_byte_size
    before = pa.total_allocated_bytes()
    held, rows = 0, 0
    for batch in parquet_file(path).iter_batches(batch_size=700, columns=["corpusid", "text"]):
        held = max(held, pa.total_allocated_bytes() - before)
        rows += batch.num_rows
    assert rows == group_rows * groups
    assert held < 4 * group_bytes, (held, group_bytes)  # pre-buffered: ~30 row groups by the end
