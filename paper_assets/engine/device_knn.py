"""Exact k nearest earlier papers by blocked matrix products on the embedding device (torch: CUDA, or a CPU with
native bf16), so that novelty over millions of papers costs minutes instead of hours.

Each block of prior papers is multiplied with a block of queries in low precision (bf16) to pick candidates: the top
``k + margin`` per query, merged block by block, so memory is bounded by the block sizes, not by N². The candidates
are then rescored in fp32 and the top k taken by (cosine, then position), as the fp32 search orders them.

Exactness is certified, not hoped for: with unit vectors every bf16 cosine is within ``BF16_COSINE_ERROR`` of its
fp32 value (each operand rounded to bf16, relative error ≤ 2⁻⁹ per element; products accumulated in fp32; by
Cauchy-Schwarz the sum's error is ≤ (2·2⁻⁹ + 2⁻¹⁸)·|q|·|p| plus fp32 rounding). A paper outside the candidates had a
bf16 cosine ≤ the last candidate's, so its fp32 cosine is at most that plus twice the bound. Where the k-th rescored
cosine is not above that ceiling, the query is searched again in fp32 over every prior paper. So the neighbours
equal an exact fp32 search up to exact ties and fp32 rounding (≈ 1e-7).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BF16_COSINE_ERROR = 2.0**-8 + 2.0**-17  # |cos_bf16 - cos_fp32| for unit vectors, with room for fp32 accumulation
QUERY_ROWS = 4096
PRIOR_ROWS = 32768
RESCORE_ROWS = 256


@dataclass
class DeviceKnnStats:
    queries: int = 0
    certified: int = 0
    searched_again_in_fp32: int = 0


def _topk_merge(best_val: torch.Tensor | None, best_pos: torch.Tensor | None, val: torch.Tensor, pos: torch.Tensor,
                keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    if best_val is not None:
        val, pos = torch.cat([best_val, val], dim=1), torch.cat([best_pos, pos], dim=1)
    if val.shape[1] > keep:
        val, index = torch.topk(val, keep, dim=1)
        pos = torch.gather(pos, 1, index)
    return val, pos


def _candidates(queries: torch.Tensor, priors: np.ndarray, end: int, keep: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` highest-scoring prior positions per query in ``dtype`` (values in fp32), block by block."""
    low = queries.to(dtype)
    best_val = best_pos = None
    for start in range(0, end, PRIOR_ROWS):
        # A copy: the index's vectors are a read-only memory map, which torch will not wrap.
        block = torch.from_numpy(np.array(priors[start:min(end, start + PRIOR_ROWS)], dtype=np.float32))
        scores = (low @ block.to(device).to(dtype).T).float()
        take = min(keep, scores.shape[1])
        val, index = torch.topk(scores, take, dim=1)
        best_val, best_pos = _topk_merge(best_val, best_pos, val, index + start, keep)
    return best_val, best_pos


def _rescore(queries: torch.Tensor, priors: np.ndarray, positions: torch.Tensor, k: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """The candidates' fp32 cosines; the top k per query ordered by (cosine descending, position ascending)."""
    pos = positions.cpu().numpy()
    query_rows = queries.cpu().numpy()
    cos = np.empty(pos.shape, dtype=np.float32)
    for start in range(0, len(pos), RESCORE_ROWS):  # gathers a slice's candidate vectors at a time
        rows = pos[start:start + RESCORE_ROWS]
        wanted = np.unique(rows)
        vectors = np.asarray(priors[wanted], dtype=np.float32)[np.searchsorted(wanted, rows)]
        cos[start:start + RESCORE_ROWS] = np.einsum("qd,qcd->qc", query_rows[start:start + RESCORE_ROWS], vectors)
    order = np.lexsort((pos, -cos), axis=1)[:, :k]
    return np.take_along_axis(pos, order, 1), np.take_along_axis(cos, order, 1)


def _fp32_search(queries: np.ndarray, priors: np.ndarray, end: int, k: int, device: torch.device
                 ) -> tuple[np.ndarray, np.ndarray]:
    q = torch.from_numpy(queries).to(device)
    val, pos = _candidates(q, priors, end, k + 8, torch.float32, device)
    return _rescore(q, priors, pos, k)


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
    bound = 2 * BF16_COSINE_ERROR if low_precision else 0.0
    stats = stats if stats is not None else DeviceKnnStats()
    for start in range(0, n, QUERY_ROWS):
        chunk = np.array(queries[start:start + QUERY_ROWS], dtype=np.float32)  # a writable copy, as above
        q = torch.from_numpy(chunk).to(device)
        val, pos = _candidates(q, priors, end, keep, dtype, device)
        found, cos = _rescore(q, priors, pos, k_eff)
        doubtful = np.zeros(0, dtype=np.int64)  # every prior is a candidate, or the candidates were scored in fp32
        if keep < end and low_precision:
            ceiling = val[:, -1].cpu().numpy() + bound  # the best an uncandidated paper can be, in fp32
            doubtful = np.flatnonzero(cos[:, -1] <= ceiling)
            if len(doubtful):
                found[doubtful], cos[doubtful] = _fp32_search(chunk[doubtful], priors, end, k_eff, device)
        stats.queries += len(chunk)
        stats.searched_again_in_fp32 += len(doubtful)
        stats.certified += len(chunk) - len(doubtful)
        positions[start:start + len(chunk), :k_eff] = found
        cosines[start:start + len(chunk), :k_eff] = cos
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
