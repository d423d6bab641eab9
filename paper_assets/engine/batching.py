"""One batching policy: sort by token length, cut by a padded-token budget, longest batch first.

Sorting makes rows of a batch nearly the same length, so little compute goes to padding; the budget keeps the
activation size (rows x longest) roughly constant, so memory stays flat; starting with the longest batch makes
the allocator reach its peak at once instead of growing through the run.
"""

from __future__ import annotations

import numpy as np


def plan_batches(lengths: np.ndarray, token_budget: int, max_rows: int) -> list[np.ndarray]:
    """Indices into ``lengths`` for each batch, longest batch first; every row appears exactly once."""
    if token_budget <= 0 or max_rows <= 0:
        raise ValueError("token_budget and max_rows must be positive")
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = int(lengths[order[start]])
        rows = max(1, min(max_rows, token_budget // max(longest, 1)))
        batches.append(order[start : start + rows])
        start += rows
    return batches


def pad_batch(
    flat_ids: np.ndarray, offsets: np.ndarray, rows: np.ndarray, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``input_ids`` and ``attention_mask`` (int64) for the selected rows.

    Row ``i``'s tokens are ``flat_ids[offsets[i]:offsets[i + 1]]`` (all rows of a chunk in one int32 array: a few
    bytes per token instead of a Python int object each).
    """
    starts, ends = offsets[rows], offsets[np.asarray(rows) + 1]
    lengths = ends - starts
    input_ids = np.full((len(rows), int(lengths.max())), pad_id, dtype=np.int64)
    for out_row, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True)):
        input_ids[out_row, :length] = flat_ids[start : start + length]
    attention = (np.arange(input_ids.shape[1]) < lengths[:, None]).astype(np.int64)
    return input_ids, attention
