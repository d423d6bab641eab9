"""One batching policy: sort by token length, cut by a padded-token budget, longest batch first.

Sorting makes rows of a batch nearly the same length, so little compute goes to padding; the budget keeps the
activation size (rows x padded width) roughly constant, so memory stays flat; starting with the longest batch makes
the allocator reach its peak at once instead of growing through the run. Widths are rounded up to a multiple
(``pad_multiple``: 64 on GPUs, where every distinct shape costs kernel selection and allocator warm-up, 8 on CPUs),
and every batch but a chunk's last holds exactly ``full_rows(width)`` rows. The last batch's rows are rounded up
to a power of two (:func:`bucket_rows`, with copies of its last row that are computed and dropped), so a whole run
uses a few dozen shapes instead of one new shape per chunk: each new shape costs kernel selection (a cuDNN attention
plan is built per shape, ~60-400 ms; oneDNN creates primitives per shape on a CPU). Padding is masked and padding
rows are separate rows, so neither changes a vector beyond float rounding.
"""

from __future__ import annotations

import numpy as np
import torch


def padded_width(longest: int, pad_multiple: int, max_length: int) -> int:
    """``longest`` rounded up to ``pad_multiple``, but never past ``max_length`` (the model's position limit)."""
    rounded = -(-longest // pad_multiple) * pad_multiple
    return max(longest, min(rounded, max_length))


def full_rows(width: int, token_budget: int, max_rows: int) -> int:
    """Rows of a full batch of ``width``: as many as the token budget holds, at least one, at most ``max_rows``."""
    return max(1, min(max_rows, token_budget // max(width, 1)))


def bucket_rows(rows: int, full: int) -> int:
    """The rows a batch of ``rows`` real rows runs with: the next power of two, but never more than ``full`` (a
    full batch's rows, a shape every chunk already uses). At most ~log2(full) shapes per width, however many
    chunks a run has; the added rows cost under half of one partial batch per chunk."""
    if rows >= full:
        return rows
    return min(full, 1 << (rows - 1).bit_length())


def warm_up_shapes(token_budget: int, max_rows: int, pad_multiple: int, max_length: int,
                   every_width: bool = True) -> list[tuple[int, int]]:
    """(rows, width) of the batches to run once before a stream: a full batch of every padded width, widest first,
    then every bucketed row count of the two narrowest widths (where a chunk's last, partial batch nearly always
    falls, its rows being the chunk's shortest). ``every_width=False``: only the narrowest full batch."""
    widths = sorted({padded_width(width, pad_multiple, max_length)
                     for width in range(pad_multiple, max_length + pad_multiple, pad_multiple)}, reverse=True)
    shapes = [(max(2, full_rows(width, token_budget, max_rows)), width) for width in widths]
    if not every_width:
        return shapes[-1:]
    for width in widths[-2:]:
        full = full_rows(width, token_budget, max_rows)
        shapes += [(rows, width) for rows in sorted({bucket_rows(n, full) for n in range(1, full)} - {full})]
    return shapes


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
        rows = full_rows(width, token_budget, max_rows)
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
