"""Boundary replication (SPANN's RNG rule) and the posting-list layout it produces.

A vector near the border of its list is also stored in a few nearby lists, so a query
finds it while probing fewer lists. For each vector, candidate lists are visited from
the nearest outwards and a candidate ``c_i`` is taken when

* closure: ``d(x, c_i) <= closure * d(x, c_primary)`` (squared L2 distances), and
* RNG rule: no list ``c_j`` already taken is closer to ``c_i`` than ``x`` is
  (``d(c_j, c_i) < d(x, c_i)`` rejects it): that neighbour already covers the direction,

until ``max_replicas`` lists hold the vector. The loop runs over candidate ranks (a
handful), vectorised over all vectors; rows drop out as soon as their closure fails, so
the work shrinks quickly. Distances use L2 geometry for both metrics (for normalised
vectors it orders exactly as inner product does).
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgument
from .clustering import assign_nearest

__all__ = ["replicate_boundary", "group_posting_lists"]


def _squared_l2(x: np.ndarray, x_norms: np.ndarray, centroids: np.ndarray, c_norms: np.ndarray,
                rows: np.ndarray, lists: np.ndarray) -> np.ndarray:
    dots = np.einsum("nd,nd->n", x[rows], centroids[lists])
    return np.maximum(x_norms[rows] + c_norms[lists] - 2.0 * dots, 0.0)


def replicate_boundary(x: np.ndarray, centroids: np.ndarray, primary: np.ndarray, *, max_replicas: int = 4,
                       candidates: int = 16, closure: float = 1.5, rng_factor: float = 1.0,
                       metric: str = "l2") -> np.ndarray:
    """Return ``(n, max_replicas)`` int64 list numbers per vector, ``-1`` padded.

    Column 0 is ``primary`` (the list the partition gave the vector); later columns are
    the replicas chosen by the closure and RNG rules, nearest first. ``rng_factor``
    scales the RNG test (``d(c_j, c_i) < rng_factor * d(x, c_i)`` rejects): 1.0 is
    SPANN's rule; smaller values let more replicas through, which long lists in high
    dimensions need (their centroids sit much closer to each other than to members).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    primary = np.asarray(primary, dtype=np.int64)
    n = x.shape[0]
    if primary.shape != (n,):
        raise InvalidArgument(f"primary must have shape ({n},), got {primary.shape}")
    if max_replicas < 1:
        raise InvalidArgument(f"max_replicas must be >= 1, got {max_replicas}")
    if closure < 1.0:
        raise InvalidArgument(f"closure must be >= 1.0, got {closure}")
    chosen = np.full((n, max_replicas), -1, dtype=np.int64)
    chosen[:, 0] = primary
    if max_replicas == 1 or centroids.shape[0] == 1:
        return chosen

    x_norms = np.einsum("nd,nd->n", x, x)
    c_norms = np.einsum("nd,nd->n", centroids, centroids)
    all_rows = np.arange(n)
    d_primary = _squared_l2(x, x_norms, centroids, c_norms, all_rows, primary)
    _, ranked = assign_nearest(x, centroids, metric="l2", k=min(candidates, centroids.shape[0]))
    count = np.ones(n, dtype=np.int64)
    active = all_rows
    for rank in range(ranked.shape[1]):
        if active.size == 0:
            break
        lists = ranked[active, rank]
        d_list = _squared_l2(x, x_norms, centroids, c_norms, active, lists)
        within = d_list <= closure * d_primary[active]
        # Candidates are sorted by distance: once the closure fails it fails for every later rank.
        active, lists, d_list = active[within], lists[within], d_list[within]
        take = lists != primary[active]
        for slot in range(max_replicas - 1):
            taken = chosen[active, slot]
            has = taken >= 0
            if not has.any():
                break
            gap = np.full(active.size, np.inf, dtype=np.float32)
            rows = np.nonzero(has)[0]
            diff = centroids[taken[rows]] - centroids[lists[rows]]
            gap[rows] = np.einsum("nd,nd->n", diff, diff)
            take &= ~(has & (gap < rng_factor * d_list))
        rows = active[take]
        chosen[rows, count[rows]] = lists[take]
        count[rows] += 1
        active = active[count[active] < max_replicas]
    return chosen


def group_posting_lists(assignments: np.ndarray, nlist: int):
    """Group vector rows by list: return ``(offsets (nlist + 1,), rows (total,))`` (CSR).

    ``rows[offsets[i]:offsets[i + 1]]`` are the row numbers stored in list ``i``, in
    ascending order; ``-1`` entries of ``assignments`` are skipped.
    """
    assignments = np.asarray(assignments, dtype=np.int64)
    if assignments.ndim == 1:
        assignments = assignments[:, None]
    rows = np.broadcast_to(np.arange(assignments.shape[0])[:, None], assignments.shape)
    mask = assignments >= 0
    lists, members = assignments[mask], rows[mask]
    order = np.lexsort((members, lists))
    offsets = np.zeros(nlist + 1, dtype=np.int64)
    np.cumsum(np.bincount(lists, minlength=nlist), out=offsets[1:])
    return offsets, members[order]
