"""Exact rerank and top-k merging: pure, vectorised over queries and candidates.

Candidates from the code scan arrive as internal rows ``(nq, c)``, ``-1`` padded, with
replicas (a boundary vector is stored in several lists, so it can come back more than
once) and tombstoned rows among them. :func:`rerank` drops both, computes exact
distances from full-precision vectors and keeps the best ``k``. Distances are always
"smaller is better": squared L2 for ``"l2"``, negative inner product for ``"ip"``.
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np

__all__ = ["rerank", "exact_candidates", "merge_topk", "exact_distances", "top_unique"]


def exact_distances(xq: np.ndarray, vectors: np.ndarray, metric: str) -> np.ndarray:
    """Distances between each query ``(nq, d)`` and its candidates ``(nq, c, d)``."""
    dots = np.einsum("qcd,qd->qc", vectors, xq)
    if metric == "l2":
        return np.einsum("qcd,qcd->qc", vectors, vectors) - 2.0 * dots + np.einsum("qd,qd->q", xq, xq)[:, None]
    return -dots


def _top(distances: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` columns per row, sorted; rows with infinite distance become -1."""
    nq, width = distances.shape
    line = np.arange(nq)[:, None]
    if width > k:
        part = np.argpartition(distances, k - 1, axis=1)[:, :k]
        distances, rows = distances[line, part], rows[line, part]
    order = np.argsort(distances, axis=1, kind="stable")
    distances, rows = distances[line, order], rows[line, order]
    rows[np.isinf(distances)] = -1
    if width < k:
        distances = np.pad(distances, ((0, 0), (0, k - width)), constant_values=np.inf)
        rows = np.pad(rows, ((0, 0), (0, k - width)), constant_values=-1)
    return distances, rows


_PAST = np.iinfo(np.int64).max


def rerank(xq: np.ndarray, rows: np.ndarray, k: int, *, live: np.ndarray | None, metric: str,
           vectors: np.ndarray | None = None,
           read_vectors: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of candidate ``rows``: ``(distances (nq, k), rows (nq, k))``, inf / -1 padded.

    Give the resident ``vectors`` (float32 C-contiguous, indexed by row) or
    ``read_vectors(unique_rows)``. ``live`` must cover every row that can appear; ``None``
    when every row is live (no tombstone check). The distances are computed by faiss's
    ``knn_*_by_idx`` kernels (~3 us for 40 candidates of 384 dims), which stop at the first
    -1 of a row: valid candidates go first.
    """
    rows = np.sort(rows, axis=1)
    bad = rows < 0
    bad[:, 1:] |= rows[:, 1:] == rows[:, :-1]
    if live is not None:
        rows[bad] = 0
        bad |= ~live[rows]
    rows[bad] = _PAST
    rows.sort(axis=1)
    rows[rows == _PAST] = -1
    if vectors is None:
        wanted = np.unique(rows[rows >= 0])
        vectors = read_vectors(wanted) if wanted.size else np.zeros((1, xq.shape[1]), np.float32)
        local = np.where(rows >= 0, np.searchsorted(wanted, rows), -1)
    else:
        wanted, local = None, rows
    nq, width = rows.shape
    kk = min(k, width)
    distances = np.empty((nq, kk), dtype=np.float32)
    found = np.empty((nq, kk), dtype=np.int64)
    kernel = faiss.knn_L2sqr_by_idx if metric == "l2" else faiss.knn_inner_products_by_idx
    local = np.ascontiguousarray(local)
    kernel(faiss.swig_ptr(xq), faiss.swig_ptr(vectors), faiss.swig_ptr(local), xq.shape[1], nq, vectors.shape[0],
           width, kk, faiss.swig_ptr(distances), faiss.swig_ptr(found), width)
    missing = found < 0
    if metric != "l2":
        np.negative(distances, out=distances)
    distances[missing] = np.inf
    if wanted is not None:
        found = np.where(missing, -1, wanted[np.maximum(found, 0)] if wanted.size else -1)
    if kk < k:
        distances = np.pad(distances, ((0, 0), (0, k - kk)), constant_values=np.inf)
        found = np.pad(found, ((0, 0), (0, k - kk)), constant_values=-1)
    return distances, found


def exact_rows(xq: np.ndarray, rows: np.ndarray, k: int, *, metric: str, vectors: np.ndarray,
               shift: np.float32 | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` among the same distinct, live ``rows`` for every query (resident vectors).

    The lean form of :func:`rerank` for a filter's or a tenant's few rows: no sort, no
    duplicate or tombstone check, one faiss ``knn_*_by_idx`` call (one query reads
    ``rows`` in place). Rows past ``len(rows)`` are padded with -1 / inf. ``shift``
    (inner-product metrics): distances are ``shift - score`` instead of ``-score``
    (``1 - cosine`` in one pass).
    """
    nq, width = xq.shape[0], rows.size
    if rows.dtype != np.int64 or not rows.flags.c_contiguous:
        rows = np.ascontiguousarray(rows, dtype=np.int64)
    idx = rows if nq == 1 else np.ascontiguousarray(np.broadcast_to(rows, (nq, width)))
    return _knn_by_idx(xq, idx, width, k, metric, vectors, shift, padded=False)


def exact_candidates(xq: np.ndarray, rows: np.ndarray, k: int, *, metric: str, vectors: np.ndarray,
                     shift: np.float32 | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of each query's own candidate ``rows`` ``(nq, c)``: distinct, live, the
    -1 padding last (as a faiss IVF search returns them). The lean form of :func:`rerank`
    (no sort, no duplicate or tombstone pass): one ``knn_*_by_idx`` call. ``shift`` as for
    :func:`exact_rows`."""
    return _knn_by_idx(xq, np.ascontiguousarray(rows, dtype=np.int64), rows.shape[1], k, metric, vectors, shift,
                       padded=True)


def _knn_by_idx(xq, idx, width, k, metric, vectors, shift, *, padded: bool):
    """One faiss ``knn_*_by_idx`` call over ``idx`` (``width`` rows a query, C-contiguous int64):
    ``(distances, rows)`` ``(nq, k)``, -1 / inf padded; ``padded``: ``idx`` may end in -1s."""
    nq = xq.shape[0]
    kk = min(k, width)
    if kk == k:  # the usual case: the kernel fills the outputs
        distances, found = np.empty((nq, k), np.float32), np.empty((nq, k), np.int64)
    else:
        distances, found = np.full((nq, k), np.inf, np.float32), np.full((nq, k), -1, np.int64)
    if kk:
        out_d, out_i = (distances, found) if kk == k else (np.empty((nq, kk), np.float32), np.empty((nq, kk), np.int64))
        kernel = faiss.knn_L2sqr_by_idx if metric == "l2" else faiss.knn_inner_products_by_idx
        kernel(faiss.swig_ptr(xq), faiss.swig_ptr(vectors), faiss.swig_ptr(idx), xq.shape[1], nq,
               vectors.shape[0], width, kk, faiss.swig_ptr(out_d), faiss.swig_ptr(out_i), width)
        if metric != "l2":
            if shift is None:
                np.negative(out_d, out=out_d)
            else:
                np.subtract(shift, out_d, out=out_d)
        if padded:  # the kernel stops at a row's first -1: the slots it did not fill say -1
            missing = out_i < 0
            if missing.any():
                out_d[missing] = np.inf
        if kk < k:
            distances[:, :kk], found[:, :kk] = out_d, out_i
    return distances, found


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge ``(distances, rows)`` results of the same queries into one top-``k`` (exactly ``k`` wide)."""
    if len(parts) == 1 and parts[0][0].shape[1] == k:
        return parts[0]
    distances = np.concatenate([d for d, _ in parts], axis=1)
    rows = np.concatenate([r for _, r in parts], axis=1)
    return _top(distances, rows, k)


def top_unique(distances: np.ndarray, rows: np.ndarray, k: int, live: np.ndarray):
    """Top-``k`` by given distances, dropping replicas and tombstones (search with ``rerank=0``)."""
    rows = rows.copy()
    distances = distances.astype(np.float32, copy=True)
    srt = np.argsort(rows, axis=1, kind="stable")
    r = np.take_along_axis(rows, srt, 1)
    dup = np.zeros_like(r, dtype=bool)
    dup[:, 1:] = r[:, 1:] == r[:, :-1]
    bad_sorted = dup | (r < 0)
    bad = np.empty_like(bad_sorted)
    np.put_along_axis(bad, srt, bad_sorted, 1)
    bad |= ~live[np.maximum(rows, 0)]
    distances[bad] = np.inf
    return merge_topk([(distances, rows)], k)
