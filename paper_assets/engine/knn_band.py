"""What a block of queries keeps while the device search (``device_knn``) streams over the prior blocks: per
query its band, the scores that can still belong to one of its k nearest papers, and the best score its cap dropped.
A score s is within e(q) of the paper's fp32 cosine, so the band keeps the scores at or above the higher of its k-th
best so far less 2·e(q) (k papers have cosines of at least that k-th best less e) and a floor under its k-th best
cosine less e(q) (``knn_seed``).

The k best so far are a small sorted table; the rest of the band is kept flat (query, score, prior position) and
unordered, not padded to the widest query: a few queries with thousands of near-ties would otherwise make every
merge sort thousands of columns for all of them. Blocks' scores are gathered and merged in batches; between
merges the threshold stays that of the last merge, which is lower, so nothing is lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GROUP_COLUMNS = 128
DIRECT_SHARE = 0.35  # above this share of runs passing their maximum, every score is compared directly
MERGE_PER_QUERY = 64  # candidates gathered per query (on average) before a merge: a fresher threshold pays


@dataclass
class Band:
    error: torch.Tensor  # e(q) per query: how far a score may be from its fp32 cosine
    k: int
    cap: int  # scores kept per query; the best one dropped beyond it is remembered
    floor: torch.Tensor | None = None  # a lower bound on each query's k-th best fp32 cosine (``knn_seed``)
    top_val: torch.Tensor | None = None  # the k best so far (fp32, best first, padded with -inf), and positions
    top_pos: torch.Tensor | None = None
    rest: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # the rest of the band, flat, unordered
    dropped: torch.Tensor = field(init=False)
    pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    pending_count: int = 0
    taken: int = 0  # scores that passed a block's threshold pass

    def __post_init__(self):
        self.dropped = torch.full_like(self.error, -torch.inf)

    def kth(self) -> torch.Tensor:
        """The k-th best score so far per query (-inf below k)."""
        if self.top_val is None or self.top_val.shape[1] < self.k:
            return torch.full_like(self.error, -torch.inf)
        return self.top_val[:, self.k - 1]

    def threshold(self, kth: torch.Tensor | None = None) -> torch.Tensor:
        """The lowest score still in the band: the k-th best so far (or ``kth``) less 2·e(q), raised to the floor
        less e(q)."""
        running = (self.kth() if kth is None else kth) - 2 * self.error
        return running if self.floor is None else torch.maximum(running, self.floor - self.error)

    def limit(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The threshold rounded down to the scores' dtype (``_round_down``), or None before the first block: its
        own k-th best raises the threshold then (``take``)."""
        if self.top_val is None and not self.pending:
            return None
        return _round_down(self.threshold().float(), dtype)

    def take(self, scores: torch.Tensor, start: int, order: torch.Tensor | None = None) -> None:
        """A prior block's scores into the band: column j is prior position start + order[j] (start + j without
        an order)."""
        limit = self.limit(scores.dtype)
        if limit is None:  # its own k-th best starts it
            kth = torch.topk(scores, self.k, dim=1).values[:, -1].float() if scores.shape[1] > self.k else None
            limit = _round_down(self.threshold(kth).float(), scores.dtype)
        self.add(*above(scores, limit), start, order)

    def add(self, rows: torch.Tensor, cols: torch.Tensor, val: torch.Tensor, start: int,
            order: torch.Tensor | None = None) -> None:
        """Scores of a prior block that passed this band's limit (``above``): column j is prior position
        start + order[j] (start + j without an order)."""
        self.pending.append((rows, val, (cols if order is None else order.index_select(0, cols)) + start))
        self.pending_count += len(rows)
        self.taken += len(rows)
        if self.top_val is None or self.pending_count >= MERGE_PER_QUERY * len(self.error):
            self.flush()

    def flush(self) -> None:
        """Merges the pending scores: those above the k-th best compete for the top k (a top-k over few columns),
        the others and the displaced join the rest, and the rest keeps what is within the new threshold."""
        if not self.pending:
            return
        rows, val, pos = (torch.cat([part[i] for part in self.pending]) for i in range(3))
        self.pending, self.pending_count = [], 0
        better = val > self.kth().index_select(0, rows)
        contest_val, contest_pos = _padded(rows[better], val[better], pos[better], len(self.error))
        if self.top_val is not None:
            contest_val = torch.cat([self.top_val, contest_val], dim=1)
            contest_pos = torch.cat([self.top_pos, contest_pos], dim=1)
        self.top_val, order = torch.topk(contest_val, min(self.k, contest_val.shape[1]), dim=1)
        self.top_pos = torch.gather(contest_pos, 1, order)
        out = torch.ones_like(contest_val, dtype=torch.bool).scatter_(1, order, False) & (contest_val > -torch.inf)
        out_rows = torch.nonzero(out, as_tuple=True)[0]
        parts = [(rows[~better], val[~better], pos[~better]), (out_rows, contest_val[out], contest_pos[out])]
        if self.rest is not None:
            parts.append(self.rest)
        rows, val, pos = (torch.cat([part[i] for part in parts]) for i in range(3))
        keep = val >= self.threshold().index_select(0, rows)
        self.rest = rows[keep], val[keep], pos[keep]
        self._cap()

    def _cap(self) -> None:
        rows, val, pos = self.rest
        room = max(self.cap - self.k, 0)
        counts = torch.bincount(rows, minlength=len(self.error))
        if not len(rows) or int(counts.max()) <= room:
            return
        order = torch.argsort(rows.double() * 8 - val.double())  # by query, then best first (|val| < 4)
        rows, val, pos = rows[order], val[order], pos[order]
        rank = torch.arange(len(rows), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
        over = rank >= room
        self.dropped = self.dropped.scatter_reduce(0, rows[over], val[over], reduce="amax")
        self.rest = rows[~over], val[~over], pos[~over]

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The band's scores (the best first, -inf past each query's band) and positions, padded to the widest
        band, and the widths."""
        self.flush()
        rest_val, rest_pos = _padded(*self.rest, len(self.error))
        val = torch.cat([self.top_val, rest_val], dim=1)
        pos = torch.cat([self.top_pos, rest_pos], dim=1)
        valid = val > -torch.inf
        widths = valid.sum(dim=1)
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # each row's scores first, in order
        return torch.gather(val, 1, order), torch.gather(pos, 1, order), widths


def _padded(rows: torch.Tensor, val: torch.Tensor, pos: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (row, score, position) entries as an n × (most per row) table, padded with -inf (position 0)."""
    counts = torch.bincount(rows, minlength=n)
    width = int(counts.max()) if len(rows) else 0
    order = torch.argsort(rows, stable=True)
    rows, val, pos = rows[order], val[order], pos[order]
    rank = torch.arange(len(rows), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    table_val = torch.full((n, width), -torch.inf, device=val.device)
    table_pos = torch.zeros((n, width), dtype=torch.int64, device=pos.device)
    table_val[rows, rank] = val
    table_pos[rows, rank] = pos
    return table_val, table_pos


def _round_down(threshold: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest value of ``dtype`` at most ``threshold`` (fp32), so comparing in ``dtype`` keeps every score at
    or above the threshold (and perhaps a few just below it)."""
    if dtype == torch.float32:
        return threshold
    low = threshold.to(dtype)
    over = low.float() > threshold
    if over.any():
        bits = low.view(torch.int16)
        step = torch.where(low > 0, -1, 1).to(torch.int16)  # one step towards -inf, by the bit pattern
        low = torch.where(over, bits + step, bits).view(dtype)
        low = torch.where(low.float() > threshold, torch.tensor(-torch.inf, dtype=dtype), low)
    return low


def run_maxima(scores: torch.Tensor) -> torch.Tensor:
    """The maximum of each run of ``GROUP_COLUMNS`` adjacent columns of an n × width block (width a multiple of
    ``GROUP_COLUMNS``). bf16 scores are compared by their bit patterns as int16, whose maximum the CPU takes 3-4x
    faster; ``runs_passing`` reads them."""
    runs = scores.unflatten(1, (-1, GROUP_COLUMNS))
    return runs.view(torch.int16).amax(dim=2) if runs.dtype == torch.bfloat16 else runs.amax(dim=2)


def runs_passing(maxima: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Which runs hold a score at or above their row's limit (in the scores' dtype), from ``run_maxima``. For a
    limit of +0 or more the int16 order of bf16 bit patterns is the float order of every score that can reach it (a
    negative score's int16 is negative); rows with a negative limit pass every run, so their scores are compared
    one by one."""
    if maxima.dtype != torch.int16:
        return maxima >= limit[:, None]
    limit_bits = limit.view(torch.int16)
    return maxima >= torch.where(limit_bits < 0, torch.iinfo(torch.int16).min, limit_bits)[:, None]


def above(scores: torch.Tensor, limit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scores at or above each row's limit (in the scores' dtype, ``_round_down``), flat: rows (ascending),
    columns and values (fp32), from a contiguous n × width block. Once a few blocks are merged few scores qualify:
    the maximum of each run of ``GROUP_COLUMNS`` adjacent columns rules most runs out in one cheap pass, and only
    the runs left are compared element by element; where most runs pass, every score is compared at once."""
    n, width = scores.shape
    grouped = width - width % GROUP_COLUMNS
    passing = runs_passing(run_maxima(scores[:, :grouped]), limit)
    run_rows, run_index = torch.nonzero(passing, as_tuple=True)
    if len(run_rows) > DIRECT_SHARE * passing.numel():
        rows, cols = torch.nonzero(scores >= limit[:, None], as_tuple=True)
        return rows, cols, scores.reshape(-1).index_select(0, rows * width + cols).float()
    if grouped == width:  # whole runs copied by row (index_select), far faster than indexing by (row, run) pairs
        gathered = scores.view(-1, GROUP_COLUMNS).index_select(0, run_rows * (width // GROUP_COLUMNS) + run_index)
    else:
        gathered = scores[:, :grouped].unflatten(1, (-1, GROUP_COLUMNS))[run_rows, run_index]
    hit, offset = torch.nonzero(gathered >= limit.index_select(0, run_rows)[:, None], as_tuple=True)
    rows, cols = run_rows.index_select(0, hit), run_index.index_select(0, hit) * GROUP_COLUMNS + offset
    val = gathered[hit, offset]
    if grouped < width:  # the columns after the last whole run, compared one by one
        tail_rows, tail_cols = torch.nonzero(scores[:, grouped:] >= limit[:, None], as_tuple=True)
        order = torch.argsort(torch.cat([rows, tail_rows]), stable=True)  # rows ascending, as nonzero lists them
        rows, cols = torch.cat([rows, tail_rows])[order], torch.cat([cols, tail_cols + grouped])[order]
        val = torch.cat([val, scores[tail_rows, tail_cols + grouped]])[order]
    return rows, cols, val.float()
