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


def pad_batch(token_ids: list[list[int]], rows: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``input_ids`` and ``attention_mask`` (int64) for the selected rows."""
    longest = max(len(token_ids[i]) for i in rows)
    input_ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    attention = np.zeros((len(rows), longest), dtype=np.int64)
    for out_row, i in enumerate(rows):
        ids = token_ids[i]
        input_ids[out_row, : len(ids)] = ids
        attention[out_row, : len(ids)] = 1
    return input_ids, attention
