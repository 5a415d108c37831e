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
  code scan scores only matching rows and the candidates are reranked exactly. Broad
  filters keep ``nprobe`` lists: this is the unfiltered search with non-matching rows
  skipped, so no post-filter pass is needed. How the lists are scored
  (``res.stats["scoring"]``): ``"compact_codes"``, a repeated filter's compacted lists
  (its own rows' codes only, :func:`~tierstore.index.selection.compact_scanner`, within
  a memory budget); ``"codes"``, the whole lists with a faiss ``IDSelectorBitmap``; for
  a tenant spread thinly over the lists, ``"exact"``: its rows in each probed list,
  scored exactly (Curator's short lists).

Unindexed rows (the exact delta) are searched through the same mask. ``res.stats``
names the plan, the match count and the lists probed; ``explain=True`` adds the parsed
filter and the planner's limits.
"""

from __future__ import annotations

import json
import math
from typing import Any

import faiss
import numpy as np

from ..index.filters import AttributeColumns, parse_filter
from ..index.params import MAX_K, SearchParams, search_params
from ..index.rerank import exact_rows, merge_topk, rerank
from ..index.selection import RowSelection, compact_scanner
from .results import SearchResult

TENANTS = "__tenants"  # the hidden keywords column of tenant memberships

__all__ = ["FilteredSearch", "EXACT_MIN"]

EXACT_MIN = 1024
_DEFAULT_SEARCH = SearchParams()
# Measured on manpages (bench/filters.py): with filters correlated with the vectors (a man
# section, a few pages) the filtered neighbours sit in lists far from the query; probing
# until the lists hold 8x the candidates, and reranking at least 8k, lifts recall@10
# from 0.62-0.66 to 0.88-0.94 for ~1.5x the time. With compacted lists (a repeated filter
# scans only its own rows' codes) a wider probe costs little: 16x lifts recall@10 further
# (section 7: 0.88 -> 0.95; 3.7% and 10% filters: 0.95-0.97 -> 0.99) at the same latency.
TARGET_FACTOR = 16  # matching rows the probed lists must hold, in multiples of the candidates
# A tenant's lists are scored without compaction (memory budget), so they keep the narrower
# probe: exact scoring of its rows in each probed list costs in proportion to the rows.
TENANT_TARGET_FACTOR = 8
MIN_RERANK = 8     # filtered searches rerank at least this many candidates per result
_MASK_CACHE = 32  # filters whose match masks are kept (a tenant or section filter repeats)
# Scoring a tenant's row exactly (its full vector; a build lays a tenant's rows out
# together, so they stream) costs about as much as code-scanning this many list rows
# (pq4fs fast-scan reads whole lists, matching or not, then reranks): measured on
# bench/tenants.py (~36 ns a row exactly, ~6 ns a list row by codes, 384 dimensions).
EXACT_ROW_COST = 6
# A tenant is scanned exactly up to this many candidates' worth of rows (2,560 at k=10):
# below it the exact scan (~36 ns a row) costs no more than probing and scoring the lists
# that hold TENANT_TARGET_FACTOR x the candidates (measured on bench/tenants.py).
TENANT_EXACT_FACTOR = 32
# With the vectors in the tier (memory_cache set) an exact scan reads every row's vector on
# every query, so only a tenant of up to this many candidates' worth of rows (640 at k=10,
# ~1 MB at 384 dimensions) is scanned exactly; a larger one searches its own IVF, whose codes
# stay in memory and whose rerank reads only the candidates (measured on manpages over LMDB:
# a 1,965-row tenant took 10.6 ms exactly).
TIERED_TENANT_EXACT_FACTOR = 8
# A memoised filter keeping at most this share of the rows gets compacted lists (only its
# rows' codes) on its second search; all compacted lists together stay within
# COMPACT_BUDGET x the index's list bytes.
COMPACT_SELECTIVITY = 0.25
COMPACT_BUDGET = 0.5


class _Matches:
    """The live rows a search may return (a filter's, a tenant's, or both), and what the plans derive from them."""

    def __init__(self, predicate, rows: np.ndarray, indexed: int, live_total: int) -> None:
        self.predicate = predicate
        self.selectivity = rows.size / max(live_total, 1)
        self.rows = np.ascontiguousarray(rows, dtype=np.int64)  # sorted row numbers
        self.count = int(rows.size)
        split = int(np.searchsorted(self.rows, indexed))
        self.in_index = self.rows[:split]     # rows the index holds
        self.delta = self.rows[split:] - indexed  # rows of the exact delta, as its local ids
        self.indexed = indexed
        self.per_list: np.ndarray | None = None
        self._selection: RowSelection | None = None
        self.searches = 0                     # filtered-IVF searches over these rows (compaction pays on repeats)
        self.compactable = True               # a tenant's rows are not: the tenant index keeps to its budget
        self.tenant: str | None = None        # a tenant's whole row set (no filter): may get its own IVF
        self.uncovered: tuple | None = None   # (local IVF, rows of these it does not hold)
        self.ivf_looked = False               # whether the durable tier was asked for the tenant's IVF
        self.compact: tuple | None = None     # (index, scanner, nbytes): lists holding only these rows' codes
        self.row_lists: np.ndarray | None = None  # each of in_index's primary list (with per_list)

    def selection(self) -> RowSelection:
        if self._selection is None:
            self._selection = RowSelection.from_rows(self.in_index, self.indexed)
        return self._selection

    @property
    def nbytes(self) -> int:
        extra = self._selection.nbytes if self._selection is not None else 0
        if self.row_lists is not None:
            extra += self.row_lists.nbytes
        if self.compact is not None:
            extra += self.compact[2]
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
        """Drop memoised row sets when rows changed since they were made.

        Rows change when they are added or die (``rows.n``, ``_rows_epoch``) and when a
        checkpoint folds the delta into the index (``_checkpoint``, ``_indexed_rows``): a
        memoised row set splits its rows at the indexed count and groups them by list.
        """
        epoch = (self.rows.n, self._rows_epoch, self._checkpoint, self._indexed_rows)
        if self._match_cache_epoch != epoch:
            self._match_cache.clear()
            self._tenant_cache.clear()  # the tenant inverted index follows appends itself (tenants.py)
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

    def _query_args(self, x: object, k: object, params: dict):
        """:meth:`_search_args` with a shorter path for the common call: one float32 query of the
        collection's dimension, an int ``k``, default parameters (same checks, same result).

        A NaN or infinity in the query makes its squared norm non-finite, so that one dot
        product stands in for the element-wise check; anything unusual takes the full path.
        """
        if (type(k) is int and 0 < k <= MAX_K and type(x) is np.ndarray and x.dtype == np.float32
                and x.shape == (self.dim,)):
            square = float(x.dot(x))
            if 0.0 < square < math.inf:  # False for NaN too
                sp = search_params(params) if params else _DEFAULT_SEARCH
                if self.metric != "cosine":
                    return np.ascontiguousarray(x[None, :]), k, sp
                return (x / math.sqrt(square)).reshape(1, -1), k, sp
        return self._search_args(x, k, params)

    def _search_filtered(self, xq: np.ndarray, k: int, sp, filter_spec: Any, explain: bool) -> SearchResult:
        return self._search_matches(xq, k, sp, self._matches(filter_spec), explain)

    def _exact_limit(self, found: _Matches, candidates: int) -> int:
        """The most matching rows the exact plan scans (more take an IVF plan)."""
        if found.compactable:
            return max(EXACT_MIN, 8 * candidates)
        if self.vectors.resident is None:  # a tiered collection: an exact scan reads every row's vector
            return TIERED_TENANT_EXACT_FACTOR * candidates
        return max(EXACT_MIN, TENANT_EXACT_FACTOR * candidates)

    def _search_matches(self, xq: np.ndarray, k: int, sp, found: _Matches, explain: bool, *,
                        tenant_ivf: bool = True) -> SearchResult:
        """The top ``k`` among ``found``'s rows: the exact plan or the widened filtered IVF
        (or a tenant's own IVF; ``tenant_ivf=False`` when the caller already asked for it)."""
        matches = found.count
        candidates = k * max(sp.rerank, MIN_RERANK)
        exact_limit = self._exact_limit(found, candidates)
        stats: dict[str, Any] = {"matches": matches, "selectivity": found.selectivity, "plan": "exact"}
        parts = []
        if found.in_index.size:
            if self.index is None or matches <= exact_limit:
                rows, vectors = found.in_index, self.vectors.resident
                if vectors is not None:
                    parts.append(exact_rows(xq, rows, k, metric=self._index_metric, vectors=vectors))
                else:
                    parts.append(self._rerank(xq, np.broadcast_to(rows, (xq.shape[0], rows.size)).copy(), k))
            else:
                local = self._tenant_ivf(found) if tenant_ivf and found.tenant is not None else None
                if local is not None:
                    stats["plan"] = "tenant_ivf"
                    stats["lists_probed"] = xq.shape[0] * min(sp.nprobe, local.nlist)
                    parts.append(self._tenant_ivf_search(xq, k, sp, found, local, candidates))
                else:
                    stats["plan"] = "filtered_ivf"
                    parts.append(self._filtered_ivf(xq, k, sp, found, candidates, stats))
        if found.delta.size and self._flat.ntotal:
            parts.append(self._flat_filtered(xq, k, found.delta))
        if explain:
            stats["explain"] = {"filter": str(found.predicate), "exact_limit": exact_limit, "candidates": candidates,
                                "nprobe": sp.nprobe, "indexed_rows": self._indexed_rows,
                                "delta_rows": int(self._flat.ntotal)}
        if not parts:
            return SearchResult(np.full((xq.shape[0], k), -1, np.int64),
                                np.full((xq.shape[0], k), np.inf, np.float32), stats)
        distances, rows = merge_topk(parts, k)
        ids = self.rows.ids_full[rows]
        if self.metric == "cosine":
            distances += np.float32(1.0)  # every part is a fresh array
        return SearchResult(ids, distances, stats)

    def _filtered_ivf(self, xq: np.ndarray, k: int, sp, found: _Matches, candidates: int, stats: dict):
        """Lists in centroid order until they hold enough matches; their matching rows scored.

        A filter's rows: the scan reads its compacted lists (only its rows' codes, see
        :meth:`_compact_lists`) when it has them, else the whole lists with a selector that
        skips the other rows; either way the same candidates, reranked exactly. A tenant's
        rows (no compacted lists: the tenant index keeps to its memory budget) spread thinly
        over the lists are instead scored exactly where that costs less than the scan: its
        rows whose primary list is probed (as Curator scans a tenant's short lists), no
        codes and no rerank. The probe counted matches by primary list, so these are at
        least ``min(target, matches)`` rows; a build lays a tenant's rows out together, list
        by list, so they are read as a few runs of memory.
        """
        index = self.index
        if found.per_list is None:
            found.row_lists = self.rows.row_list[found.in_index]
            found.per_list = np.bincount(found.row_lists, minlength=index.directory.nlist).astype(np.int32)
        factor = TARGET_FACTOR if found.compactable else TENANT_TARGET_FACTOR
        coarse, lists = index.probe_filtered(xq, sp.nprobe, found.per_list, factor * candidates)
        stats["lists_probed"] = int((lists >= 0).sum())
        found.searches += 1
        compact = self._compact_lists(found) if found.compactable else None
        if compact is not None:
            stats["scoring"] = "compact_codes"
            _, rows = compact.search_preassigned(xq, lists, coarse, candidates)
            return self._rerank(xq, rows, k)
        vectors = self.vectors.resident
        if not found.compactable and vectors is not None and index.cache_bytes is None:
            picked = lists[lists >= 0]
            if int(found.per_list[picked].sum()) * EXACT_ROW_COST < int(index.directory.count[picked].sum()):
                stats["scoring"] = "exact"
                return _exact_in_lists(xq, k, lists, found, self._index_metric, vectors)
        stats["scoring"] = "codes"
        _, rows = index.scan(xq, coarse, lists, candidates, allowed=found.selection())
        return self._rerank(xq, rows, k)  # always exact: the candidates are few

    def _compact_lists(self, found: _Matches):
        """The filter's compacted lists (:func:`compact_scanner`), built on its second search when
        it keeps at most ``COMPACT_SELECTIVITY`` of the rows and the budget allows; else ``None``.

        The budget (``COMPACT_BUDGET`` x the index's list bytes) covers every memoised
        filter's compacted lists; the least recently used filters give theirs up first.
        """
        index = self.index
        if found.compact is not None and found.compact[0] is index:
            return found.compact[1]
        if found.searches < 2 or found.selectivity > COMPACT_SELECTIVITY or index.cache_bytes is not None:
            return None
        budget = COMPACT_BUDGET * index.directory.total_bytes()
        estimate = found.selectivity * index.directory.total_bytes()
        held = [m for m in self._match_cache.values() if m.compact is not None and m is not found]
        used = sum(m.compact[2] for m in held)
        for older in held:  # least recently used first
            if used + estimate <= budget:
                break
            used -= older.compact[2]
            older.compact = None
        if used + estimate > budget:
            return None
        mask = np.zeros(found.indexed, bool)
        mask[found.in_index] = True
        built = compact_scanner(index, mask)
        if built is None:
            return None
        found.compact = (index, *built)
        return built[0]

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


def _exact_in_lists(xq: np.ndarray, k: int, lists: np.ndarray, found: _Matches, metric: str,
                    vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` per query among ``found``'s rows whose primary list it probes (``-1`` skipped).

    The rows come out ascending (a build lays a tenant's rows out together, list by list,
    so they are read as a few runs); the probe counted matches by primary list, so they
    are at least ``min(target, matches)``.
    """
    nq = xq.shape[0]
    if nq == 1:
        probed = np.zeros(found.per_list.size + 1, bool)  # the last slot takes the -1s
        probed[lists[0]] = True
        probed[-1] = False
        return exact_rows(xq, found.in_index[probed[found.row_lists]], k, metric=metric, vectors=vectors)
    probed = np.zeros((nq, found.per_list.size + 1), bool)
    probed[np.arange(nq)[:, None], lists] = True
    probed[:, -1] = False
    keep = probed[:, found.row_lists]
    per_query = keep.sum(axis=1)
    candidates = np.full((nq, max(int(per_query.max()), 1)), -1, np.int64)
    query_of, column = np.nonzero(keep)
    candidates[query_of, np.arange(query_of.size) - (np.cumsum(per_query) - per_query)[query_of]] = \
        found.in_index[column]
    return rerank(xq, candidates, k, live=None, metric=metric, vectors=vectors)


def _filter_key(filter_spec: Any) -> str | None:
    try:
        return json.dumps(filter_spec, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return None  # not plain JSON: parse_filter says what is wrong
