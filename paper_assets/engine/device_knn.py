"""Exact k nearest earlier papers by blocked matrix products on the embedding device (torch: CUDA, or a CPU with
native bf16), so that novelty over millions of papers costs minutes instead of hours.

Each block of prior papers is rounded to bf16 once and multiplied with every block of queries (``PriorBlocks``
keeps rounded blocks for the next months, within a byte budget). Per query only its band is kept, block by block
(``knn_band``): the scores within 2·e(q) of its k-th best so far, or within e(q) of a floor under its k-th best
cosine where that is higher (``knn_seed``: the latest papers of its nearest centroid, scored first in fp32), so
memory is bounded by the block sizes, that budget and the band, not by N². The band is then rescored in fp32 and
the top k taken by (cosine, then position), as the fp32 search orders them.

Exactness is certified per query, not hoped for. Write q = q̂ + δq and p = p̂ + δp with q̂, p̂ the bf16 roundings;
the device computes q̂·p̂ with fp32 accumulation over d terms and rounds the result to bf16, so

    |q·p − score| ≤ |δq|·|p̂| + |q̂|·|δp| + |δq|·|δp| + d·2⁻²⁴·|q̂|·|p̂| + h  =: e(q)

with the norms measured on the actual vectors (largest over the priors) and h the largest bf16 rounding error of
a score: 2⁻⁹ below 1, 2⁻⁸ from 1 to 2. Let s be the k-th best score: k papers have fp32 cosines of at least
s − e, and a paper scored below s − 2e has a cosine below that, so it cannot be among the k best (up to exact
ties). A query is searched with h = 2⁻⁹ and its band capped at ``CANDIDATE_CAP``; where one of its scores
reached 1, or the cap dropped a score whose ceiling (score + e) reaches the k-th rescored cosine, it is searched
again with h = 2⁻⁸ and ``WIDER_CAP`` times the cap, then in fp32 with no cap. The neighbours equal an exact fp32
search up to exact ties and fp32 rounding (≈ 1e-7).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .knn_band import Band, above
from .knn_precision import JUDGED_FROM, LowPrecisionRecord
from .knn_seed import SeedFloors, fp32_rows

HALF_ULP_BELOW_ONE = 2.0**-9  # the largest bf16 rounding error of a score below 1 (2^-8 from 1 to 2)
QUERY_ROWS = 4096
PRIOR_ROWS = 32768
SLICE_COLUMNS = 2048  # a product's columns judged at once: 16 MB of bf16 scores for 4,096 queries, within the cache
GROUPS = 256  # similarity groups a full prior block's rows are ordered by
CANDIDATE_CAP = 2048  # band kept per query in the first pass
WIDER_CAP = 8  # times the cap in the second pass
ROUNDED_CACHE_BYTES = 1 << 30  # rounded prior blocks kept across months (the oldest ones, which every month reads)


@dataclass
class DeviceKnnStats:
    queries: int = 0
    certified: int = 0  # queries certified by a pass in the search's dtype
    searched_again_wider: int = 0  # queries searched again in that dtype with the wider bound and cap
    searched_again_in_fp32: int = 0
    searched_in_fp32_only: int = 0  # queries of calls that skipped bf16, which had not paid on these priors
    probed: int = 0  # queries of a sample that tried bf16 again before the call's queries did
    rescored: int = 0  # candidate cosines recomputed in fp32
    passed_threshold: int = 0  # scores the blocks' threshold passes kept for a merge
    seeded: int = 0  # query searches whose band started from a floor under their k-th best (``knn_seed``)
    seconds_rounding: float = 0.0  # prior and query blocks to the search's dtype, with their error norms
    seconds_seeding: float = 0.0  # the floors: cosines of centroid members (assigning a block counts as rounding)
    seconds_products: float = 0.0  # the query x prior block products
    seconds_selection: float = 0.0  # top-k and threshold passes over the scores, merging candidates
    seconds_rescoring: float = 0.0  # fp32 cosines of the candidates, certificates
    seconds_fp32_again: float = 0.0  # the fp32 search of queries whose certificate failed

    @contextmanager
    def timing(self, what: str, device: torch.device) -> Iterator[None]:
        started = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        name = f"seconds_{what}"
        setattr(self, name, getattr(self, name) + time.perf_counter() - started)


@dataclass
class _Rounded:
    """A block of unit vectors on the device in the search's dtype, with the norms its rounding error bound needs."""

    low: torch.Tensor
    norm_max: float  # largest |p̂|
    error_max: float  # largest |δp|
    order: torch.Tensor | None = None  # row i of ``low`` is row order[i] of the block (None: in order)


def _round(rows: np.ndarray, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, _Rounded]:
    full = fp32_rows(rows, device)
    low = full.to(dtype)
    if dtype == torch.float32:
        norm_max = float(full.norm(dim=1).max()) if len(full) else 0.0
        return full, _Rounded(low, norm_max, 0.0)
    back = low.float()
    return full, _Rounded(low, float(back.norm(dim=1).max()), float((back - full).norm(dim=1).max()))


def _grouped_order(low: torch.Tensor) -> torch.Tensor:
    """The block's rows ordered by their nearest of ``GROUPS`` evenly spaced rows of the block: similar papers end
    up in the same runs of columns, so a query's band, its near neighbours, falls into few runs and the threshold
    pass (``knn_band.above``) compares far fewer of them element by element."""
    seeds = low[torch.linspace(0, len(low) - 1, GROUPS, device=low.device).long()]
    return torch.argsort(torch.argmax(low @ seeds.T, dim=1), stable=True)


class PriorBlocks:
    """The prior papers as the search reads them: blocks of ``PRIOR_ROWS`` rounded to the search's dtype with their
    error norms. Months in date order read the same leading blocks again, so full blocks are kept rounded up to
    ``budget`` bytes (the oldest first, as every later month reads them) and the norms of every full block are
    kept; the block that ends at a month's boundary is rounded once per call."""

    def __init__(self, priors: np.ndarray, dtype: torch.dtype, device: torch.device,
                 budget: int = ROUNDED_CACHE_BYTES):
        self.priors, self.dtype, self.device = priors, dtype, device
        self.budget = budget if dtype != torch.float32 else 0  # an fp32 copy would only duplicate the vectors
        self.kept_bytes = 0
        self._blocks: dict[int, _Rounded] = {}
        self._norms: dict[int, tuple[float, float]] = {}
        self._last: tuple[int, int, _Rounded] | None = None  # the last partial block
        self._orders: dict[int, torch.Tensor] = {}  # full blocks' rows grouped by similarity
        self.seeds = SeedFloors(priors) if dtype != torch.float32 else None  # floors under the k-th best
        # Reused for every block rounded again and every product: a fresh buffer of tens of MB costs the CPU a page
        # fault per 4 KiB each time, as much as the rounding itself.
        self._again: tuple[torch.Tensor, torch.Tensor] | None = None
        self._scores: torch.Tensor | None = None
        self.low_precision = LowPrecisionRecord()
        self._fp32: PriorBlocks | None = None

    def fp32(self) -> PriorBlocks:
        """The same priors in fp32 (their orders and norms kept across calls), for queries bf16 cannot certify."""
        if self.dtype == torch.float32:
            return self
        if self._fp32 is None:
            self._fp32 = PriorBlocks(self.priors, torch.float32, self.device)
        return self._fp32

    def block(self, start: int, stop: int) -> _Rounded:
        full = stop - start == PRIOR_ROWS
        if full and start in self._blocks:
            return self._blocks[start]
        if not full and self._last is not None and self._last[:2] == (start, stop):
            return self._last[2]
        if full and start in self._norms:  # rounded before and not kept (nothing is kept once the budget is full)
            return self._rounded_again(start, stop)
        _, rounded = _round(self.priors[start:stop], self.dtype, self.device)
        if not full:
            self._last = (start, stop, rounded)
            return rounded
        if start not in self._orders:
            self._orders[start] = _grouped_order(rounded.low)
            if self.seeds is not None:
                self.seeds.assign(start, rounded.low)
        rounded.order = self._orders[start]
        rounded.low = rounded.low.index_select(0, rounded.order)
        self._norms[start] = (rounded.norm_max, rounded.error_max)
        size = rounded.low.numel() * rounded.low.element_size()
        if self.kept_bytes + size <= self.budget:
            self._blocks[start] = rounded
            self.kept_bytes += size
        return rounded

    def _rounded_again(self, start: int, stop: int) -> _Rounded:
        """A full block rounded into the reused buffers: valid until the next block is rounded again."""
        rows = fp32_rows(self.priors[start:stop], self.device)
        if self._again is None:
            self._again = (torch.empty(rows.shape, dtype=self.dtype, device=self.device),
                           torch.empty(rows.shape, dtype=self.dtype, device=self.device))
        staged, ordered = self._again
        if rows.dtype != self.dtype:  # an fp32 search reorders the rows as they are
            rows = staged.copy_(rows)
        order = self._orders[start]
        return _Rounded(torch.index_select(rows, 0, order, out=ordered), *self._norms[start], order=order)

    def scores(self, rows: int, columns: int) -> torch.Tensor:
        """A rows x columns buffer for a product's scores (in the search's dtype), reused by every product."""
        if self._scores is None or self._scores.numel() < rows * columns:
            self._scores = torch.empty(rows * columns, dtype=self.dtype, device=self.device)
        return self._scores[:rows * columns].view(rows, columns)

    def norms(self, end: int) -> tuple[float, float]:
        """The largest |p̂| and |δp| over ``[0, end)``: rounds only the blocks whose norms are not known yet."""
        norm_max = error_max = 0.0
        for start in range(0, end, PRIOR_ROWS):
            stop = min(end, start + PRIOR_ROWS)
            known = self._norms.get(start) if stop - start == PRIOR_ROWS else None
            if known is None:
                rounded = self.block(start, stop)
                known = (rounded.norm_max, rounded.error_max)
            norm_max, error_max = max(norm_max, known[0]), max(error_max, known[1])
        return norm_max, error_max


def _candidates(chunks: list[torch.Tensor], bands: list[Band], blocks: PriorBlocks, end: int,
                stats: DeviceKnnStats) -> None:
    """Streams the prior blocks into each query chunk's band. Each prior block is rounded once for all chunks."""
    device = blocks.device
    for start in range(0, end, PRIOR_ROWS):
        with stats.timing("rounding", device):
            block = blocks.block(start, min(end, start + PRIOR_ROWS))
        width = len(block.low)
        for chunk, band in zip(chunks, bands, strict=True):
            # One buffer for every product: a fresh 256 MB result each time costs the CPU its page faults, as
            # much as the bf16 product itself on AMX.
            limit = None if width % SLICE_COLUMNS else band.limit(blocks.dtype)
            if limit is None:  # a partial block, or the first: its own k-th best starts the band (``Band.take``)
                scores = blocks.scores(len(chunk), width)
                with stats.timing("products", device):
                    torch.matmul(chunk, block.low.T, out=scores)
                with stats.timing("selection", device):
                    band.take(scores, start, block.order)
                continue
            # In column slices into the buffer's first 16 MB, each judged while it is still in the cache: neither
            # the products nor the threshold passes write or read memory beyond it.
            scores, found = blocks.scores(len(chunk), SLICE_COLUMNS), []
            for offset in range(0, width, SLICE_COLUMNS):
                with stats.timing("products", device):
                    torch.matmul(chunk, block.low[offset:offset + SLICE_COLUMNS].T, out=scores)
                with stats.timing("selection", device):
                    rows, cols, val = above(scores, limit)
                    found.append((rows, cols + offset, val))
            with stats.timing("selection", device):  # one merge decision per block, as for a block taken whole
                band.add(*(torch.cat(part) for part in zip(*found, strict=True)), start, block.order)
    with stats.timing("selection", device):
        for band in bands:
            band.flush()


def _rescore(queries: torch.Tensor, priors: np.ndarray, positions: torch.Tensor, widths: torch.Tensor, k: int
             ) -> tuple[np.ndarray, np.ndarray, int]:
    """fp32 cosines of each query's first ``widths[i]`` candidates (the others cannot be among its k best), as a
    sampled matrix product on the CPU (no gathered copy of the candidates' vectors); the top k per query ordered by
    (cosine descending, position ascending), and how many cosines were computed."""
    pos, widths, query_rows = positions.cpu(), widths.cpu(), queries.cpu()
    n, keep = pos.shape
    first = torch.arange(keep)[None, :] < widths[:, None]
    # Each row's band in ascending position (the order CSR wants and the tie order): the rest pushed past the end.
    by_pos = torch.where(first, pos, torch.iinfo(torch.int64).max).sort(dim=1).values
    cols = by_pos[first]
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(widths, 0)])
    end = int(cols.max()) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only memory map and CSR's beta notice: nothing here writes to it
        prior_rows = torch.from_numpy(np.asarray(priors[:end], dtype=np.float32))
        pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(len(cols)), size=(n, end))
        sampled = torch.sparse.sampled_addmm(pattern, query_rows, prior_rows.T, beta=0.0)
    sims = torch.full((n, keep), -torch.inf)
    sims[first] = sampled.values()
    top, order = torch.sort(sims, dim=1, descending=True, stable=True)
    found = torch.gather(by_pos, 1, order[:, :k]).numpy()
    return found, top[:, :k].contiguous().numpy(), len(cols)


@contextmanager
def _full_precision_accumulation(device: torch.device) -> Iterator[None]:
    """cuBLAS may reduce bf16 products in bf16 (split-K) unless told not to; the error bound assumes fp32 sums."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    before = flags.allow_bf16_reduced_precision_reduction
    flags.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        flags.allow_bf16_reduced_precision_reduction = before


def _certified_pass(queries: np.ndarray, priors: np.ndarray, end: int, k: int, blocks: PriorBlocks, cap: int,
                    half_ulp: float, stats: DeviceKnnStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass over the priors: the k best positions and fp32 cosines, and the rows whose certificate failed (a
    score reached 1 while ``half_ulp`` assumed less, or the cap dropped a score that could still be among the k)."""
    device, low_precision = blocks.device, blocks.dtype != torch.float32
    with stats.timing("rounding", device):
        rounded = [_round(queries[start:start + QUERY_ROWS], blocks.dtype, device)
                   for start in range(0, len(queries), QUERY_ROWS)]
        norm_max, error_max = blocks.norms(end)
    accumulation = queries.shape[1] * 2.0**-24
    bounds = []
    for full, query in rounded:
        q_norm = query.low.float().norm(dim=1)
        q_error = (query.low.float() - full).norm(dim=1) if low_precision else torch.zeros_like(q_norm)
        bounds.append(q_error * norm_max + q_norm * error_max + q_error * error_max
                      + accumulation * q_norm * norm_max + (half_ulp if low_precision else 0.0))
    floors: list[torch.Tensor | None] = [None] * len(rounded)
    if blocks.seeds is not None:  # one call for every chunk: each centroid's members are gathered once
        with stats.timing("seeding", device):
            every_floor = blocks.seeds.floors(torch.cat([full.cpu() for full, _ in rounded]), end, k)
            floors = [part.to(device) for part in torch.split(every_floor, [len(full) for full, _ in rounded])]
        stats.seeded += int((every_floor > -torch.inf).sum())
    bands = [Band(error=bound, k=k, cap=cap, floor=floor) for bound, floor in zip(bounds, floors, strict=True)]
    with _full_precision_accumulation(device):
        _candidates([r.low for _, r in rounded], bands, blocks, end, stats)
    positions, cosines, doubtful = [], [], []
    for i, ((full, _), band, bound) in enumerate(zip(rounded, bands, bounds, strict=True)):
        with stats.timing("rescoring", device):
            val, pos, widths = band.padded()
            found, cos, rescored = _rescore(full, priors, pos, widths, k)
            failed = torch.zeros(len(full), dtype=torch.bool)
            if low_precision and half_ulp == HALF_ULP_BELOW_ONE:  # the pass that assumed scores below 1
                failed |= (val[:, 0] >= 1).cpu()
            # the best a paper the cap dropped can be, in fp32
            failed |= torch.from_numpy(cos[:, -1]) <= (band.dropped + bound).cpu()
            doubtful.append(i * QUERY_ROWS + np.flatnonzero(failed.numpy()))
        stats.rescored += rescored
        stats.passed_threshold += band.taken
        positions.append(found)
        cosines.append(cos)
    return np.concatenate(positions), np.concatenate(cosines), np.concatenate(doubtful)


def device_knn(queries: np.ndarray, priors: np.ndarray, end: int, k: int, device: torch.device,
               low_precision: bool = True, stats: DeviceKnnStats | None = None, blocks: PriorBlocks | None = None,
               cap: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Positions (-1 where fewer than k priors) and fp32 cosines of the k most similar rows of ``priors[:end]`` (unit
    vectors) for each query, best first. ``blocks``: the priors' rounded blocks kept from earlier calls (a
    ``PriorBlocks`` over the same ``priors``, dtype and device). ``cap``: the band kept per query in the first
    pass (default ``CANDIDATE_CAP``)."""
    n = len(queries)
    positions = np.full((n, k), -1, dtype=np.int64)
    cosines = np.zeros((n, k), dtype=np.float32)
    k_eff = min(k, end)
    if n == 0 or k_eff == 0:
        return positions, cosines
    dtype = search_dtype(low_precision)
    if blocks is None:
        blocks = PriorBlocks(priors, dtype, device, budget=0)
    elif blocks.priors is not priors or blocks.dtype != dtype or blocks.device != device:
        raise ValueError("the prior blocks were rounded from other vectors, or for another dtype or device")
    stats = stats if stats is not None else DeviceKnnStats()
    cap = max(k_eff, CANDIDATE_CAP if cap is None else cap)
    pending = np.arange(n)
    passes = ((cap, HALF_ULP_BELOW_ONE), (WIDER_CAP * cap, 2 * HALF_ULP_BELOW_ONE))
    fp32_only = low_precision and (blocks.low_precision.skip() or not _sample_pays(
        queries, priors, end, k_eff, blocks, cap, stats))
    for attempt, (pass_cap, half_ulp) in enumerate(() if fp32_only else passes):
        if attempt:
            stats.searched_again_wider += len(pending)
        rows = queries if len(pending) == n else np.asarray(queries[pending])
        found, cos, failed = _certified_pass(rows, priors, end, k_eff, blocks, pass_cap, half_ulp, stats)
        positions[pending, :k_eff], cosines[pending, :k_eff] = found, cos
        give_up = False
        if not attempt and low_precision and len(rows) >= JUDGED_FROM:
            give_up = blocks.low_precision.record(len(failed) / len(rows))
        pending = pending[failed]
        if not len(pending) or give_up:
            break
    if len(pending):  # one fp32 pass over the priors, with no cap, for every query still uncertified
        with stats.timing("fp32_again", device):
            rows = np.array(queries[pending], dtype=np.float32)
            found, cos, _ = _certified_pass(rows, priors, end, k_eff, blocks.fp32(), end, 0.0, DeviceKnnStats())
            positions[pending, :k_eff], cosines[pending, :k_eff] = found, cos
    stats.queries += n
    if fp32_only:
        stats.searched_in_fp32_only += n
    else:
        stats.searched_again_in_fp32 += len(pending)
        stats.certified += n - len(pending)
    return positions, cosines


def _sample_pays(queries: np.ndarray, priors: np.ndarray, end: int, k: int, blocks: PriorBlocks, cap: int,
                 stats: DeviceKnnStats) -> bool:
    """After bf16 gave up on these priors: whether a first pass over ``JUDGED_FROM`` of the queries, evenly spaced,
    certifies enough of them for the call to search in bf16 (a call that small is its own sample)."""
    if not blocks.low_precision.on_trial or len(queries) <= JUDGED_FROM:
        return True
    sample = np.linspace(0, len(queries) - 1, JUDGED_FROM).round().astype(np.int64)
    _, _, failed = _certified_pass(np.asarray(queries[sample]), priors, end, k, blocks, cap, HALF_ULP_BELOW_ONE,
                                   stats)
    stats.probed += JUDGED_FROM
    return not blocks.low_precision.record(len(failed) / JUDGED_FROM)


def search_dtype(low_precision: bool) -> torch.dtype:
    return torch.bfloat16 if low_precision else torch.float32


def knn_device() -> tuple[torch.device, bool]:
    """Where the search runs and whether in bf16: a CUDA GPU (bf16), else the CPU (bf16 where it has native bf16
    instructions, AMX or AVX512-BF16; fp32 otherwise, which FAISS's exact search does as fast)."""
    from .device import cpu_has_native_bf16

    if torch.cuda.is_available():
        return torch.device("cuda"), True
    return torch.device("cpu"), cpu_has_native_bf16()


def device_search_pays() -> bool:
    """Whether ``auto`` takes the device search: on a GPU, or a CPU that multiplies bf16 natively (AMX or
    AVX512-BF16: there bf16 products run at 2x (AVX512-BF16) to 15x (AMX) FAISS's fp32 rate; BENCHMARKS.md). On
    other CPUs the device search would run in fp32, which FAISS's exact search does as fast."""
    return knn_device()[1]
