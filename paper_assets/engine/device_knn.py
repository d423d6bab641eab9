"""Exact k nearest earlier papers by blocked matrix products on the embedding device (torch: CUDA, or a CPU with
native bf16), so that novelty over millions of papers costs minutes instead of hours.

Each block of prior papers is rounded to bf16 once and multiplied with every block of queries: the top
``k + margin`` per query are kept, merged block by block, so memory is bounded by the block sizes, not by N². The
candidates are then rescored in fp32 and the top k taken by (cosine, then position), as the fp32 search orders them.

Exactness is certified per query, not hoped for. Write q = q̂ + δq and p = p̂ + δp with q̂, p̂ the bf16 roundings;
the device computes q̂·p̂ with fp32 accumulation and rounds the result to bf16, so

    |q·p − score| ≤ |δq|·|p̂| + |q̂|·|δp| + |δq|·|δp| + (2⁻⁹ + 768·2⁻²⁴)·|q̂|·|p̂|  =: e(q)

with the norms measured on the actual vectors (largest over the priors). A paper outside the candidates scored
at most the last candidate's score s, so its fp32 cosine is at most s + e(q). Where the k-th rescored cosine is
above that ceiling the query's neighbours are certified; otherwise it is searched again in fp32 over every prior
paper. Only candidates whose score reaches the k-th score − 2·e(q) can be among the k best, so only those are
rescored. The neighbours equal an exact fp32 search up to exact ties and fp32 rounding (≈ 1e-7).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

OUTPUT_ROUNDING = 2.0**-9 + 768 * 2.0**-24  # bf16 rounding of the result plus fp32 accumulation over 768 terms
QUERY_ROWS = 4096
PRIOR_ROWS = 32768
RESCORE_ROWS = 256


@dataclass
class DeviceKnnStats:
    queries: int = 0
    certified: int = 0
    searched_again_in_fp32: int = 0
    rescored: int = 0  # candidate cosines recomputed in fp32


@dataclass
class _Rounded:
    """A block of unit vectors on the device in the search's dtype, with the norms its rounding error bound needs."""

    low: torch.Tensor
    norm_max: float  # largest |p̂|
    error_max: float  # largest |δp|


def _round(rows: np.ndarray, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, _Rounded]:
    full = torch.from_numpy(np.array(rows, dtype=np.float32)).to(device)  # a copy: the index is a read-only map
    low = full.to(dtype)
    back = low.float()
    return full, _Rounded(low, float(back.norm(dim=1).max()), float((back - full).norm(dim=1).max()))


def _topk_merge(best_val: torch.Tensor | None, best_pos: torch.Tensor | None, val: torch.Tensor, pos: torch.Tensor,
                keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    if best_val is not None:
        val, pos = torch.cat([best_val, val], dim=1), torch.cat([best_pos, pos], dim=1)
    if val.shape[1] > keep:
        val, index = torch.topk(val, keep, dim=1)
        pos = torch.gather(pos, 1, index)
    return val, pos


def _candidates(chunks: list[torch.Tensor], priors: np.ndarray, end: int, keep: int, dtype: torch.dtype,
                device: torch.device) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float, float]:
    """Per query chunk the ``keep`` best prior positions by ``dtype`` score (values as fp32, best first), and the
    largest |p̂| and |δp| over the priors. Each prior block is rounded once for all chunks."""
    best: list[tuple[torch.Tensor | None, torch.Tensor | None]] = [(None, None)] * len(chunks)
    norm_max = error_max = 0.0
    for start in range(0, end, PRIOR_ROWS):
        _, block = _round(priors[start:min(end, start + PRIOR_ROWS)], dtype, device)
        norm_max, error_max = max(norm_max, block.norm_max), max(error_max, block.error_max)
        for i, chunk in enumerate(chunks):
            scores = chunk @ block.low.T
            val, index = torch.topk(scores, min(keep, scores.shape[1]), dim=1)
            best[i] = _topk_merge(*best[i], val.float(), index + start, keep)
    return best, norm_max, error_max


def _rescore(queries: torch.Tensor, priors: np.ndarray, positions: torch.Tensor, widths: torch.Tensor, k: int
             ) -> tuple[np.ndarray, np.ndarray, int]:
    """fp32 cosines of each query's first ``widths[i]`` candidates (the others cannot be among its k best); the top
    k per query ordered by (cosine descending, position ascending), and how many cosines were computed."""
    pos = positions.cpu()
    query_rows = queries.cpu()
    n = len(pos)
    found = np.empty((n, k), dtype=np.int64)
    cos = np.empty((n, k), dtype=np.float32)
    rescored = 0
    for start in range(0, n, RESCORE_ROWS):
        stop = min(n, start + RESCORE_ROWS)
        width = max(k, int(widths[start:stop].max()))
        rows = pos[start:stop, :width]
        vectors = torch.from_numpy(np.take(priors, rows.reshape(-1).numpy(), axis=0)).view(stop - start, width, -1)
        sims = torch.bmm(vectors, query_rows[start:stop, :, None])[:, :, 0]
        beyond = torch.arange(width)[None, :] >= widths[start:stop, None].cpu()
        sims[beyond] = -torch.inf  # outside the band: cannot be among the k best
        rescored += (stop - start) * width
        # (cosine desc, position asc): sort by position, then a stable sort by cosine.
        by_pos, pos_order = torch.sort(rows, dim=1)
        sims = torch.gather(sims, 1, pos_order)
        top, order = torch.sort(sims, dim=1, descending=True, stable=True)
        found[start:stop] = torch.gather(by_pos, 1, order[:, :k]).numpy()
        cos[start:stop] = top[:, :k].numpy()
    return found, cos, rescored


def _fp32_search(queries: np.ndarray, priors: np.ndarray, end: int, k: int, device: torch.device
                 ) -> tuple[np.ndarray, np.ndarray]:
    q = torch.from_numpy(queries).to(device)
    # A few spare candidates: the blocked product and the rescoring may round a near-tie differently.
    [(_, pos)], _, _ = _candidates([q], priors, end, min(end, k + 8), torch.float32, device)
    return _rescore(q, priors, pos, torch.full((len(q),), pos.shape[1]), k)[:2]


def device_knn(queries: np.ndarray, priors: np.ndarray, end: int, k: int, device: torch.device,
               low_precision: bool = True, margin: int | None = None,
               stats: DeviceKnnStats | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Positions (-1 where fewer than k priors) and fp32 cosines of the k most similar rows of ``priors[:end]`` (unit
    vectors) for each query, best first."""
    n = len(queries)
    positions = np.full((n, k), -1, dtype=np.int64)
    cosines = np.zeros((n, k), dtype=np.float32)
    k_eff = min(k, end)
    if n == 0 or k_eff == 0:
        return positions, cosines
    keep = min(end, k_eff + (k_eff if margin is None else margin))
    dtype = torch.bfloat16 if low_precision else torch.float32
    stats = stats if stats is not None else DeviceKnnStats()
    rounded = [_round(queries[start:start + QUERY_ROWS], dtype, device) for start in range(0, n, QUERY_ROWS)]
    best, norm_max, error_max = _candidates([r.low for _, r in rounded], priors, end, keep, dtype, device)
    for i, ((full, query), (val, pos)) in enumerate(zip(rounded, best, strict=True)):
        start = i * QUERY_ROWS
        if low_precision:
            q_norm = query.low.float().norm(dim=1)
            q_error = (query.low.float() - full).norm(dim=1)
            bound = q_error * norm_max + q_norm * error_max + q_error * error_max + OUTPUT_ROUNDING * q_norm * norm_max
            widths = (val >= (val[:, k_eff - 1] - 2 * bound)[:, None]).sum(dim=1)
        else:
            widths = torch.full((len(full),), val.shape[1])
        found, cos, rescored = _rescore(full, priors, pos, widths, k_eff)
        doubtful = np.zeros(0, dtype=np.int64)  # every prior is a candidate, or the candidates were scored in fp32
        if keep < end and low_precision:
            ceiling = (val[:, -1] + bound).cpu().numpy()  # the best an uncandidated paper can be, in fp32
            doubtful = np.flatnonzero(cos[:, -1] <= ceiling)
            if len(doubtful):
                chunk = full.cpu().numpy()[doubtful]
                found[doubtful], cos[doubtful] = _fp32_search(chunk, priors, end, k_eff, device)
        stats.queries += len(full)
        stats.searched_again_in_fp32 += len(doubtful)
        stats.certified += len(full) - len(doubtful)
        stats.rescored += rescored
        positions[start:start + len(full), :k_eff] = found
        cosines[start:start + len(full), :k_eff] = cos
    return positions, cosines


def knn_device() -> tuple[torch.device, bool]:
    """Where the search runs and whether in bf16: a CUDA GPU (bf16), else the CPU (bf16 where it has native bf16
    instructions, AMX or AVX512-BF16; fp32 otherwise, which FAISS's exact search does as fast)."""
    from .device import cpu_has_native_bf16

    if torch.cuda.is_available():
        return torch.device("cuda"), True
    return torch.device("cpu"), cpu_has_native_bf16()


def device_search_pays() -> bool:
    """Whether ``auto`` takes the device search: on a GPU. On a CPU FAISS's fp32 exact search was faster even where
    the CPU multiplies bf16 natively (a 2-vCPU Zen 4: 10.0 s against 32.6 s for 50,000 papers; BENCHMARKS.md), so
    there ``device`` must be asked for."""
    return torch.cuda.is_available()
