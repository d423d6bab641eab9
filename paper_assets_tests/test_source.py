import duckdb
import pyarrow as pa
import pytest

from paper_assets.engine.pipeline import build_papers
from paper_assets.engine.ranges import IdRange
from paper_assets.engine.schemas import file_metadata
from paper_assets.engine.source import SourceError, inspect_source, range_stats, read_range

from .conftest import make_source

PAPERS = [
    {"corpusid": 5, "title": "Five", "abstract": "Abstract five."},
    {"corpusid": 1_000_001, "title": "Million one", "abstract": None},
    {"corpusid": 12, "title": "Twelve", "abstract": "Abstract twelve."},
]


@pytest.mark.parametrize("id_type", ["BIGINT", "VARCHAR", "INTEGER"])
def test_ranges_read_the_same_for_integer_and_varchar_ids(tmp_path, id_type):
    info = inspect_source(make_source(tmp_path / "s.duckdb", PAPERS, id_type))
    assert info.id_type == ("varchar" if id_type == "VARCHAR" else "integer")
    stats, invalid = range_stats(info, 1_000_000)
    assert invalid == 0
    assert {lo: s.rows for lo, s in stats.items()} == {0: 2, 1_000_000: 1}
    _, batches = read_range(info, IdRange(0, 999_999))
    table = pa.Table.from_batches(list(batches))
    assert table.column("corpusid").to_pylist() == [5, 12]
    assert table.schema.field("corpusid").type == pa.int64()


def test_invalid_and_duplicate_ids_follow_the_documented_rules(tmp_path):
    papers = PAPERS + [
        {"corpusid": "abc", "title": "Not an id", "abstract": "x"},
        {"corpusid": "-7", "title": "Negative", "abstract": "x"},
        {"corpusid": " 12 ", "title": "Twelve again, longer abstract", "abstract": "A much longer abstract twelve."},
        {"corpusid": "12", "title": "Twelve short", "abstract": None},
    ]
    source = make_source(tmp_path / "s.duckdb", [dict(p, corpusid=str(p["corpusid"])) for p in papers], "VARCHAR")
    info = inspect_source(source)
    stats, invalid = range_stats(info, 1_000_000)
    assert invalid == 2
    assert stats[0].rows == 4 and stats[0].distinct_ids == 2
    report = build_papers(info, IdRange(0, 999_999), tmp_path / "p.parquet")
    assert report.source_rows == 4 and report.duplicate_corpusid == 2 and report.rows == 2
    texts = duckdb.sql(f"SELECT corpusid, text FROM '{tmp_path / 'p.parquet'}' ORDER BY 1").fetchall()
    assert texts[1] == (12, "Twelve again, longer abstract [SEP] A much longer abstract twelve.")
    assert file_metadata(tmp_path / "p.parquet")["duplicate_corpusid"] == 2


def test_rows_without_text_are_skipped_and_counted(tmp_path):
    papers = [{"corpusid": 1, "title": None, "abstract": None}, {"corpusid": 2, "title": "  ", "abstract": "\x00"},
              {"corpusid": 3, "title": "T", "abstract": None}, {"corpusid": 4, "title": None, "abstract": "A"}]
    info = inspect_source(make_source(tmp_path / "s.duckdb", papers))
    report = build_papers(info, IdRange(0, 99), tmp_path / "p.parquet")
    assert report.rows == 2 and report.skipped == {"no_text": 2}
    assert report.rules == {"title_only": 1, "abstract_only": 1}


def test_empty_range_writes_an_empty_file(tmp_path):
    info = inspect_source(make_source(tmp_path / "s.duckdb", PAPERS))
    report = build_papers(info, IdRange(500, 600), tmp_path / "p.parquet")
    assert report.rows == 0 and (tmp_path / "p.parquet").exists()


def test_missing_file(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        inspect_source(tmp_path / "nope.duckdb")


def test_not_a_duckdb_file(tmp_path):
    bogus = tmp_path / "bogus.duckdb"
    bogus.write_bytes(b"this is not a database" * 100)
    with pytest.raises(SourceError, match="not a readable DuckDB"):
        inspect_source(bogus)


def test_missing_table_and_column_and_wrong_types(tmp_path):
    path = tmp_path / "s.duckdb"
    with duckdb.connect(str(path)) as conn:
        conn.execute("CREATE TABLE other (x INT)")
    with pytest.raises(SourceError, match="no table 'papers_with_abstracts'"):
        inspect_source(path)
    with duckdb.connect(str(path)) as conn:
        conn.execute("CREATE TABLE papers_with_abstracts (corpusid BIGINT, title VARCHAR)")
    with pytest.raises(SourceError, match="lacks column"):
        inspect_source(path)
    with duckdb.connect(str(path)) as conn:
        conn.execute("DROP TABLE papers_with_abstracts")
        conn.execute("CREATE TABLE papers_with_abstracts (corpusid DOUBLE, title VARCHAR, abstract VARCHAR)")
    with pytest.raises(SourceError, match="corpusid .* has type DOUBLE"):
        inspect_source(path)
    with duckdb.connect(str(path)) as conn:
        conn.execute("DROP TABLE papers_with_abstracts")
        conn.execute("CREATE TABLE papers_with_abstracts (corpusid BIGINT, title INT, abstract VARCHAR)")
    with pytest.raises(SourceError, match="title .* expected VARCHAR"):
        inspect_source(path)


def test_source_is_opened_read_only_while_another_process_reads(tmp_path):
    path = make_source(tmp_path / "s.duckdb", PAPERS)
    with duckdb.connect(str(path), read_only=True):
        info = inspect_source(path)
        _, batches = read_range(info, IdRange(0, 99))
        assert sum(b.num_rows for b in batches) == 2


@pytest.mark.parametrize("id_type", ["BIGINT", "VARCHAR"])
def test_reading_in_id_windows_gives_exactly_the_rows_of_one_pass(tmp_path, id_type):
    import random

    rng = random.Random(4)
    papers = [{"corpusid": rng.randrange(0, 5_000), "title": f"t{i}", "abstract": "a" * rng.randrange(0, 9)}
              for i in range(3_000)]  # many duplicate ids, so windows must keep an id's copies together
    info = inspect_source(make_source(tmp_path / "s.duckdb", papers, id_type))
    whole = pa.Table.from_batches(list(read_range(info, IdRange(0, 4_999), window_rows=10**9)[1]))
    windowed = pa.Table.from_batches(list(read_range(info, IdRange(0, 4_999), batch_rows=100, window_rows=97)[1]))
    assert whole.num_rows == len({p["corpusid"] for p in papers})
    assert windowed.equals(whole)


def test_each_window_leaves_no_table_blocks_cached(tmp_path, monkeypatch):
    """DuckDB's buffer pool keeps the blocks a window read until its memory limit presses, so a long range's read
    grew with the range; after every window they are evicted (and the read's limit is back)."""
    from paper_assets.engine import source

    papers = [{"corpusid": i, "title": f"t{i}", "abstract": f"{i} " * 400} for i in range(4_000)]
    info = inspect_source(make_source(tmp_path / "s.duckdb", papers))
    cached_kb = "SELECT memory_usage_bytes // 1024 FROM duckdb_memory() WHERE tag = 'BASE_TABLE'"
    seen = []
    drop = source._drop_cached_blocks

    def drop_and_look(conn):
        before = conn.execute(cached_kb).fetchall()[0][0]
        drop(conn)
        seen.append((before, conn.execute(cached_kb).fetchall()[0][0],
                     conn.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]))

    monkeypatch.setattr(source, "_drop_cached_blocks", drop_and_look)
    batches = list(read_range(info, IdRange(0, 3_999), window_rows=1_000)[1])
    assert sum(b.num_rows for b in batches) == 4_000
    assert len(seen) >= 4  # one per window
    assert all(after <= 1024 < before for before, after, _ in seen), seen
    with duckdb.connect() as conn:
        conn.execute(f"SET memory_limit = '{source.RANGE_READ_MEMORY_LIMIT}'")
        expected_limit = conn.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
    assert {limit for _, _, limit in seen} == {expected_limit}
