"""Checkpoints and builds of a collection: folding the WAL into stored state.

A checkpoint (:meth:`Checkpoints.flush`, every ``flush_rows`` pending rows and at
close) writes the delta's vectors as new chunks, folds inserts and deletes into the
index lists (:mod:`tierstore.index.updates`), writes the row table and the index's
resident state, commits a manifest (create-only), truncates the WAL and deletes what
the new state no longer names. :meth:`Checkpoints.build_index` rebuilds the index over
every live vector into a new generation. Mixed into :class:`~.collection.Collection`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import CommitConflict, InvalidArgument
from ..index.filters import AttributeColumns
from ..index.params import IndexParams
from ..index.spann import SpannIndex
from ..index.vectors import VectorStore
from ..store.blob import encode_blob
from ._filtered import TENANTS
from ._rows import RowTable

__all__ = ["Checkpoints"]


class Checkpoints:
    """Checkpoint and build methods of :class:`~.collection.Collection` (uses its state)."""

    def flush(self) -> None:
        """Fold the WAL into the stored state: vectors, index lists (LIRE), row table, manifest."""
        with self._lock:
            self._check_open()
            if not self._pending() and self._wal.last_lsn == self._manifest.state["wal_lsn"]:
                return
            self._claim_checkpoint()
            lsn = self._wal.last_lsn
            stats = {}
            if self.rows.n > self.vectors.rows:
                new_x = np.concatenate(self._delta_x)
                self.vectors.append(new_x, self._delta_attrs if any(a is not None for a in self._delta_attrs) else None)
                # Stored now: a commit that fails below must not make the next flush store them again.
                self._delta_x, self._delta_attrs = [], []
            if self.index is None and self.rows.count() >= self.auto_index_rows:
                self._build(self._index_params or IndexParams(), lsn)
                return
            try:
                if self.index is not None:
                    new_rows = np.arange(self._indexed_rows, self.rows.n, dtype=np.int64)
                    new_x = self.vectors.read_rows(new_rows) if new_rows.size else np.zeros((0, self.dim), np.float32)
                    dead = (np.unique(np.concatenate(self._dead_indexed)) if self._dead_indexed
                            else np.zeros(0, np.int64))
                    stats = self.index.update(new_rows, new_x, dead, self.rows._list, self.rows.live_full,
                                              self.vectors.read_rows)
                    self._indexed_rows = self.rows.n
                self._commit(lsn)
            except Exception:
                # A failed write (S3 down, say) after memory moved on: rebuild the search state
                # from what memory now holds; the WAL still covers everything, so the next
                # flush (or a reopen) commits it.
                self._reset_delta()
                raise
            self._last_update = stats

    def _claim_checkpoint(self) -> None:
        """Refuse, before writing a blob, a checkpoint whose base another writer has replaced.

        Its blobs would overwrite the keys the newer manifest names (the same generation
        and checkpoint numbers), and its commit would lose anyway.
        """
        self._check_writable()
        versions = self._log.versions()
        if versions and versions[-1] != self._manifest.version:
            raise CommitConflict(self._fence(f"another writer committed manifest version {versions[-1]} since this "
                                             f"handle loaded version {self._manifest.version}"))

    def _commit(self, lsn: int) -> None:
        self._checkpoint += 1
        rows_key = f"{self._gen_prefix}/rows-{self._checkpoint:06d}{self._key_suffix}"
        self.tier.put(rows_key, encode_blob({"kind": "row-table", "format": 1, "rows": self.rows.n}, sections={
            "ids": self.rows.ids, "live": self.rows.live.astype(np.uint8), "row_list": self.rows.row_list},
            align=64))
        index_key = None
        if self.index is not None:
            index_key = f"{self._gen_prefix}/meta-{self._checkpoint:06d}{self._key_suffix}"
            self.index.save(index_key)
        # The filter and tenant columns, so opening does not parse every chunk's JSON.
        attrs_key = f"{self._gen_prefix}/attrs-{self._checkpoint:06d}{self._key_suffix}"
        self.tier.put(attrs_key, self._attribute_columns().to_bytes())
        old = self._manifest.state
        state = {"settings": self.settings, "generation": self._gen, "checkpoint": self._checkpoint,
                 "index": index_key, "rows": rows_key, "vectors": self.vectors.state(), "wal_lsn": lsn,
                 "index_params": self._index_params.to_json() if self._index_params else None,
                 "attributes": attrs_key}
        try:
            self._manifest = self._log.commit(state, expected_version=self._manifest.version)
        except CommitConflict as exc:
            raise CommitConflict(self._fence(f"another writer committed first ({exc})")) from exc
        self._wal.truncate(lsn)
        self.rows.reindex()
        self._reset_delta(keep_flat=self.index is None and self._flat.ntotal == self.rows.n)
        self._collect_garbage(old)

    def _collect_garbage(self, old: Mapping) -> None:
        """Delete blobs the new state no longer names (after the commit: a crash only leaks)."""
        names = ("rows", "index", "attributes")
        kept = {self._manifest.state.get(name) for name in names}
        doomed = [old[name] for name in names if old.get(name) and old[name] not in kept]
        if int(old.get("generation", self._gen)) != self._gen:
            doomed = self.tier.list(f"{self.prefix}/g{int(old['generation']):06d}/")
        elif self.index is not None:
            live = self.index.live_segments()
            doomed += [k for k in self.tier.list(f"{self._gen_prefix}/seg/") if k not in live]
        for key in doomed:
            self.tier.delete(key)
        self._log.prune(keep=2)

    def build_index(self, *, progress: bool | None = None, **params: Any) -> dict:
        """(Re)build the index over every live vector; ``params`` are :class:`IndexParams` fields.

        Returns build statistics. Rows are compacted (deleted vectors dropped) into a new
        generation; the old one is deleted after the commit. ``progress`` shows a tqdm bar
        (default: for 100,000 vectors or more when stderr is a terminal).
        """
        with self._lock:
            self._check_open()
            index_params = IndexParams(**params)
            if self.rows.count() == 0:
                raise InvalidArgument(f"collection {self.name!r} is empty; add vectors before building an index")
            self._claim_checkpoint()
            return self._build(index_params, self._wal.last_lsn, progress)

    def _build(self, params: IndexParams, lsn: int, progress: bool | None = None) -> dict:
        started = time.perf_counter()
        live_rows = np.flatnonzero(self.rows.live)
        stored = live_rows[live_rows < self.vectors.rows]
        parts = [self.vectors.read_rows(stored)]
        if self._delta_x:
            delta = np.concatenate(self._delta_x)
            fresh = live_rows[live_rows >= self.vectors.rows]
            parts.append(delta[fresh - self.vectors.rows])
        x = np.concatenate(parts) if len(parts) > 1 else parts[0]
        attrs = self._all_attributes(live_rows)
        ids = self.rows.ids[live_rows]
        self._gen += 1
        self._checkpoint = 0
        index, assignment, order = SpannIndex.build(self.tier, self._gen_prefix, x, metric=self._index_metric,
                                                    params=params, cache_bytes=self.memory_cache,
                                                    coalesce_gap=self.db.coalesce_gap, progress=progress,
                                                    scan_device=self.db.scan_device, key_suffix=self._key_suffix,
                                                    group=_tenant_groups(attrs))
        x, ids = x[order], ids[order]
        attrs = None if attrs is None else [attrs[i] for i in order.tolist()]
        vectors = VectorStore(self.tier, self._gen_prefix, self.dim, coalesce_gap=self.db.coalesce_gap // 8,
                              key_suffix=self._key_suffix)
        vectors.append(x, attrs)
        self.vectors, self.index, self._index_params = vectors, index, params
        self.rows = RowTable(ids, np.ones(ids.size, bool), assignment.astype(np.int32))
        self._indexed_rows = self.rows.n
        # Rows were renumbered: the columns follow the new order (never an older generation's blob).
        self._columns = AttributeColumns.build(self._column_schema, attrs or [None] * ids.size)
        self._columns_pending, self._columns_source = [], None
        self._rows_epoch += 1
        if self.memory_cache is None:
            self.vectors.resident = x
        self._commit(lsn)
        return {"vectors": int(ids.size), "lists": index.nlist, "seconds": time.perf_counter() - started,
                "list_bytes": index.directory.total_bytes(), "quantizer": params.quantizer}

    def _all_attributes(self, rows: np.ndarray) -> list | None:
        stored = self.vectors.attributes() if self.vectors.rows else []
        every = stored + list(self._delta_attrs)
        if not any(a is not None for a in every):
            return None
        return [every[r] for r in rows.tolist()]


def _tenant_groups(attrs: list | None) -> np.ndarray | None:
    """Each row's first tenant as an int (rows of no tenant first), or ``None`` without tenants:
    the build then lays a tenant's rows out together (see :meth:`SpannIndex.build`)."""
    if attrs is None:
        return None
    firsts = [a[TENANTS][0] if a is not None and a.get(TENANTS) else "" for a in attrs]
    if not any(firsts):
        return None
    return np.unique(np.array(firsts, dtype=object), return_inverse=True)[1].astype(np.int64)
