"""Balanced hierarchical k-means: the posting-list partition of a SPANN-style index.

SPANN keeps posting lists short and even so that every probed list costs about the
same to fetch and scan. :func:`balanced_kmeans` gets there in two levels with faiss:

1. a top k-means with about ``sqrt(nlist)`` centroids splits the data into regions;
2. each region is clustered into ``round(size / target_list_size)`` lists;
3. any list still longer than ``max_list_size`` is split again (k-means, and an even
   split of the sorted members as the fallback when k-means cannot separate them,
   e.g. duplicates), so no list ends up longer than ``max_list_size``.

Two levels cost ``O(n * sqrt(nlist))`` distance computations per iteration instead of
``O(n * nlist)``, which is what makes a million-vector build take seconds, not minutes.
Metric ``"ip"`` uses spherical k-means and assigns by largest inner product (for cosine,
normalise the vectors first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

from ..errors import InvalidArgument

__all__ = ["Partition", "balanced_kmeans", "assign_nearest", "two_means", "METRICS"]

METRICS = ("l2", "ip")
_ASSIGN_BATCH = 65_536


@dataclass(frozen=True)
class Partition:
    """Centroids ``(nlist, d)`` float32 and the list of each vector ``(n,)`` int64."""

    centroids: np.ndarray
    assignment: np.ndarray

    @property
    def nlist(self) -> int:
        return int(self.centroids.shape[0])

    def list_sizes(self) -> np.ndarray:
        return np.bincount(self.assignment, minlength=self.nlist)


def _flat_index(centroids: np.ndarray, metric: str) -> faiss.Index:
    index = faiss.IndexFlatL2(centroids.shape[1]) if metric == "l2" else faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def assign_nearest(x: np.ndarray, centroids: np.ndarray, metric: str = "l2", k: int = 1):
    """Return ``(distances, labels)`` of the ``k`` nearest centroids of each row (faiss, batched)."""
    index = _flat_index(centroids, metric)
    k = min(k, centroids.shape[0])
    distances = np.empty((x.shape[0], k), dtype=np.float32)
    labels = np.empty((x.shape[0], k), dtype=np.int64)
    for start in range(0, x.shape[0], _ASSIGN_BATCH):
        stop = min(start + _ASSIGN_BATCH, x.shape[0])
        distances[start:stop], labels[start:stop] = index.search(x[start:stop], k)
    return distances, labels


def _kmeans(x: np.ndarray, k: int, metric: str, seed: int, niter: int) -> np.ndarray:
    """faiss k-means centroids; at most ``len(x)`` of them."""
    k = min(k, x.shape[0])
    if k <= 1:
        centroid = x.mean(axis=0, keepdims=True)
        if metric == "ip":
            centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
        return centroid.astype(np.float32)
    kmeans = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=(metric == "ip"),
                          max_points_per_centroid=256, min_points_per_centroid=1, verbose=False)
    kmeans.train(x)
    return kmeans.centroids.copy()


def _even_split(x: np.ndarray, members: np.ndarray, parts: int, metric: str):
    """Split ``members`` into ``parts`` even chunks along their main direction of spread."""
    sub = x[members]
    direction = sub.std(axis=0)
    order = np.argsort(sub[:, int(np.argmax(direction))], kind="stable")
    chunks = np.array_split(members[order], parts)
    centroids = np.stack([x[c].mean(axis=0) for c in chunks]).astype(np.float32)
    if metric == "ip":
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return centroids, chunks


def balanced_kmeans(x: np.ndarray, *, target_list_size: int, max_list_size: int | None = None,
                    metric: str = "l2", seed: int = 0, niter: int = 20) -> Partition:
    """Partition ``x`` into posting lists of about ``target_list_size`` vectors.

    :param x: ``(n, d)`` float32, finite.
    :param target_list_size: the list length aimed at (SPANN uses about 100-200).
    :param max_list_size: hard upper bound on a list's length (default ``2 * target``).
    :returns: a :class:`Partition`; every vector is in exactly one list, no list is
        empty, and none is longer than ``max_list_size``. Deterministic for a ``seed``.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise InvalidArgument(f"x must be a non-empty (n, d) array, got shape {x.shape}")
    if metric not in METRICS:
        raise InvalidArgument(f"metric must be one of {METRICS}, got {metric!r}")
    if target_list_size < 1:
        raise InvalidArgument(f"target_list_size must be >= 1, got {target_list_size}")
    max_list_size = max_list_size or 2 * target_list_size
    if max_list_size < target_list_size:
        raise InvalidArgument(f"max_list_size ({max_list_size}) must be >= target_list_size ({target_list_size})")
    n = x.shape[0]
    nlist_goal = max(1, round(n / target_list_size))
    top_k = max(1, round(math.sqrt(nlist_goal))) if nlist_goal > 64 else 1

    if top_k > 1:
        top = _kmeans(x, top_k, metric, seed, niter)
        regions = assign_nearest(x, top, metric)[1][:, 0]
    else:
        regions = np.zeros(n, dtype=np.int64)
    order = np.argsort(regions, kind="stable")
    bounds = np.searchsorted(regions[order], np.arange(regions.max() + 2))

    centroids: list[np.ndarray] = []
    lists: list[np.ndarray] = []
    for region in range(len(bounds) - 1):
        members = order[bounds[region]:bounds[region + 1]]
        if members.size == 0:
            continue
        k = max(1, round(members.size / target_list_size))
        sub_centroids = _kmeans(x[members], k, metric, seed + 1 + region, niter)
        labels = assign_nearest(x[members], sub_centroids, metric)[1][:, 0]
        for label in range(sub_centroids.shape[0]):
            chosen = members[labels == label]
            if chosen.size:
                centroids.append(sub_centroids[label])
                lists.append(chosen)

    # Split what is still too long; k-means first, an even split when it cannot separate.
    pending = [i for i, members in enumerate(lists) if members.size > max_list_size]
    while pending:
        i = pending.pop()
        members = lists[i]
        parts = math.ceil(members.size / target_list_size)
        sub_centroids = _kmeans(x[members], parts, metric, seed + 7919 + i, niter)
        labels = assign_nearest(x[members], sub_centroids, metric)[1][:, 0]
        chunks = [members[labels == label] for label in range(sub_centroids.shape[0])]
        keep = [j for j, chunk in enumerate(chunks) if chunk.size]
        if len(keep) < 2 or max(chunks[j].size for j in keep) >= members.size:
            sub_centroids, chunks = _even_split(x, members, max(2, math.ceil(members.size / max_list_size)), metric)
            keep = list(range(len(chunks)))
        first = True
        for j in keep:
            if first:
                centroids[i], lists[i] = sub_centroids[j], chunks[j]
                slot, first = i, False
            else:
                centroids.append(sub_centroids[j])
                lists.append(chunks[j])
                slot = len(lists) - 1
            if lists[slot].size > max_list_size:
                pending.append(slot)

    assignment = np.empty(n, dtype=np.int64)
    for list_no, members in enumerate(lists):
        assignment[members] = list_no
    return Partition(centroids=np.ascontiguousarray(np.stack(centroids), dtype=np.float32), assignment=assignment)


def two_means(x: np.ndarray, *, metric: str = "l2", seed: int = 0, niter: int = 10) -> np.ndarray:
    """Split ``x`` (a posting list's vectors) in two: ``(2, d)`` centroids (numpy, vectorised).

    Starts from the two points farthest apart along the main direction of spread, then
    runs Lloyd iterations; ``"ip"`` normalises the centroids (spherical k-means). Used by
    list splits, where faiss's k-means costs more in set-up than the work itself.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] < 2:
        return np.repeat(x[:1], 2, axis=0)
    centred = x - x.mean(axis=0)
    rng = np.random.default_rng(seed)
    direction = centred[rng.integers(x.shape[0])]
    for _ in range(3):  # a few power iterations towards the principal direction
        direction = centred.T @ (centred @ direction)
        direction /= max(float(np.linalg.norm(direction)), 1e-12)
    side = centred @ direction > 0
    centroids = np.stack([x[~side].mean(axis=0) if (~side).any() else x[0], x[side].mean(axis=0) if side.any() else x[-1]])
    for _ in range(niter):
        if metric == "ip":
            centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
            side = x @ centroids[1] > x @ centroids[0]
        else:
            side = ((x - centroids[1]) ** 2).sum(1) < ((x - centroids[0]) ** 2).sum(1)
        if side.all() or not side.any():
            break
        new = np.stack([x[~side].mean(axis=0), x[side].mean(axis=0)])
        if np.allclose(new, centroids):
            break
        centroids = new
    if metric == "ip":
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return centroids.astype(np.float32)
