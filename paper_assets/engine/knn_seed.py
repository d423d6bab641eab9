"""A floor under each query's k-th best fp32 cosine before the device search (``device_knn``) streams its first
prior block, so that every block's threshold pass keeps about the final band instead of everything near the k-th
best of the blocks seen so far.

The priors are assigned to the nearest of ``CENTROIDS`` k-means centroids (a coarse quantiser trained once on a
sample of the index); a query's floor comes from the ``MEMBERS`` latest priors of its nearest centroid: the k-th best
of their fp32 cosines, less the fp32 product's own error. Those are k distinct earlier papers with cosines of at
least the floor, so the query's k-th best cosine over all the priors is at least the floor too, and a paper scored
below the floor less e(q) cannot be among its k nearest (``knn_band``). Members come only from positions before the
search's end, so a floor is valid for any call order; a query whose centroid has fewer than k such members gets no
floor.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

CENTROIDS = 256  # k-means centroids the priors are assigned to
MEMBERS = 2048  # the latest members of a query's centroid its floor is taken from
TRAINING_ROWS_PER_CENTROID = 64  # evenly spaced rows of the index the k-means is trained on


def fp32_rows(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Rows of the index's vectors as an fp32 tensor on ``device``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the index's vectors are a read-only memory map; nothing here writes to it
        return torch.from_numpy(np.asarray(rows, dtype=np.float32)).to(device)


class SeedFloors:
    """The priors' centroid assignments, filled in block by block as the search first rounds each block."""

    def __init__(self, priors: np.ndarray, centroids: int = CENTROIDS, members: int = MEMBERS):
        self.priors, self.members, self.count = priors, members, centroids
        self.assigned = np.full(len(priors), -1, dtype=np.int16)  # -1: not assigned yet
        self._centroids: torch.Tensor | None = None

    @property
    def centroids(self) -> torch.Tensor:
        """Trained on first use: a search over fewer priors than one block never needs them."""
        if self._centroids is None:
            self._centroids = self._train()
        return self._centroids

    def _train(self) -> torch.Tensor:
        import faiss

        priors = self.priors
        count = max(1, min(self.count, len(priors) // TRAINING_ROWS_PER_CENTROID))
        picks = np.linspace(0, len(priors) - 1, min(len(priors), count * TRAINING_ROWS_PER_CENTROID)).astype(np.int64)
        sample = fp32_rows(priors[picks], torch.device("cpu")).numpy()
        # Centroids only route a query to papers worth scoring first; any centroids keep the floors valid.
        kmeans = faiss.Kmeans(sample.shape[1], count, niter=10, spherical=True, seed=1234, verbose=False)
        kmeans.train(sample)
        return torch.from_numpy(np.ascontiguousarray(kmeans.centroids, dtype=np.float32))

    def assign(self, start: int, rows: torch.Tensor) -> None:
        """Assigns ``priors[start:start + len(rows)]`` (their rounded rows, in order, on any device)."""
        nearest = torch.argmax(rows @ self.centroids.to(rows.device, rows.dtype).T, dim=1)
        self.assigned[start:start + len(rows)] = nearest.cpu().numpy().astype(np.int16)

    def floors(self, queries: torch.Tensor, end: int, k: int) -> torch.Tensor:
        """Per query (fp32 rows on the CPU) a floor under its k-th best fp32 cosine among ``priors[:end]`` (-inf
        where none is known)."""
        floor = torch.full((len(queries),), -torch.inf)
        assigned = self.assigned[:end]
        known = np.flatnonzero(assigned >= 0)
        if len(known) < k or not len(queries) or self._centroids is None:
            return floor
        order = known[np.argsort(assigned[known], kind="stable")]  # by centroid, positions ascending within one
        ends = np.cumsum(np.bincount(assigned[known], minlength=len(self.centroids)))
        nearest = torch.argmax(queries @ self.centroids.T, dim=1)
        accumulation = queries.shape[1] * 2.0**-24 * queries.norm(dim=1)  # times |p|: fp32's own product error
        for centroid in torch.unique(nearest).tolist():
            stop = int(ends[centroid])
            first = max(stop - self.members, int(ends[centroid - 1]) if centroid else 0)
            if stop - first < k:
                continue
            rows = torch.nonzero(nearest == centroid, as_tuple=True)[0]
            members = fp32_rows(self.priors[order[first:stop]], torch.device("cpu"))
            cosines = queries.index_select(0, rows) @ members.T
            kth = torch.topk(cosines, k, dim=1).values[:, -1]
            floor[rows] = kth - accumulation[rows] * float(members.norm(dim=1).max())
        return floor
