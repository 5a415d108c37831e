"""The row table of a collection: user id, liveness and primary list of every row.

Rows are the index's internal numbering (row ``r`` is the ``r``-th vector ever added
in this generation). Arrays grow by doubling, so adding in small batches stays
amortised O(1) per row. Looking up user ids uses a sorted copy of the ids at the last
checkpoint (``np.searchsorted``: 16 bytes per row, no per-id Python objects) plus a
dict of the ids added since, which a checkpoint folds in.
"""

from __future__ import annotations

import numpy as np

__all__ = ["RowTable"]


class RowTable:
    def __init__(self, ids: np.ndarray | None = None, live: np.ndarray | None = None,
                 row_list: np.ndarray | None = None) -> None:
        n = 0 if ids is None else int(ids.shape[0])
        cap = max(1024, n + 1)
        # The last slot is never used and holds id -1: ``_ids[rows]`` maps the -1 row padding
        # of search results to id -1 without a second pass.
        self._ids = np.full(cap, -1, np.int64)
        self._live = np.zeros(cap, bool)
        self._list = np.full(cap, -1, np.int32)
        if n:
            self._ids[:n], self._live[:n], self._list[:n] = ids, live, row_list
        self.n = n
        self._recent: dict[int, int] = {}
        self.reindex()

    # views of the used part (the live array is indexed by row in hot paths)
    @property
    def ids(self) -> np.ndarray:
        return self._ids[:self.n]

    @property
    def live(self) -> np.ndarray:
        return self._live[:self.n]

    @property
    def row_list(self) -> np.ndarray:
        return self._list[:self.n]

    @property
    def ids_full(self) -> np.ndarray:
        """The whole id buffer; its last entry is -1, so indexing it with row -1 gives id -1."""
        return self._ids

    @property
    def live_full(self) -> np.ndarray:
        """The whole live buffer (rows beyond ``n`` are False): safe to index with any row < capacity."""
        return self._live

    def count(self) -> int:
        return int(np.count_nonzero(self.live))

    def reindex(self) -> None:
        """Fold recent ids into the sorted lookup (at a checkpoint).

        When ids grow with rows (the common ``np.arange`` case) the id column itself is
        the sorted lookup and no copy is kept; otherwise a sorted copy (16 bytes a row).
        """
        self._recent = {}
        ids = self.ids
        if ids.size < 2 or bool((ids[1:] > ids[:-1]).all()):
            self._sorted_ids, self._sorted_rows = ids, None
            return
        rows = np.flatnonzero(self.live)
        order = np.argsort(ids[rows], kind="stable")
        self._sorted_ids, self._sorted_rows = ids[rows][order], rows[order]

    def lookup_bytes(self) -> int:
        """Memory of the row table and its lookup."""
        extra = 0 if self._sorted_rows is None else self._sorted_ids.nbytes + self._sorted_rows.nbytes
        return self._ids.nbytes + self._live.nbytes + self._list.nbytes + extra

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Live row of each id, -1 where absent."""
        pos = np.searchsorted(self._sorted_ids, ids)
        pos = np.minimum(pos, max(self._sorted_ids.size - 1, 0))
        rows = np.full(ids.shape, -1, np.int64)
        if self._sorted_ids.size:
            hit = self._sorted_ids[pos] == ids
            rows[hit] = pos[hit] if self._sorted_rows is None else self._sorted_rows[pos[hit]]
            found = rows >= 0
            rows[found] = np.where(self._live[rows[found]], rows[found], -1)
        if self._recent:
            for i, key in enumerate(ids.tolist()):
                row = self._recent.get(key)
                if row is not None:
                    rows[i] = row
        return rows

    def append(self, ids: np.ndarray) -> np.ndarray:
        """Add live rows for ``ids``; return their row numbers."""
        start, stop = self.n, self.n + ids.size
        if stop + 1 > self._ids.size:
            cap = max(stop + 1, 2 * self._ids.size)
            self._ids = np.concatenate([self._ids, np.full(cap - self._ids.size, -1, np.int64)])
            self._live = np.concatenate([self._live, np.zeros(cap - self._live.size, bool)])
            self._list = np.concatenate([self._list, np.full(cap - self._list.size, -1, np.int32)])
        self._ids[start:stop] = ids
        self._live[start:stop] = True
        self.n = stop
        self._recent.update(zip(ids.tolist(), range(start, stop)))
        return np.arange(start, stop, dtype=np.int64)

    def kill(self, rows: np.ndarray) -> None:
        self._live[rows] = False
        if self._recent:
            for key in self._ids[rows].tolist():
                self._recent.pop(key, None)
