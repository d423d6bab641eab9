"""One batching policy: sort by token length, cut by a padded-token budget, longest batch first.

Sorting makes rows of a batch nearly the same length, so little compute goes to padding; the budget keeps the
activation size (rows x padded width) roughly constant, so memory stays flat; starting with the longest batch makes
the allocator reach its peak at once instead of growing through the run. Widths are rounded up to a multiple
(``pad_multiple``: 64 on GPUs, where every distinct shape costs kernel selection and allocator warm-up, 8 on CPUs),
so a whole run uses a handful of shapes. Padding is masked, so it changes no vector beyond float rounding.
"""

from __future__ import annotations

import numpy as np
import torch


def padded_width(longest: int, pad_multiple: int, max_length: int) -> int:
    """``longest`` rounded up to ``pad_multiple``, but never past ``max_length`` (the model's position limit)."""
    rounded = -(-longest // pad_multiple) * pad_multiple
    return max(longest, min(rounded, max_length))


def plan_batches(lengths: np.ndarray, token_budget: int, max_rows: int, pad_multiple: int = 1,
                 max_length: int = 512) -> list[np.ndarray]:
    """Indices into ``lengths`` for each batch, longest batch first; every row appears exactly once and
    ``len(batch) * padded width <= token_budget`` unless the batch is a single row."""
    if token_budget <= 0 or max_rows <= 0 or pad_multiple <= 0:
        raise ValueError("token_budget, max_rows and pad_multiple must be positive")
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        width = padded_width(int(lengths[order[start]]), pad_multiple, max_length)
        rows = max(1, min(max_rows, token_budget // max(width, 1)))
        batches.append(order[start : start + rows])
        start += rows
    return batches


def pad_on_device(flat_ids: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, width: int, pad_id: int,
                  positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (int64, ``len(starts) x width``) gathered from a chunk's
    flat token ids where they already are (the GPU, or the CPU): no per-batch host work or host-to-device copy.

    Row ``i``'s tokens are ``flat_ids[starts[i]:starts[i] + lengths[i]]``; ``positions`` is ``arange(>= width)``.
    """
    position = positions[:width]
    mask = position[None, :] < lengths[:, None]
    index = (starts[:, None] + position[None, :]).clamp_(max=max(flat_ids.numel() - 1, 0))
    input_ids = torch.where(mask, flat_ids[index], pad_id)
    return input_ids, mask.long()
