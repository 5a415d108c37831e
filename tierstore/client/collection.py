"""A collection: vectors with ids, persisted with manifests and a WAL, searched by a SPANN index.

Storage under ``collections/<name>/`` in the database's tier::

    manifest/<n>            committed states (create-only; see store/manifest.py)
    wal/<lsn>               upserts and deletes since the last checkpoint
    g<gen>/vec/<chunk>      full-precision vectors and attributes of generation <gen>
    g<gen>/seg/<segment>    posting-list segments
    g<gen>/meta-<v>         the index's resident state at checkpoint <v>
    g<gen>/rows-<v>         the row table (ids, tombstones, primary lists) at checkpoint <v>

**Writes.** ``add`` and ``delete`` are appended to the WAL (durable when they return),
then applied in memory: new vectors join an exact *delta* that every search scans, so
they are found at once; deletes are tombstones. When the delta reaches
``flush_rows`` (and on :meth:`Collection.flush` / close) a checkpoint folds it into the
index without a global rebuild (LIRE, see :mod:`tierstore.index.updates`; checkpoints in
:mod:`._checkpoints`), writes the
new state, commits a manifest and truncates the WAL. Adding an id that exists replaces
its vector and attributes (upsert).

**Search.** Without an index (fewer than ``auto_index_rows`` vectors and no
:meth:`build_index`) search is exact. With one: probe the nearest lists, scan codes,
rerank ``rerank * k`` candidates exactly, merge with the exact delta. ``filter=`` runs the
filtered plans of :mod:`._filtered` (attribute columns, exact or widened filtered IVF).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import faiss
import numpy as np

from ..errors import (CorruptData, InvalidArgument, InvalidType, NotFound, StoreClosed, TierstoreError,
                      WriterConflict)
from ..index.filters import AttributeColumns
from ..index.params import MAX_K, IndexParams, SearchParams, search_params
from ..index.rerank import merge_topk, rerank, top_unique
from ..index.spann import SpannIndex
from ..index.vectors import VectorStore
from ..store.blob import decode_blob
from ..store._json import thaw_json
from ..store.manifest import ManifestLog
from ..store.wal import WriteAheadLog
from ..store.wal_records import DeleteRecord, UpsertRecord
from ._checkpoints import Checkpoints
from ._filtered import TENANTS, FilteredSearch
from ._rows import RowTable
from .tenants import Tenancy
from .results import SearchResult

__all__ = ["Collection", "METRICS", "ATTRIBUTE_TYPES"]

METRICS = ("l2", "ip", "cosine")
ATTRIBUTE_TYPES = ("int", "float", "keyword", "keywords", "bool")
_OPEN_ATTEMPTS = 5  # a writer checkpointing while this handle opens


_logger = logging.getLogger(__name__)

def check_settings(dim: object, metric: object, attributes: object) -> dict:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise InvalidType(f"dim must be an int, got {dim!r}")
    if not 1 <= int(dim) <= 65_536:
        raise InvalidArgument(f"dim must be from 1 to 65536, got {dim}")
    if not isinstance(metric, str) or metric not in METRICS:
        raise InvalidArgument(f"metric must be one of {METRICS}, got {metric!r}")
    schema: dict[str, str] = {}
    if attributes is not None:
        if not isinstance(attributes, Mapping):
            raise InvalidType(f"attributes must be a dict of name -> type, got {type(attributes).__name__}")
        for name, kind in attributes.items():
            if not isinstance(name, str) or not name or name.startswith("$"):
                raise InvalidArgument(f"attribute name {name!r} must be a non-empty str not starting with '$'")
            if name == TENANTS:
                raise InvalidArgument(f"attribute name {name!r} is kept for tenant memberships; choose another")
            if not isinstance(kind, str) or kind not in ATTRIBUTE_TYPES:
                raise InvalidArgument(f"attribute {name!r} has type {kind!r}; use one of {ATTRIBUTE_TYPES}")
            schema[name] = kind
    return {"dim": int(dim), "metric": metric, "attributes": schema}


class Collection(Checkpoints, FilteredSearch, Tenancy):
    """Vectors with int64 ids; see the module docstring. Get one from :class:`Database`."""

    def __init__(self, db, name: str, *, memory_cache: int | None, flush_rows: int, auto_index_rows: int) -> None:
        self.db = db
        self.name = name
        self.tier = db.tier
        self.prefix = f"collections/{name}"
        self.memory_cache = memory_cache
        self.flush_rows = flush_rows
        self.auto_index_rows = auto_index_rows
        self._lock = threading.RLock()
        self._log = ManifestLog(self.tier, self.prefix)
        self._closed = False
        # One writer per collection (docs/architecture.md): a local directory's file lock, and
        # the reason this handle stopped accepting writes once another writer got in first.
        self._writer_lock = db.writer_lock(name)
        self._fenced: str | None = None
        self._wrote = False
        # Blobs this handle writes get keys of their own: a second writer's checkpoint from the
        # same base (which loses its commit) can then never overwrite what the winner's names.
        self._key_suffix = f"-{uuid.uuid4().hex[:8]}"

    # ---------------------------------------------------------------- lifecycle
    def _create(self, settings: dict) -> None:
        state = {"settings": settings, "generation": 1, "checkpoint": 0, "index": None, "rows": None,
                 "vectors": None, "wal_lsn": 0, "index_params": None}
        self._log.commit(state, expected_version=None)
        self._open()

    def _open(self) -> None:
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                return self._load()
            except (InvalidArgument, CorruptData):
                # Another writer checkpointed between reading the manifest and replaying the
                # WAL, and truncated records the manifest did not cover: open the newer one.
                versions = self._log.versions()
                loaded = getattr(self, "_manifest", None)  # None: the newest manifest itself is damaged
                if attempt == _OPEN_ATTEMPTS - 1 or not versions or loaded is None or versions[-1] == loaded.version:
                    raise

    def _load(self) -> None:
        manifest = self._log.latest()
        if manifest is None:
            raise NotFound(f"collection {self.name!r} does not exist")
        self._manifest = manifest
        state = manifest.thawed_state()
        self.settings = state["settings"]
        self.dim = int(self.settings["dim"])
        self.metric = self.settings["metric"]
        self._index_metric = "l2" if self.metric == "l2" else "ip"
        self._gen = int(state["generation"])
        self._checkpoint = int(state["checkpoint"])
        self._index_params = IndexParams.from_json(state["index_params"]) if state["index_params"] else None
        # Rerank reads merge rows less eagerly than list reads: a candidate row is 1.5 KB at
        # d=384, so reading through 256 KiB gaps would fetch ~1 MiB a query on S3.
        self.vectors = VectorStore(self.tier, self._gen_prefix, self.dim, chunks=state["vectors"],
                                   coalesce_gap=self.db.coalesce_gap // 8, key_suffix=self._key_suffix)
        if state["rows"]:
            blob = decode_blob(self.tier.get(state["rows"]), source=state["rows"])
            self.rows = RowTable(np.frombuffer(blob.section("ids"), "<i8").copy(),
                                 np.frombuffer(blob.section("live"), np.uint8).astype(bool),
                                 np.frombuffer(blob.section("row_list"), "<i4").copy())
        else:
            self.rows = RowTable()
        self.index = None
        if state["index"]:
            self.index = SpannIndex.open(self.tier, state["index"], cache_bytes=self.memory_cache,
                                         coalesce_gap=self.db.coalesce_gap, scan_device=self.db.scan_device)
            self.index.key_suffix = self._key_suffix
        self._indexed_rows = self.rows.n if self.index is not None else 0
        if self.memory_cache is None or self.index is None:
            self.vectors.load_all()
        self._columns = None  # attribute columns, built by the first filtered search (or a checkpoint)
        self._columns_source = state.get("attributes")  # the committed columns blob, read on first use
        self._columns_pending: list = []
        self._rows_epoch = 0  # bumped when rows die or are renumbered: memoised filter masks go stale
        self._match_cache: OrderedDict = OrderedDict()
        self._tenant_cache: OrderedDict = OrderedDict()
        self._tenant_ivfs: OrderedDict = OrderedDict()  # large tenants' own IVFs: name -> [gen, LocalIVF, last use]
        self._tenant_clock = 0  # searches of large tenants (the IVFs' LRU clock)
        self._tenant_ivf_stored: dict[str, int] = {}  # tenants whose IVF is in the durable tier -> generation
        self._tenant_ivf_events = {"builds": 0, "loads": 0}  # tenant IVFs trained here / read from the tier
        self._tenant_ivf_pending: dict[str, tuple] = {}  # name -> (generation, bytes estimate, future)
        self._tenant_ivf_pool = None  # one background thread training tenant IVFs, made on first use
        self._tenant_postings = None
        self._match_cache_epoch = None
        self._reset_delta()
        self._wal = WriteAheadLog(self.tier, f"{self.prefix}")
        for _, record in self._wal.replay(after=int(state["wal_lsn"])):
            if isinstance(record, UpsertRecord):
                self._apply_upsert(record)
            else:
                self._apply_delete(record.ids)

    @property
    def _gen_prefix(self) -> str:
        return f"{self.prefix}/g{self._gen:06d}"

    def _reset_delta(self, keep_flat: bool = False) -> None:
        """The exact part of search: rows from ``_indexed_rows`` on (all rows when there is no index).

        ``keep_flat``: the flat index already holds exactly those rows (a checkpoint without
        an index), so it is kept rather than rebuilt from every stored vector.
        """
        if not keep_flat:
            self._flat = faiss.IndexFlatL2(self.dim) if self._index_metric == "l2" else faiss.IndexFlatIP(self.dim)
            if self.vectors.rows > self._indexed_rows:
                self._flat.add(self.vectors.load_all()[self._indexed_rows:])
        self._delta_x: list[np.ndarray] = []
        self._delta_attrs: list = []
        self._dead_indexed: list[np.ndarray] = []
        # Tombstoned rows the index still holds (rerank checks liveness only when there are any).
        self._indexed_dead = self._indexed_rows - int(np.count_nonzero(self.rows.live[:self._indexed_rows]))
        # Dead rows inside the exact part: a search asks it for k + this many, so k live remain.
        self._flat_dead = int(np.count_nonzero(~self.rows.live[self._indexed_rows:]))

    def close(self) -> None:
        """Checkpoint what the WAL holds (when there is any) and release memory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            if self._pending() and self._writes_here():
                self.flush()
            self._stop_tenant_ivf_builds()
            self._closed = True
            self.index = None
            if self._writer_lock is not None:
                self._writer_lock.release()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"collection {self.name!r} is closed")

    def _check_writable(self) -> None:
        """Before anything is written: this handle is (or becomes) the collection's one writer."""
        if self._fenced:
            raise WriterConflict(self._fenced)
        if self._writer_lock is not None:
            self._writer_lock.acquire()

    def _writes_here(self) -> bool:
        """Whether close may checkpoint: not a handle that only read (WAL records replayed at
        open belong to the writer), nor a fenced one (its acknowledged writes are in the WAL)."""
        if self._fenced:
            return False
        if self._writer_lock is not None:
            try:
                self._writer_lock.acquire()
            except WriterConflict:
                return False
            return True
        return self._wrote

    def _fence(self, reason: str) -> str:
        self._fenced = (f"collection {self.name!r}: {reason}. This handle accepts no more writes: close it and "
                        f"open the collection again (db.collection({self.name!r})) once the other writer is done; "
                        "run one writer per collection")
        return self._fenced

    def _append(self, record) -> None:
        self._check_writable()
        try:
            self._wal.append(record)
        except WriterConflict as exc:
            raise WriterConflict(self._fence(f"another writer appended to its WAL ({exc})")) from exc
        self._wrote = True

    def __repr__(self) -> str:
        return f"<Collection {self.name!r} dim={self.dim} metric={self.metric!r}>"

    # ------------------------------------------------------------------ inputs
    def _prepare_vectors(self, vectors: object, count: int | None) -> np.ndarray:
        if type(vectors) is np.ndarray and vectors.dtype == np.float32 and vectors.shape == (self.dim,):
            # The single-query fast path (a few us matter at 10k queries a second).
            if not np.isfinite(vectors).all():
                raise InvalidArgument("the query contains NaN or infinity")
            if self.metric != "cosine":
                return np.ascontiguousarray(vectors[None, :])
            norm = float(np.sqrt(vectors.dot(vectors)))
            if not norm > 0 or not np.isfinite(norm):
                raise InvalidArgument("the query is the zero vector (or overflows), which has no cosine similarity")
            return (vectors / norm)[None, :]
        arr = _as_array(vectors, "vectors")
        if arr.dtype.kind not in "fiu" or arr.dtype.kind == "b":
            raise InvalidType(f"vectors must be numeric, got dtype {arr.dtype}")
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise InvalidArgument(f"vectors must have shape (n, {self.dim}) for collection {self.name!r} "
                                  f"(dim {self.dim}), got {np.shape(vectors)}")
        if count is not None and arr.shape[0] != count:
            raise InvalidArgument(f"{arr.shape[0]} vectors for {count} ids; give one vector per id")
        with np.errstate(over="ignore"):
            arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            row = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
            raise InvalidArgument(f"vectors contain NaN or infinity (first in row {row}); drop or repair those rows")
        if self.metric == "cosine":
            norms = np.sqrt(np.einsum("nd,nd->n", arr, arr))
            if (norms == 0).any():
                row = int(np.flatnonzero(norms == 0)[0])
                raise InvalidArgument(f"row {row} is the zero vector, which has no cosine similarity")
            arr = arr / norms[:, None]
        return arr

    # ------------------------------------------------------------------ writes
    def add(self, ids: object, vectors: object, attributes: Sequence[Mapping[str, Any]] | None = None) -> int:
        """Insert or replace (upsert) ``vectors`` under ``ids``; durable on return. Returns the count."""
        return self._upsert(ids, vectors, attributes)

    def _upsert(self, ids: object, vectors: object, attributes, *, internal: bool = False) -> int:
        """:meth:`add`; ``internal`` lets tenant bookkeeping write the hidden tenant column."""
        with self._lock:
            self._check_open()
            if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
                ids = [ids]
            record = UpsertRecord(ids, self._prepare_vectors(vectors, len(np.atleast_1d(_as_array(ids, "ids")))),
                                  attributes)
            self._check_attributes(record.attributes, internal)
            self._append(record)
            self._apply_upsert(record)
            if len(self._delta_x) and self._pending() >= self.flush_rows:
                self._checkpoint_after_write()
            return len(record)

    def _checkpoint_after_write(self) -> None:
        """The checkpoint a write triggers. The write is durable in the WAL already, so a
        checkpoint that fails (S3 unavailable, say) is logged and retried by the next write,
        :meth:`flush` or :meth:`close`, rather than failing a write that succeeded."""
        try:
            self.flush()
        except TierstoreError as exc:
            _logger.warning("checkpoint of collection %r deferred: %s", self.name, exc)

    def _check_attributes(self, attributes, internal: bool = False) -> None:
        if attributes is None:
            return
        schema = self.settings["attributes"]
        for i, item in enumerate(attributes):
            for name in item:
                if name == TENANTS and not internal:
                    raise InvalidArgument(f"attributes[{i}] has {name!r}, a name tierstore keeps for tenants; "
                                          "use col.tenant(name).add(...) or col.grant(...)")
                if schema and name not in schema and not name.startswith("_"):
                    raise InvalidArgument(f"attributes[{i}] has {name!r}, which is not in the collection's schema "
                                          f"{sorted(schema)} (names starting with '_' are stored unfiltered)")
        # value types, before anything is written (the filter columns need them right)
        AttributeColumns.build(self._column_schema, attributes)

    def _apply_upsert(self, record: UpsertRecord) -> None:
        old = self.rows.lookup(record.ids)
        self._kill(old[old >= 0])
        self.rows.append(record.ids)
        self._delta_x.append(np.asarray(record.vectors))
        attributes = list(record.attributes) if record.attributes is not None else [None] * len(record)
        self._delta_attrs.extend(attributes)
        self._columns_append(attributes)
        self._flat.add(record.vectors)

    def get(self, ids: object, *, include_vectors: bool = True) -> list[dict[str, Any] | None]:
        """The stored rows of ``ids``: ``{"id", "vector", "attributes"}`` each, ``None`` where absent.

        ``vector`` is as stored (normalised for cosine); ``attributes`` the dict given at
        ``add`` (without tierstore's hidden tenant memberships), or ``None``.
        """
        with self._lock:
            self._check_open()
            if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
                ids = [ids]
            wanted = np.atleast_1d(_as_array(ids, "ids"))
            if wanted.dtype.kind not in "iu" or wanted.ndim != 1:
                raise InvalidType(f"ids must be a 1-D sequence of integers, got {wanted.dtype} of shape {wanted.shape}")
            rows = self.rows.lookup(wanted.astype(np.int64))
            found = rows >= 0
            out: list[dict[str, Any] | None] = [None] * wanted.size
            if not found.any():
                return out
            present = rows[found]
            vectors = self._row_vectors(present) if include_vectors else [None] * present.size
            attributes = self._row_attributes(present)
            for slot, vector, attrs in zip(np.flatnonzero(found).tolist(), vectors, attributes):
                plain = None if attrs is None else {k: v for k, v in thaw_json(attrs).items() if k != TENANTS}
                out[slot] = {"id": int(wanted[slot]), "vector": vector, "attributes": plain or None}
            return out

    def delete(self, ids: object) -> int:
        """Delete ``ids`` (absent ones are ignored); durable on return. Returns how many existed."""
        with self._lock:
            self._check_open()
            if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
                ids = [ids]
            record = DeleteRecord(ids)
            rows = self.rows.lookup(record.ids)
            if not (rows >= 0).any():
                return 0
            self._append(record)
            return self._apply_delete(record.ids)

    def _apply_delete(self, ids: np.ndarray) -> int:
        rows = np.unique(self.rows.lookup(ids))
        rows = rows[rows >= 0]
        self._kill(rows)
        return int(rows.size)

    def _kill(self, rows: np.ndarray) -> None:
        if rows.size:
            self._rows_epoch += 1
            self.rows.kill(rows)
            indexed = rows[rows < self._indexed_rows]
            if indexed.size:
                self._dead_indexed.append(indexed)
                self._indexed_dead += int(indexed.size)
            self._flat_dead += int(rows.size - indexed.size)

    def _pending(self) -> int:
        return (self.rows.n - self.vectors.rows) + sum(a.size for a in self._dead_indexed)

    # ------------------------------------------------------------------ search
    def search(self, x: object, k: int = 10, *, filter: Mapping | None = None, explain: bool = False,
               executor: Any = None, **params: Any) -> SearchResult:
        """The ``k`` nearest live vectors of each query ``x`` (``(dim,)`` or ``(nq, dim)``).

        Keyword ``params`` are :class:`~tierstore.index.params.SearchParams` fields
        (``nprobe``, ``prune_ratio``, ``rerank``). ``k`` larger than the collection returns
        what exists, padded with id -1 and distance inf. ``filter``: a metadata filter
        (:mod:`tierstore.index.filters`), e.g. ``{"year": {"$gte": 2020}, "lang": "en"}``;
        ``res.stats["plan"]`` tells how it ran, ``explain=True`` adds the planner's view.
        A filtered search returns ``min(k, matches)`` results.

        ``executor``: run the search elsewhere, e.g. a
        :class:`tierstore.serverless.FanoutExecutor` over workers holding the posting
        lists; it returns the same result as a local search with the same arguments.
        """
        if executor is not None:
            if not callable(getattr(executor, "search", None)):
                raise InvalidType(f"executor must have a search(col, x, k, ...) method (a FanoutExecutor), "
                                  f"got {type(executor).__name__}")
            return executor.search(self, x, k, filter=filter, explain=explain, **params)
        xq, k, sp = self._search_args(x, k, params)
        with self._lock:
            self._check_open()
            if filter is not None:
                return self._search_filtered(xq, k, sp, filter, explain)
            parts = []
            stats: dict[str, Any] = {}
            live = self.rows.live_full
            if self.index is not None and self._indexed_rows:
                # Without rerank still ask for 2k: replicas of one vector take several slots.
                candidates = k * sp.rerank if sp.rerank else 2 * k
                index = self.index
                if index.cache_bytes is None and sp.prune_ratio is None:
                    scores, rows = index.search_codes(xq, sp.nprobe, candidates)
                    stats = {"lists_probed": xq.shape[0] * min(sp.nprobe, index.active_lists.size)}
                else:
                    before = (index.fetch_rounds, index.fetched_requests, index.fetched_bytes)
                    coarse, lists = index.probe(xq, sp.nprobe, sp.prune_ratio)
                    scores, rows = index.scan(xq, coarse, lists, candidates)
                    stats = {"lists_probed": int((lists >= 0).sum()),
                             "list_fetch_rounds": index.fetch_rounds - before[0],
                             "list_requests": index.fetched_requests - before[1],
                             "list_bytes": index.fetched_bytes - before[2]}
                if sp.rerank:
                    vectors = self.vectors.resident
                    # No tombstone among indexed rows (the usual case after a build): skip the check.
                    checked = live if self._indexed_dead else None
                    reads = self.vectors.reads
                    parts.append(rerank(xq, rows, k, live=checked, metric=self._index_metric, vectors=vectors,
                                        read_vectors=None if vectors is not None else self.vectors.read_rows))
                    if vectors is None:
                        stats["rerank_reads"] = self.vectors.reads - reads
                else:
                    parts.append(self._code_topk(scores, rows, k, live))
            if self._flat.ntotal:
                scores, local = self._flat.search(xq, min(k + self._flat_dead, self._flat.ntotal))
                rows = np.where(local >= 0, local + self._indexed_rows, -1)
                distances = scores if self._index_metric == "l2" else -scores
                ok = rows >= 0
                ok[ok] = live[rows[ok]]
                parts.append((np.where(ok, distances, np.inf).astype(np.float32), np.where(ok, rows, -1)))
            if not parts:
                return SearchResult(np.full((xq.shape[0], k), -1, np.int64),
                                    np.full((xq.shape[0], k), np.inf, np.float32), stats)
            distances, rows = merge_topk(parts, k)
            ids = self.rows.ids_full[rows]  # row -1 maps to id -1
        if self.metric == "cosine":
            distances = distances + 1.0
        return SearchResult(ids, distances.astype(np.float32, copy=False), stats)

    def _search_args(self, x: object, k: object, params: dict):
        """Checked queries (float32, normalised for cosine), ``k`` and search parameters."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise InvalidType(f"k must be an int, got {k!r}")
        if not 1 <= k <= MAX_K:
            raise InvalidArgument(f"k must be from 1 to {MAX_K:,} (results are (nq, k) arrays), got {k}")
        sp = search_params(params) if params else _DEFAULT_SEARCH
        return self._prepare_vectors(x, None), int(k), sp

    def _code_topk(self, scores: np.ndarray, rows: np.ndarray, k: int, live: np.ndarray):
        distances = scores if self._index_metric == "l2" else -scores
        return top_unique(distances, rows, k, live)

    # ------------------------------------------------------------------- facts
    def count(self) -> int:
        """Live vectors (WAL included)."""
        with self._lock:
            return self.rows.count()

    def stats(self) -> dict[str, Any]:
        """Counts, index shape and resident memory."""
        with self._lock:
            out: dict[str, Any] = {"name": self.name, "dim": self.dim, "metric": self.metric,
                                   "count": self.rows.count(), "rows": self.rows.n,
                                   "deleted_rows": self.rows.n - self.rows.count(),
                                   "unindexed_rows": int(self._flat.ntotal), "wal_records": len(self._wal),
                                   "manifest_version": self._manifest.version, "index": None}
            vector_bytes = self.vectors.resident_bytes()
            if self.index is not None:
                out["index"] = {"lists": self.index.nlist, "quantizer": self.index.codes.name,
                                "list_bytes": self.index.directory.total_bytes(),
                                "resident_bytes": self.index.resident_bytes(),
                                "params": self.index.params.to_json()}
            out["resident_bytes"] = (vector_bytes + (out["index"]["resident_bytes"] if out["index"] else 0)
                                     + self.rows.lookup_bytes() + int(self._flat.ntotal) * self.dim * 4)
            out["raw_vector_bytes"] = self.rows.count() * self.dim * 4
            return out


_DEFAULT_SEARCH = SearchParams()


def _as_array(value: object, what: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:  # ragged nested lists, objects numpy cannot convert
        raise InvalidArgument(f"{what} cannot be read as an array ({exc}); pass a numpy array") from exc
