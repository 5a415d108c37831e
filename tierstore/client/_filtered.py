"""Filtered search of a collection: attribute columns, the planner and its two plans.

A filter (:mod:`tierstore.index.filters`) is evaluated over the collection's resident
attribute columns into a mask of matching live rows *before* any vector is scored; the
planner then picks, from the exact match count:

* ``"exact"`` - few matches (at most ``max(1024, 8 x candidates)``, or no index yet):
  every matching row is compared exactly (faiss ``knn_*_by_idx`` over the matches). The
  result is the exact filtered top-k.
* ``"filtered_ivf"`` - more matches: each query takes its lists in centroid order until
  they hold enough matching rows (:meth:`SpannIndex.probe_filtered`: per-list match
  counts from the row table, so one pass always yields ``min(k, matches)`` results), the
  code scan scores only matching rows (a faiss ``IDSelectorBitmap`` inside the scan),
  and the candidates are reranked exactly. Broad filters keep ``nprobe`` lists: this is
  the unfiltered search with non-matching rows skipped, so no post-filter pass is needed.

Unindexed rows (the exact delta) are searched through the same mask. ``res.stats``
names the plan, the match count and the lists probed; ``explain=True`` adds the parsed
filter and the planner's limits.
"""

from __future__ import annotations

import json
from typing import Any

import faiss
import numpy as np

from ..index.filters import AttributeColumns, parse_filter
from ..index.rerank import exact_rows, merge_topk, rerank
from ..index.selection import RowSelection
from .results import SearchResult

TENANTS = "__tenants"  # the hidden keywords column of tenant memberships

__all__ = ["FilteredSearch", "EXACT_MIN"]

EXACT_MIN = 1024
# Measured on manpages (bench/filters.py): with filters correlated with the vectors (a man
# section, a few pages) the filtered neighbours sit in lists far from the query; probing
# until the lists hold 8x the candidates, and reranking at least 8k, lifts recall@10
# from 0.62-0.66 to 0.88-0.94 for ~1.5x the time.
TARGET_FACTOR = 8  # matching rows the probed lists must hold, in multiples of the candidates
MIN_RERANK = 8     # filtered searches rerank at least this many candidates per result
_MASK_CACHE = 32  # filters whose match masks are kept (a tenant or section filter repeats)


class _Matches:
    """The live rows a search may return (a filter's, a tenant's, or both), and what the plans derive from them."""

    def __init__(self, predicate, rows: np.ndarray, indexed: int, live_total: int) -> None:
        self.predicate = predicate
        self.selectivity = rows.size / max(live_total, 1)
        self.rows = rows                      # sorted row numbers
        self.count = int(rows.size)
        split = int(np.searchsorted(rows, indexed))
        self.in_index = rows[:split]          # rows the index holds
        self.delta = rows[split:] - indexed   # rows of the exact delta, as its local ids
        self.indexed = indexed
        self.per_list: np.ndarray | None = None
        self._selection: RowSelection | None = None

    def selection(self) -> RowSelection:
        if self._selection is None:
            self._selection = RowSelection.from_rows(self.in_index, self.indexed)
        return self._selection

    @property
    def nbytes(self) -> int:
        extra = self._selection.nbytes if self._selection is not None else 0
        return self.rows.nbytes + (self.per_list.nbytes if self.per_list is not None else 0) + extra


class FilteredSearch:
    """Filtered search methods of :class:`~.collection.Collection` (uses its state)."""

    @property
    def _column_schema(self) -> dict[str, str]:
        """The user's attributes plus the hidden tenant column."""
        return {**self.settings["attributes"], TENANTS: "keywords"}

    def _attribute_columns(self) -> AttributeColumns:
        """Columns of every row's attributes, built on first use, then extended in batches."""
        if self._columns is None:
            key, self._columns_source = self._columns_source, None
            stored = AttributeColumns.from_bytes(self.tier.get(key), source=key) if key else None
            if stored is not None and len(stored) == self.vectors.rows and stored.schema == self._column_schema:
                self._columns = stored.append(list(self._delta_attrs)) if self._delta_attrs else stored
            else:
                stored = self.vectors.attributes() if self.vectors.rows else []
                self._columns = AttributeColumns.build(self._column_schema, stored + list(self._delta_attrs))
            self._columns_pending = []
        elif self._columns_pending:
            self._columns = self._columns.append(self._columns_pending)
            self._columns_pending = []
        return self._columns

    def _columns_append(self, attributes: list) -> None:
        """Note new rows' attributes (folded into the columns by the next filtered search)."""
        if self._columns is not None:
            self._columns_pending.extend(attributes)

    def _fresh_caches(self) -> None:
        """Drop memoised row sets when rows changed since they were made."""
        epoch = (self.rows.n, self._rows_epoch)
        if self._match_cache_epoch != epoch:
            self._match_cache.clear()
            self._tenant_cache.clear()
            self._tenant_postings = None
            self._match_cache_epoch = epoch

    def _matches(self, filter_spec: Any) -> _Matches:
        """The rows matching ``filter_spec``, memoised per filter until rows change."""
        key = _filter_key(filter_spec)
        self._fresh_caches()
        found = self._match_cache.get(key) if key is not None else None
        if found is None:
            predicate = parse_filter(filter_spec, self.settings["attributes"])
            mask = predicate.evaluate(self._attribute_columns()) & self.rows.live
            found = _Matches(predicate, np.flatnonzero(mask), self._indexed_rows, self.rows.count())
            if key is not None:
                self._match_cache[key] = found
                while len(self._match_cache) > _MASK_CACHE:
                    self._match_cache.popitem(last=False)
        else:
            self._match_cache.move_to_end(key)
        return found

    def _search_filtered(self, xq: np.ndarray, k: int, sp, filter_spec: Any, explain: bool) -> SearchResult:
        return self._search_matches(xq, k, sp, self._matches(filter_spec), explain)

    def _search_matches(self, xq: np.ndarray, k: int, sp, found: _Matches, explain: bool) -> SearchResult:
        """The top ``k`` among ``found``'s rows: the exact plan or the widened filtered IVF."""
        matches = found.count
        candidates = k * max(sp.rerank, MIN_RERANK)
        exact_limit = max(EXACT_MIN, 8 * candidates)
        indexed = self._indexed_rows
        stats: dict[str, Any] = {"matches": matches, "selectivity": found.selectivity}
        parts = []
        stats["plan"] = "exact"
        if found.in_index.size:
            if self.index is None or matches <= exact_limit:
                rows, vectors = found.in_index, self.vectors.resident
                if vectors is not None:
                    parts.append(exact_rows(xq, rows, k, metric=self._index_metric, vectors=vectors))
                else:
                    parts.append(self._rerank(xq, np.broadcast_to(rows, (xq.shape[0], rows.size)).copy(), k))
            else:
                stats["plan"] = "filtered_ivf"
                if found.per_list is None:
                    found.per_list = np.bincount(self.rows.row_list[found.in_index],
                                                 minlength=self.index.directory.nlist).astype(np.int32)
                coarse, lists = self.index.probe_filtered(xq, sp.nprobe, found.per_list,
                                                          TARGET_FACTOR * candidates)
                _, rows = self.index.scan(xq, coarse, lists, candidates, allowed=found.selection())
                parts.append(self._rerank(xq, rows, k))  # always exact: the candidates are few
                stats["lists_probed"] = int((lists >= 0).sum())
        if found.delta.size and self._flat.ntotal:
            parts.append(self._flat_filtered(xq, k, found.delta))
        if explain:
            stats["explain"] = {"filter": str(found.predicate), "exact_limit": exact_limit, "candidates": candidates,
                                "nprobe": sp.nprobe, "indexed_rows": indexed, "delta_rows": int(self._flat.ntotal)}
        if not parts:
            return SearchResult(np.full((xq.shape[0], k), -1, np.int64),
                                np.full((xq.shape[0], k), np.inf, np.float32), stats)
        distances, rows = merge_topk(parts, k)
        ids = self.rows.ids_full[rows]
        if self.metric == "cosine":
            distances = distances + 1.0
        return SearchResult(ids, distances.astype(np.float32, copy=False), stats)

    def _rerank(self, xq: np.ndarray, rows: np.ndarray, k: int):
        vectors = self.vectors.resident
        return rerank(xq, rows, k, live=None, metric=self._index_metric, vectors=vectors,
                      read_vectors=None if vectors is not None else self.vectors.read_rows)

    def _flat_filtered(self, xq: np.ndarray, k: int, local: np.ndarray):
        selector = faiss.IDSelectorBatch(local.size, faiss.swig_ptr(np.ascontiguousarray(local, dtype=np.int64)))
        params = faiss.SearchParameters(sel=selector)
        scores, found = self._flat.search(xq, min(k, self._flat.ntotal), params=params)
        rows = np.where(found >= 0, found + self._indexed_rows, -1)
        distances = scores if self._index_metric == "l2" else -scores
        return np.where(rows >= 0, distances, np.inf).astype(np.float32), rows


def _filter_key(filter_spec: Any) -> str | None:
    try:
        return json.dumps(filter_spec, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return None  # not plain JSON: parse_filter says what is wrong
