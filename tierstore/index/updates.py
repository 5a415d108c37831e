"""Updates without a rebuild: SPFresh's LIRE over a :class:`~.spann.SpannIndex`'s lists.

:meth:`ListUpdates.update` folds a checkpoint's inserts and deletes into the posting lists:

* new rows go to their nearest list and its RNG-rule replicas;
* tombstones are filtered at search time and purged lazily: a list is rewritten without
  its dead rows once they are a tenth of it (SPFresh's garbage collection);
* a list longer than ``max_list_size`` is split by 2-means into a spare list slot, and
  the vectors of it and its nearest neighbours are reassigned among them (LIRE);
* a list under a quarter of ``target_list_size`` is retired and its vectors reassigned
  to its neighbours;
* every rewritten list's centroid moves to the mean of its own vectors.

Only the lists touched are re-encoded and written, as new segments.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .clustering import assign_nearest, two_means
from .postings import fetch_lists, list_bytes, write_segments
from .replication import replicate_boundary

__all__ = ["ListUpdates"]

_NEIGHBOURS = 8
ReadVectors = Callable[[np.ndarray], np.ndarray]


class ListUpdates:
    """The update half of :class:`~.spann.SpannIndex` (a mixin: it uses the index's state)."""

    def list_members(self, list_nos: np.ndarray) -> dict[int, np.ndarray]:
        """Rows stored in each list (fetched from the tier)."""
        fetched, _ = fetch_lists(self.tier, self.directory, np.asarray(list_nos, dtype=np.int64))
        return {list_no: ids.copy() for list_no, (ids, _codes) in fetched.items()}

    def _nearest_active(self, x: np.ndarray, k: int = 1) -> np.ndarray:
        return self._slot_coarse.search(np.ascontiguousarray(x, dtype=np.float32), min(k, self.active_lists.size))[1]

    def update(self, new_rows: np.ndarray, new_x: np.ndarray, dead_rows: np.ndarray, row_list: np.ndarray,
               live: np.ndarray, read_vectors: ReadVectors) -> dict:
        """Fold inserts and deletes into the lists (LIRE); return what changed.

        ``row_list`` (each row's primary list) is updated in place; ``live`` marks rows
        that exist. ``read_vectors(rows)`` returns full-precision vectors.
        """
        params = self.params
        limit, floor = params.list_limit, max(1, params.target_list_size // 4)
        members: dict[int, np.ndarray] = {}

        def members_of(list_nos) -> None:
            need = [int(i) for i in list_nos if int(i) not in members]
            if need:
                members.update(self.list_members(np.asarray(need, dtype=np.int64)))
                for i in need:
                    members.setdefault(i, np.zeros(0, dtype=np.int64))

        touched: set[int] = set()
        if new_rows.size:
            lists = self._replicate(new_x, self.active_lists)
            row_list[new_rows] = lists[:, 0]
            members_of(np.unique(lists[lists >= 0]))
            for list_no in np.unique(lists[lists >= 0]).tolist():
                add = new_rows[(lists == list_no).any(axis=1)]
                members[list_no] = np.concatenate([members[list_no], add])
                touched.add(list_no)
        if dead_rows.size:
            # Tombstones are filtered at search time; a list is rewritten without its dead
            # rows only once they are a tenth of it (SPFresh's lazy garbage collection).
            # Primary lists are known; replicas were placed by the RNG rule, so the same rule
            # over the current centroids finds (nearly all of) the lists holding them.
            hits = np.concatenate([row_list[dead_rows],
                                   self._replicate(read_vectors(dead_rows), self.active_lists).ravel()])
            hits = hits[hits >= 0]
            self.dead += np.bincount(hits, minlength=self.dead.size)
            due = np.flatnonzero((self.dead > 0) & self.active
                                 & ((self.dead * 10 >= np.maximum(self.directory.count, 1))
                                    | (self.directory.count - self.dead < floor)))
            members_of(due)
            touched.update(due.tolist())
        for list_no in list(touched):
            rows = members[list_no]
            members[list_no] = np.unique(rows[live[rows]])

        splits = merges = 0
        for list_no in sorted(touched):
            if not self.active[list_no]:
                continue
            size = members[list_no].size
            if size > limit:
                spare = np.flatnonzero(~self.active & (self.directory.segment < 0))
                spare = spare[spare != list_no]
                if spare.size == 0:
                    continue  # no slot left: the list stays long until the next rebuild
                self._split(list_no, int(spare[0]), members, members_of, row_list, live, read_vectors)
                splits += 1
            elif size < floor and self.nlist > 1:
                self._merge(list_no, members, members_of, row_list, live, read_vectors)
                merges += 1
        changed = {i: rows for i, rows in members.items() if i in touched or not self.active[i] or i in self._moved}
        self._moved = set()
        self._rewrite(changed, read_vectors, row_list)
        if self._centroids_moved:
            self._centroids_moved = False
            self.scanner.refresh()
        return {"lists_rewritten": len(changed), "splits": splits, "merges": merges}

    def _replicate(self, x: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Lists (primary first, -1 padded) for rows ``x`` among the ``candidates`` list numbers."""
        local = self.centroids[candidates]
        nearest = assign_nearest(x, local, self.metric)[1][:, 0]
        p = self.params
        lists = replicate_boundary(x, local, nearest, max_replicas=p.max_replicas, closure=p.closure,
                                   rng_factor=p.rng_factor, metric=self.metric)
        return np.where(lists >= 0, candidates[np.maximum(lists, 0)], -1)

    def _region(self, centre: np.ndarray, exclude: int) -> np.ndarray:
        near = self._nearest_active(centre[None, :], _NEIGHBOURS + 1)[0]
        return near[(near >= 0) & (near != exclude)]

    def _repartition(self, region: np.ndarray, members: dict, members_of, row_list: np.ndarray, live: np.ndarray,
                     read_vectors: ReadVectors, extra: np.ndarray) -> None:
        """Reassign every row held by ``region`` lists (and ``extra`` rows) among those lists."""
        members_of(region)
        rows = np.unique(np.concatenate([extra] + [members[int(i)] for i in region]))
        rows = rows[live[rows]]
        x = read_vectors(rows)
        lists = self._replicate(x, region)
        for list_no in region.tolist():
            members[list_no] = rows[(lists == list_no).any(axis=1)]
            self._moved.add(list_no)
        own = np.isin(row_list[rows], region) | np.isin(rows, extra)
        row_list[rows[own]] = lists[own, 0]

    def _split(self, list_no: int, spare: int, members, members_of, row_list, live, read_vectors) -> None:
        rows = members[list_no]
        x = read_vectors(rows)
        halves = two_means(x, metric=self.metric, seed=self.params.seed + list_no)
        old = self.centroids[list_no].copy()
        self.centroids[list_no], self.centroids[spare] = halves[0], halves[1]
        self.active[spare] = True
        self.codes.set_centroids(np.array([list_no, spare]), self.centroids[[list_no, spare]])
        self._centroids_moved = True  # the scanner is rebuilt from the codec after the rewrite
        self._reset_coarse()
        members[spare] = np.zeros(0, dtype=np.int64)
        region = np.unique(np.concatenate([[list_no, spare], self._region(old, list_no)]))
        self._repartition(region, members, members_of, row_list, live, read_vectors, rows)

    def _merge(self, list_no: int, members, members_of, row_list, live, read_vectors) -> None:
        rows = members[list_no]
        self.active[list_no] = False
        self._reset_coarse()
        members[list_no] = np.zeros(0, dtype=np.int64)
        self._moved.add(list_no)
        region = self._region(self.centroids[list_no], list_no)
        self._repartition(region, members, members_of, row_list, live, read_vectors, rows)

    def _rewrite(self, changed: dict[int, np.ndarray], read_vectors: ReadVectors, row_list: np.ndarray) -> None:
        if not changed:
            return
        order = sorted(changed)
        rows_all = np.concatenate([changed[i] for i in order]) if order else np.zeros(0, np.int64)
        offsets = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum([changed[i].size for i in order], out=offsets[1:])
        x = read_vectors(rows_all) if rows_all.size else np.zeros((0, self.dim), np.float32)
        list_nos = np.repeat(np.asarray(order, dtype=np.int64), np.diff(offsets))
        self._recentre(x, rows_all, list_nos, row_list)
        encoded = self.codes.encode_lists(x, list_nos, offsets)
        stored, counts = {}, {}
        self.dead[order] = 0
        for j, list_no in enumerate(order):
            if changed[list_no].size == 0 or not self.active[list_no]:
                self.directory.segment[list_no] = -1
                self.directory.count[list_no] = 0
                self.directory.length[list_no] = 0
                continue
            stored[list_no] = list_bytes(changed[list_no], encoded[j])
            counts[list_no] = int(changed[list_no].size)
        keys = write_segments(self.tier, self.prefix, self.directory, stored, counts,
                              first_segment=self.next_segment, segment_bytes=self.params.segment_bytes,
                              key_suffix=self.key_suffix)
        self.next_segment += len(keys)
        for list_no in order:  # drop stale cached copies; memory mode reloads at once
            if self.loaded[list_no]:
                self.scanner.clear_list(list_no)
                self.loaded[list_no] = False
                size = self._lru.pop(list_no, None)
                if size is not None:
                    self._cached -= size
                    self._garbage += size
        if self.cache_bytes is None:
            self._load(np.asarray([i for i in order if i in stored], dtype=np.int64))

    def _recentre(self, x: np.ndarray, rows: np.ndarray, list_nos: np.ndarray, row_list: np.ndarray) -> None:
        """Move each rewritten list's centroid to the mean of its own (primary) vectors.

        Inserts and deletes drift a list away from where k-means put its centroid; the
        list is re-encoded here anyway, so its centroid follows its members (what one
        more k-means step would do), keeping residual codes small and probes accurate.
        """
        own = (row_list[rows] == list_nos) & self.active[list_nos]
        if not own.any():
            return
        owners = list_nos[own]
        order = np.argsort(owners, kind="stable")
        lists, starts, counts = np.unique(owners[order], return_index=True, return_counts=True)
        sums = np.add.reduceat(x[own][order].astype(np.float64), starts, axis=0)
        means = (sums / counts[:, None]).astype(np.float32)
        if self.metric == "ip":
            means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
        self.centroids[lists] = means
        self.codes.set_centroids(lists, means)
        self._centroids_moved = True
        self._reset_coarse()
