"""Exact k nearest earlier papers by blocked matrix products on the embedding device (torch: CUDA, or a CPU with
native bf16), so that novelty over millions of papers costs minutes instead of hours.

Each block of prior papers is rounded to bf16 once and multiplied with every block of queries (``PriorBlocks``
keeps rounded blocks for the next months, within a byte budget): the top ``k + margin`` per query are kept, merged
block by block, so memory is bounded by the block sizes and that budget, not by N². The candidates are then
rescored in fp32 and the top k taken by (cosine, then position), as the fp32 search orders them.

Exactness is certified per query, not hoped for. Write q = q̂ + δq and p = p̂ + δp with q̂, p̂ the bf16 roundings;
the device computes q̂·p̂ with fp32 accumulation and rounds the result to bf16, so

    |q·p − score| ≤ |δq|·|p̂| + |q̂|·|δp| + |δq|·|δp| + (2⁻⁹ + 768·2⁻²⁴)·|q̂|·|p̂|  =: e(q)

with the norms measured on the actual vectors (largest over the priors). A paper outside the candidates scored
at most the last candidate's score s, so its fp32 cosine is at most s + e(q). Where the k-th rescored cosine is
above that ceiling the query's neighbours are certified; otherwise it is searched again with ``WIDEN`` times the
candidates (one more pass over the priors for the few such queries, in the same dtype), and past ``WIDEST_KEEP``
candidates in fp32 over every prior paper. Only candidates whose score reaches the k-th score − 2·e(q) can be
among the k best, so only those are rescored. The neighbours equal an exact fp32 search up to exact ties and fp32
rounding (≈ 1e-7).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

OUTPUT_ROUNDING = 2.0**-9 + 768 * 2.0**-24  # bf16 rounding of the result plus fp32 accumulation over 768 terms
QUERY_ROWS = 4096
PRIOR_ROWS = 32768
GROUP_COLUMNS = 128
WIDEN = 3  # a query whose certificate fails is searched again with this many times the candidates
WIDEST_KEEP = 4096  # candidates per query beyond which an uncertified query is searched in fp32
ROUNDED_CACHE_BYTES = 1 << 30  # rounded prior blocks kept across months (the oldest ones, which every month reads)


@dataclass
class DeviceKnnStats:
    queries: int = 0
    certified: int = 0
    searched_again_wider: int = 0  # queries searched again in the search's dtype with more candidates
    searched_again_in_fp32: int = 0
    rescored: int = 0  # candidate cosines recomputed in fp32
    seconds_rounding: float = 0.0  # prior and query blocks to the search's dtype, with their error norms
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


def _fp32_rows(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the index's vectors are a read-only memory map; nothing here writes to it
        return torch.from_numpy(np.asarray(rows, dtype=np.float32)).to(device)


def _round(rows: np.ndarray, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, _Rounded]:
    full = _fp32_rows(rows, device)
    low = full.to(dtype)
    if dtype == torch.float32:
        norm_max = float(full.norm(dim=1).max()) if len(full) else 0.0
        return full, _Rounded(low, norm_max, 0.0)
    back = low.float()
    return full, _Rounded(low, float(back.norm(dim=1).max()), float((back - full).norm(dim=1).max()))


class PriorBlocks:
    """The prior papers as the search reads them: blocks of ``PRIOR_ROWS`` rounded to the search's dtype with their
    error norms. Months in date order read the same leading blocks again, so full blocks are kept rounded up to
    ``budget`` bytes (the oldest first, as every later month reads them) and the norms of every full block are
    kept; the block that ends at a month's boundary is rounded for each call."""

    def __init__(self, priors: np.ndarray, dtype: torch.dtype, device: torch.device,
                 budget: int = ROUNDED_CACHE_BYTES):
        self.priors, self.dtype, self.device = priors, dtype, device
        self.budget = budget if dtype != torch.float32 else 0  # an fp32 copy would only duplicate the vectors
        self.kept_bytes = 0
        self._blocks: dict[int, _Rounded] = {}
        self._norms: dict[int, tuple[float, float]] = {}

    def block(self, start: int, stop: int) -> _Rounded:
        full = stop - start == PRIOR_ROWS
        if full and start in self._blocks:
            return self._blocks[start]
        if full and start in self._norms:
            rounded = _Rounded(_fp32_rows(self.priors[start:stop], self.device).to(self.dtype), *self._norms[start])
        else:
            _, rounded = _round(self.priors[start:stop], self.dtype, self.device)
        if full:
            self._norms[start] = (rounded.norm_max, rounded.error_max)
            size = rounded.low.numel() * rounded.low.element_size()
            if self.kept_bytes + size <= self.budget:
                self._blocks[start] = rounded
                self.kept_bytes += size
        return rounded


def _topk_merge(best_val: torch.Tensor | None, best_pos: torch.Tensor | None, val: torch.Tensor, pos: torch.Tensor,
                keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``keep`` of both, best first (merged values always come out sorted, also when fewer than ``keep``)."""
    if best_val is not None:
        val, pos = torch.cat([best_val, val], dim=1), torch.cat([best_pos, pos], dim=1)
    if val.shape[1] > keep or best_val is not None:
        val, index = torch.topk(val, min(keep, val.shape[1]), dim=1)
        pos = torch.gather(pos, 1, index)
    return val, pos


def _candidates(chunks: list[torch.Tensor], blocks: PriorBlocks, end: int, keep: int, stats: DeviceKnnStats
                ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float, float]:
    """Per query chunk the ``keep`` best prior positions by score in the blocks' dtype (values as fp32, best
    first), and the largest |p̂| and |δp| over the priors. Each prior block is rounded once for all chunks."""
    best: list[tuple[torch.Tensor | None, torch.Tensor | None]] = [(None, None)] * len(chunks)
    norm_max = error_max = 0.0
    device = blocks.device
    # One scores buffer for every product: a fresh 256 MB result each time costs the CPU its page faults, as much
    # as the bf16 product itself on AMX.
    buffer = torch.empty(max(len(c) for c in chunks) * min(end, PRIOR_ROWS), dtype=blocks.dtype, device=device)
    for start in range(0, end, PRIOR_ROWS):
        with stats.timing("rounding", device):
            block = blocks.block(start, min(end, start + PRIOR_ROWS))
        norm_max, error_max = max(norm_max, block.norm_max), max(error_max, block.error_max)
        for i, chunk in enumerate(chunks):
            with stats.timing("products", device):
                scores = buffer[:len(chunk) * len(block.low)].view(len(chunk), len(block.low))
                torch.matmul(chunk, block.low.T, out=scores)
            with stats.timing("selection", device):
                best_val, best_pos = best[i]
                if best_val is not None and best_val.shape[1] == keep:
                    val, index = _above(scores, best_val[:, -1])
                else:
                    val, index = torch.topk(scores, min(keep, scores.shape[1]), dim=1)
                best[i] = _topk_merge(best_val, best_pos, val.float(), index + start, keep)
    return best, norm_max, error_max


def _above(scores: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row the scores above the row's threshold (the current ``keep``-th best) and their columns, padded with
    -inf. Once a few blocks are merged few scores qualify: the maximum of each run of ``GROUP_COLUMNS`` adjacent
    columns rules most runs out in one cheap pass, and only the runs left are compared element by element."""
    n, width = scores.shape
    limit = threshold.to(scores.dtype)
    grouped = width - width % GROUP_COLUMNS
    runs = scores[:, :grouped].view(n, grouped // GROUP_COLUMNS, GROUP_COLUMNS)
    run_rows, run_index = torch.nonzero(runs.amax(dim=2) > limit[:, None], as_tuple=True)
    hit, offset = torch.nonzero(runs[run_rows, run_index] > limit[run_rows, None], as_tuple=True)
    rows, cols = run_rows[hit], run_index[hit] * GROUP_COLUMNS + offset  # rows ascending, as nonzero lists them
    if grouped < width:  # the last columns, fewer than a run
        tail_rows, tail_cols = torch.nonzero(scores[:, grouped:] > limit[:, None], as_tuple=True)
        order = torch.argsort(torch.cat([rows, tail_rows]), stable=True)
        rows, cols = torch.cat([rows, tail_rows])[order], torch.cat([cols, tail_cols + grouped])[order]
    counts = torch.bincount(rows, minlength=n)
    most = int(counts.max()) if len(rows) else 0
    val = torch.full((n, most), -torch.inf, dtype=scores.dtype, device=scores.device)
    index = torch.zeros((n, most), dtype=torch.int64, device=scores.device)
    if most:
        rank = torch.arange(len(rows), device=scores.device) - (torch.cumsum(counts, 0) - counts)[rows]
        val[rows, rank] = scores[rows, cols]
        index[rows, rank] = cols
    return val, index


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


def _fp32_search(queries: np.ndarray, priors: np.ndarray, end: int, k: int, device: torch.device
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The exact search in fp32, one pass over the priors for every block of queries."""
    chunks = [torch.from_numpy(queries[i:i + QUERY_ROWS]).to(device) for i in range(0, len(queries), QUERY_ROWS)]
    # A few spare candidates: the blocked product and the rescoring may round a near-tie differently.
    best, _, _ = _candidates(chunks, PriorBlocks(priors, torch.float32, device), end, min(end, k + 8),
                             DeviceKnnStats())
    found = [_rescore(q, priors, pos, torch.full((len(q),), pos.shape[1]), k)[:2]
             for q, (_, pos) in zip(chunks, best, strict=True)]
    return np.concatenate([f for f, _ in found]), np.concatenate([c for _, c in found])


def _certified_pass(queries: np.ndarray, priors: np.ndarray, end: int, k: int, keep: int, blocks: PriorBlocks,
                    stats: DeviceKnnStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass with ``keep`` candidates per query: the k best positions and fp32 cosines, and the rows whose
    certificate failed (their neighbours may lie outside the candidates)."""
    device, low_precision = blocks.device, blocks.dtype != torch.float32
    with stats.timing("rounding", device):
        rounded = [_round(queries[start:start + QUERY_ROWS], blocks.dtype, device)
                   for start in range(0, len(queries), QUERY_ROWS)]
    best, norm_max, error_max = _candidates([r.low for _, r in rounded], blocks, end, keep, stats)
    positions, cosines, doubtful = [], [], []
    for i, ((full, query), (val, pos)) in enumerate(zip(rounded, best, strict=True)):
        with stats.timing("rescoring", device):
            if low_precision:
                q_norm = query.low.float().norm(dim=1)
                q_error = (query.low.float() - full).norm(dim=1)
                bound = (q_error * norm_max + q_norm * error_max + q_error * error_max
                         + OUTPUT_ROUNDING * q_norm * norm_max)
                widths = (val >= (val[:, k - 1] - 2 * bound)[:, None]).sum(dim=1)
            else:
                widths = torch.full((len(full),), val.shape[1])
            found, cos, rescored = _rescore(full, priors, pos, widths, k)
            if keep < end and low_precision:  # else every prior is a candidate, or the candidates were in fp32
                ceiling = (val[:, -1] + bound).cpu().numpy()  # the best an uncandidated paper can be, in fp32
                doubtful.append(i * QUERY_ROWS + np.flatnonzero(cos[:, -1] <= ceiling))
        stats.rescored += rescored
        positions.append(found)
        cosines.append(cos)
    failed = np.concatenate(doubtful) if doubtful else np.zeros(0, dtype=np.int64)
    return np.concatenate(positions), np.concatenate(cosines), failed


def device_knn(queries: np.ndarray, priors: np.ndarray, end: int, k: int, device: torch.device,
               low_precision: bool = True, margin: int | None = None, stats: DeviceKnnStats | None = None,
               blocks: PriorBlocks | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Positions (-1 where fewer than k priors) and fp32 cosines of the k most similar rows of ``priors[:end]`` (unit
    vectors) for each query, best first. ``margin``: spare candidates per query in the first pass (default k); a
    query whose certificate fails is searched again with ``WIDEN`` times as many, up to ``WIDEST_KEEP``, then in
    fp32. ``blocks``: the priors' rounded blocks kept from earlier calls (a ``PriorBlocks`` over the same
    ``priors``, dtype and device)."""
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
    pending = np.arange(n)
    keep = min(end, k_eff + (k_eff if margin is None else margin))
    while True:
        rows = queries if len(pending) == n else np.asarray(queries[pending])
        found, cos, failed = _certified_pass(rows, priors, end, k_eff, keep, blocks, stats)
        positions[pending, :k_eff], cosines[pending, :k_eff] = found, cos
        pending = pending[failed]
        if not len(pending) or keep >= min(end, WIDEST_KEEP):
            break
        keep = min(end, keep * WIDEN)
        stats.searched_again_wider += len(pending)
    if len(pending):  # one fp32 pass over the priors for every query still uncertified
        with stats.timing("fp32_again", device):
            rows = np.array(queries[pending], dtype=np.float32)
            positions[pending, :k_eff], cosines[pending, :k_eff] = _fp32_search(rows, priors, end, k_eff, device)
    stats.queries += n
    stats.searched_again_in_fp32 += len(pending)
    stats.certified += n - len(pending)
    return positions, cosines


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
