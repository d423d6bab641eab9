"""`paper-assets similar` and `paper-assets novelty`: questions answered from `paper_index` and `paper_novelty`."""

from __future__ import annotations

import json

from ..engine.home import ProjectHome
from ..settings import Settings, load_settings
from .common import CommandError


def register(sub) -> None:
    similar = sub.add_parser("similar", help="the papers nearest to one paper in paper_index (cosine of the vectors)")
    similar.add_argument("corpusid", type=int, help="the paper's Semantic Scholar corpus id")
    similar.add_argument("-k", type=int, default=10, help="neighbours (default %(default)s)")
    similar.add_argument("--before", help="only papers published before this date (YYYY-MM-DD)")
    similar.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    similar.set_defaults(func=run_similar)

    novelty = sub.add_parser("novelty", help="a paper's novelty metrics (paper_novelty of its publication month)")
    novelty.add_argument("corpusid", type=int, help="the paper's Semantic Scholar corpus id")
    novelty.add_argument("--json", action="store_true", help="one JSON object")
    novelty.set_defaults(func=run_novelty)


def _current_index(settings: Settings):
    from ..engine.paper_index import current_index

    layout = ProjectHome(settings.home)
    index = current_index(layout.index_dir, layout.index_cache)
    if index is None:
        raise CommandError(f"no paper_index in {layout.root} yet: materialise it (`paper-assets update`, the demo, or "
                           "paper_index in the UI)")
    return layout, index


def _paper_details(layout: ProjectHome, ids: list[int]) -> dict[int, tuple[str | None, str | None]]:
    """corpusid -> (title, publication date) from the current source snapshot."""
    import duckdb

    from ..engine.snapshot import current_snapshot

    snapshot = current_snapshot(layout.source_dir)
    if snapshot is None or not ids:
        return {}
    with duckdb.connect() as conn:
        layout.register_filesystem(conn)
        rows = conn.execute(
            "SELECT corpusid, title, CAST(publication_date AS VARCHAR) FROM read_parquet(?) "
            "WHERE corpusid IN (SELECT unnest(?::BIGINT[]))", [str(snapshot.papers_file), ids]).fetchall()
    return {int(corpusid): (title, date) for corpusid, title, date in rows}


def _parse_day(text: str) -> int:
    import datetime

    try:
        return (datetime.date.fromisoformat(text) - datetime.date(1970, 1, 1)).days
    except ValueError:
        raise CommandError(f"--before {text!r} is not a date (YYYY-MM-DD)") from None


def run_similar(args) -> int:
    from ..engine.paper_index import similar_papers

    layout, index = _current_index(load_settings())
    before = _parse_day(args.before) if args.before else None
    pairs = similar_papers(index, args.corpusid, k=args.k, before_day=before)
    found = [(int(index.ids[p]), score) for p, score in pairs]
    details = _paper_details(layout, [args.corpusid] + [corpusid for corpusid, _ in found])
    neighbours = []
    for corpusid, score in found:
        title, date = details.get(corpusid, (None, None))
        neighbours.append({"corpusid": corpusid, "score": round(score, 6), "title": title, "publication_date": date})
    title, date = details.get(args.corpusid, (None, None))
    if args.json:
        print(json.dumps({"corpusid": args.corpusid, "title": title, "publication_date": date,
                          "before": args.before, "index_build": index.manifest.build, "neighbors": neighbours}))
        return 0
    print(f"{args.corpusid} ({date or 'no date'}): {title}")
    for rank, item in enumerate(neighbours, start=1):
        print(f"{rank:>3}. {item['score']:.4f}  {item['corpusid']:>12}  {item['publication_date'] or '':10}  "
              f"{item['title']}")
    return 0


def run_novelty(args) -> int:
    import duckdb

    from ..engine.novelty import METRICS

    layout, index = _current_index(load_settings())
    position = index.position_of(args.corpusid)
    if position is None:
        raise CommandError(f"corpusid {args.corpusid} is not in paper_index (build {index.manifest.build}): it is not "
                           "embedded, or its range was not indexed yet")
    if position >= index.manifest.dated:
        raise CommandError(f"corpusid {args.corpusid} has no publication date in the source: it has no novelty")
    month = str(index.days[position].astype("datetime64[D]").astype("datetime64[M]"))
    path = layout.novelty_file(month)
    if not path.exists():
        raise CommandError(f"paper_novelty[{month}] is not materialised yet (corpusid {args.corpusid} was published "
                           f"in {month})")
    with duckdb.connect() as conn:
        layout.register_filesystem(conn)
        row = conn.execute(f"SELECT CAST(publication_date AS VARCHAR), neighbors, {', '.join(METRICS)} "
                           "FROM read_parquet(?) WHERE corpus_id = ?", [str(path), args.corpusid]).fetchall()
    if not row:
        raise CommandError(f"paper_novelty[{month}] was computed before corpusid {args.corpusid} was indexed: "
                           "rematerialise that month")
    date, neighbours, *values = row[0]
    record = {"corpus_id": args.corpusid, "month": month, "publication_date": date, "neighbors": neighbours,
              **{name: round(float(value), 6) for name, value in zip(METRICS, values, strict=True)}}
    if args.json:
        print(json.dumps(record))
    else:
        for key, value in record.items():
            print(f"{key:>17}: {value}")
    return 0
