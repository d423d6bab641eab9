"""``paper-assets bench --release-rows N``: what following a release costs at source scale.

On a synthetic source of N rows (ids spread to ~97·N like S2's, in the notebook's schema), once with BIGINT and
once with VARCHAR ids: the release sensor's tick on a current home and on a new release, the snapshot build, and
reading one 1M-id range from the snapshot against reading it from the raw database (the pre-snapshot path).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import duckdb

from ..engine.ranges import IdRange
from ..engine.snapshot import build_snapshot, current_snapshot
from ..engine.source import inspect_source, read_range

ID_STRIDE = 97


def synthetic_source(path: Path, rows: int, id_type: str) -> Path:
    if path.exists():
        return path
    tmp = path.with_suffix(".partial")
    tmp.unlink(missing_ok=True)
    id_sql = f"(i * {ID_STRIDE})::{'BIGINT' if id_type == 'BIGINT' else 'VARCHAR'}"
    with duckdb.connect(str(tmp)) as conn:
        conn.execute(f"""CREATE TABLE papers_with_abstracts AS
            SELECT {id_sql} AS corpusid, 'Title of paper ' || i AS title,
                   repeat(md5(i::VARCHAR) || ' ', 8) AS abstract,
                   DATE '2000-01-01' + (i % 9000)::INTEGER AS publication_date, (i % 113)::INTEGER AS citation_count
            FROM range({int(rows)}) t(i)""")
    tmp.rename(path)
    return path


def _timed(call, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _drain(reader) -> int:
    _, batches = reader
    return sum(batch.num_rows for batch in batches)


def run_release_bench(rows: int, work: Path) -> dict:
    from dagster import build_sensor_context, instance_for_test

    from ..defs.resources import ProjectHomeResource, S2SourceResource
    from ..defs.sensors import s2_source_release_sensor

    middle = rows * ID_STRIDE // 2 // 1_000_000 * 1_000_000
    rng = IdRange(middle, middle + 999_999)  # a 1M-id range in the middle of the ids
    result: dict = {"rows": rows, "range": rng.key}
    for id_type in ("BIGINT", "VARCHAR"):
        source = synthetic_source(work / f"release-{rows}-{id_type.lower()}.duckdb", rows, id_type)
        home = work / f"release-home-{rows}-{id_type.lower()}"
        info = inspect_source(source)
        started = time.perf_counter()
        manifest = build_snapshot([info], home / "source", info.version, 1_000_000)
        snapshot_seconds = time.perf_counter() - started
        snapshot = current_snapshot(home / "source")
        resources = {"source": S2SourceResource(path=str(source)), "home": ProjectHomeResource(root=str(home))}
        with instance_for_test() as instance:
            def tick(cursor=None, instance=instance, resources=resources):
                return s2_source_release_sensor(build_sensor_context(instance=instance, resources=resources,
                                                                     cursor=cursor))

            if tick().run_requests:
                raise RuntimeError("the release sensor requested a snapshot for a current home")
            tick_current = _timed(tick, 5)
            (home / "source" / "current.json").unlink()  # the same file now looks like a release not yet taken
            if len(tick().run_requests or []) != 1:
                raise RuntimeError("the release sensor did not request the new release")
            tick_new = _timed(tick, 5)
            (home / "source" / "current.json").write_text(f'{{"release": "{manifest.release}"}}')
        range_rows = _drain(snapshot.read(rng))
        result[id_type.lower()] = {
            "snapshot_seconds": snapshot_seconds,
            "sensor_tick_seconds_current_home": tick_current,
            "sensor_tick_seconds_new_release": tick_new,
            "range_rows": range_rows,
            "range_read_seconds_snapshot": _timed(lambda s=snapshot: _drain(s.read(rng))),
            "range_read_seconds_raw_db": _timed(lambda i=info: _drain(read_range(i, rng)), 1),
            "source_bytes": source.stat().st_size,
            "snapshot_bytes": snapshot.papers_file.stat().st_size,
        }
    result["varchar_over_integer_snapshot_read"] = (result["varchar"]["range_read_seconds_snapshot"]
                                                     / result["bigint"]["range_read_seconds_snapshot"])
    result["varchar_over_integer_raw_read"] = (result["varchar"]["range_read_seconds_raw_db"]
                                                / result["bigint"]["range_read_seconds_raw_db"])
    return result


def print_release_bench(result: dict) -> None:
    print(f"release bench: {result['rows']:,} rows, range {result['range']}")
    for kind in ("bigint", "varchar"):
        r = result[kind]
        print(f"  {kind:>7} ids: sensor tick {r['sensor_tick_seconds_current_home'] * 1e3:.1f} ms (current home), "
              f"{r['sensor_tick_seconds_new_release'] * 1e3:.1f} ms (new release); snapshot "
              f"{r['snapshot_seconds']:.1f} s; one range ({r['range_rows']:,} rows): snapshot "
              f"{r['range_read_seconds_snapshot'] * 1e3:.0f} ms, raw DB {r['range_read_seconds_raw_db'] * 1e3:.0f} ms")
    print(f"  VARCHAR / integer ids, one range: snapshot {result['varchar_over_integer_snapshot_read']:.2f}x, "
          f"raw DB {result['varchar_over_integer_raw_read']:.2f}x")
