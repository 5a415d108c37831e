"""Tenants: many users' vectors in one collection, each seeing only its own (Curator-style).

``t = col.tenant("acme")`` is a handle bound to one tenant: its ``add``, ``get``,
``search``, ``delete`` and ``count`` see only rows that tenant holds. A row may be held
by several tenants (``col.grant(ids, tenant)`` / ``col.revoke(ids, tenant)``);
``col.drop_tenant`` removes a tenant, deleting the rows only it held and leaving shared
rows to the others.

**Index.** One shared clustering (the collection's posting lists, built once for all
tenants) and, per tenant, a short sorted list of its rows and the count of its rows in
each list (Curator keeps per-node tenant Bloom filters and short per-tenant lists; with a
two-level tree the exact per-list counts serve as both). By the tenant's size:

* up to ``32 x`` the candidates (2,560 rows at k=10): an exact scan of its rows. An
  index build lays each tenant's rows out together (by first holder, list by list inside
  a tenant), so the scan streams through memory as a dedicated flat index's would;
* larger: its own small IVF (:class:`~tierstore.index.local_ivf.LocalIVF`, Curator's
  per-tenant sub-tree where the tenant is dense), trained on a background thread from its
  second search on, within a memory budget shared by all tenants (``LOCAL_IVF_BUDGET``);
* without one (no room in the budget): the lists that hold its rows, nearest first,
  until they hold enough of them (:meth:`SpannIndex.probe_filtered`), scoring only its
  rows there, by the code scan or exactly.

The per-tenant row sets come from one inverted index of the hidden ``__tenants`` tag
column (4 bytes a membership), which follows appended rows instead of being rebuilt on
every write (:class:`_TenantPostings`); they are built on a tenant's first query and kept
in an LRU. :meth:`Tenancy.offload_tenants` offloads the cold tenants: their row sets
leave memory, and their IVFs wait in the durable tier (the writer stores each one when
it builds it), to come back on the tenant's next search in about a millisecond.

**Durability.** Memberships are a hidden tag attribute of each row, so every change goes
through the write-ahead log like any upsert (a grant rewrites the row with its vector and
attributes) and survives a crash or a reopen.

**Isolation.** A handle's searches AND the tenant's row set with the caller's filter (which
is parsed against the user schema, so it cannot even name the hidden column); there is no
code path from a handle to rows outside its tenant. Ids are global to the collection: a
tenant adding an id held only by others gets :class:`AlreadyExists` (the id is taken);
replacing a row it shares with others is refused the same way; ``get`` and ``delete``
treat another tenant's ids as absent. A handle's ``res.stats`` describe its own rows only
(no collection-wide row counts, which would tell a tenant how much the others hold).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import AlreadyExists, CorruptData, InvalidArgument, InvalidType, NotFound, TierstoreError
from ..index.filters import parse_filter
from ..index.local_ivf import LocalIVF
from ..index.rerank import exact_candidates, exact_rows, rerank
from ._filtered import EXACT_MIN, MIN_RERANK, TENANTS, _filter_key, _Matches
from .results import SearchResult

__all__ = ["TenantHandle", "Tenancy", "check_tenant_name"]

_log = logging.getLogger(__name__)
_ONE = np.float32(1.0)  # cosine distances are 1 - inner product

_TENANT_CACHE = 4096  # tenants (with a filter) whose row sets stay in memory
# Large tenants' own IVFs (LocalIVF) together stay within this share of the index's list
# bytes; the least recently searched give theirs up first (and are served by the shared lists).
LOCAL_IVF_BUDGET = 0.2
LOCAL_IVF_IDLE = 1_000  # large-tenant searches after which an unused IVF may give its room up
# Candidates a tenant IVF hands the exact rerank, in multiples of the shared lists' (its codes
# are half as long). bench/tenants.py, the 3,374- and 6,583-row tenants at nprobe 16:
# recall@10 0.944 / 0.967 at 1x, 0.955 / 0.970 at 2x (dedicated IVFs: 0.962 / 0.976).
LOCAL_IVF_CANDIDATES = 1.5
LOCAL_IVF_MIN_ROWS = 2_048  # smaller tenants are scanned exactly (or probe the shared lists, for k=1 or so)
LOCAL_IVF_MIN_ROWS_TIERED = 256  # with the vectors in the tier, an IVF pays from a few hundred rows
# Train tenant IVFs on a background thread (the shared lists serve the tenant meanwhile), so
# a build (~0.3 s for 6,583 rows) stalls neither the search that asked for it nor, through
# the collection's lock, every other search. False: train inside that search (tests use it).
LOCAL_IVF_BACKGROUND = True


def check_tenant_name(name: object) -> str:
    """A tenant name: a non-empty str of at most 256 characters, no control characters (C0, DEL,
    C1) and no lone surrogates (which no store can encode). Names are compared exactly: no case
    folding or Unicode normalisation, so look-alikes (``"ACME"``, fullwidth ``"ａｃｍｅ"``) are
    other tenants."""
    if not isinstance(name, str):
        raise InvalidType(f"a tenant name must be a str, got {type(name).__name__}")
    if not name or len(name) > 256 or any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF
                                          for c in name):
        raise InvalidArgument(f"a tenant name must be 1-256 printable characters (no control characters or "
                              f"lone surrogates), got {name!r:.80}")
    return name


class _TenantPostings:
    """The tenant inverted index (tenant -> sorted rows), kept up to date as rows are appended.

    Rows are only ever appended within a generation (an upsert writes a new row and kills
    the old one; deaths are filtered with the live mask when a tenant's rows are read), so
    the index is extended rather than rebuilt on every write: ``base`` indexes the rows
    up to ``base_rows``, ``recent`` the rows appended since, refolded into ``base`` once it
    holds an eighth as many memberships. A new generation (a build renumbers the rows)
    rebuilds it.
    """

    def __init__(self, columns, generation: int) -> None:
        self.generation = generation
        self._fold(columns)

    def _fold(self, columns) -> None:
        """Index every row of ``columns`` as the base (one sort of all memberships)."""
        self.base = columns.postings(TENANTS)
        self.base_rows = self.rows = len(columns)
        self.recent = None

    def extend(self, columns) -> None:
        """Take in the rows appended since (``columns`` covers every row)."""
        if len(columns) == self.rows:
            return
        recent = columns.postings(TENANTS, start=self.base_rows)
        if recent[2].size * 8 > self.base[2].size:
            self._fold(columns)
        else:
            self.recent, self.rows = recent, len(columns)

    def rows_of(self, name: str) -> np.ndarray:
        """Rows that hold (or held) ``name``, ascending, int64 (dead rows included)."""
        parts = []
        for words, starts, rows in (self.base, self.recent) if self.recent is not None else (self.base,):
            code = words.get(name)
            if code is not None and code + 1 < starts.size and starts[code + 1] > starts[code]:
                parts.append(rows[starts[code]:starts[code + 1]])
        if not parts:
            return np.zeros(0, np.int64)
        return (np.concatenate(parts) if len(parts) > 1 else parts[0]).astype(np.int64)

    def names(self) -> set[str]:
        """Every tenant name indexed (with or without live rows)."""
        names = set(self.base[0])
        return names | set(self.recent[0]) if self.recent is not None else names

    @property
    def nbytes(self) -> int:
        total = 0
        for words, starts, rows in (self.base, self.recent) if self.recent is not None else (self.base,):
            total += rows.nbytes + starts.nbytes
        return total + sum(len(w) + 60 for w in self.base[0])


class TenantHandle:
    """One tenant's view of a collection; see the module docstring."""

    def __init__(self, collection, name: str) -> None:
        self._collection = collection
        self._name = check_tenant_name(name)

    @property
    def name(self) -> str:
        """The tenant's name (checked once, when the handle is made)."""
        return self._name

    def __repr__(self) -> str:
        return f"<TenantHandle {self.name!r} of {self._collection.name!r}>"

    def add(self, ids: object, vectors: object, attributes: Sequence[Mapping[str, Any]] | None = None) -> int:
        """Insert or replace this tenant's ``vectors`` under ``ids`` (durable on return)."""
        return self._collection._tenant_add(self.name, ids, vectors, attributes)

    def get(self, ids: object, *, include_vectors: bool = True) -> list[dict[str, Any] | None]:
        """As :meth:`Collection.get`, for this tenant's rows: ``None`` for ids it does not hold."""
        return self._collection._tenant_get(self._name, ids, include_vectors)

    def search(self, x: object, k: int = 10, *, filter: Mapping | None = None, explain: bool = False,
               **params: Any) -> SearchResult:
        """As :meth:`Collection.search`, over this tenant's rows only (an unknown tenant finds nothing)."""
        return self._collection._tenant_search(self._name, x, k, filter, explain, params, checked=True)

    def delete(self, ids: object) -> int:
        """Remove this tenant's access to ``ids``; rows no other tenant holds are deleted. Returns how many."""
        return self._collection._tenant_delete(self.name, ids)

    def count(self) -> int:
        """Live rows this tenant holds."""
        return self._collection._tenant_count(self.name)


class Tenancy:
    """Tenant methods of :class:`~.collection.Collection` (uses its state and lock)."""

    # ------------------------------------------------------------------ public
    def tenant(self, name: str) -> TenantHandle:
        """A handle bound to tenant ``name`` (which exists once it holds a row)."""
        return TenantHandle(self, name)

    def tenants(self) -> list[str]:
        """Names of the tenants holding at least one live row, sorted."""
        with self._lock:
            self._check_open()
            postings = self._postings()
            live = self.rows.live
            return sorted(name for name in postings.names() if live[postings.rows_of(name)].any())

    def grant(self, ids: object, tenant: str) -> int:
        """Let ``tenant`` see the existing vectors ``ids`` too; returns how many changed."""
        tenant = check_tenant_name(tenant)
        return self._change_holders(ids, lambda holders: holders | {tenant})

    def revoke(self, ids: object, tenant: str) -> int:
        """Take ``ids`` away from ``tenant``: they stay for their other holders, and rows left with
        no holder are deleted (as :meth:`TenantHandle.delete` does). Returns how many changed."""
        tenant = check_tenant_name(tenant)
        with self._lock:
            self._require_tenant(tenant)
            ids_arr = _id_array(ids)
            rows = self.rows.lookup(ids_arr)
            if (rows < 0).any():
                raise NotFound(f"id {int(ids_arr[rows < 0][0])} is not in collection {self.name!r}")
            holders = self._holders_of(rows)
            alone = np.array([h == {tenant} for h in holders], bool)
            if alone.any():
                self.delete(ids_arr[alone])
        return int(alone.sum()) + self._change_holders(ids_arr[~alone], lambda held: held - {tenant})

    def drop_tenant(self, name: str) -> int:
        """Remove tenant ``name``: rows only it held are deleted, shared rows lose it. Returns its rows."""
        name = check_tenant_name(name)
        with self._lock:
            self._check_open()
            rows = self._require_tenant(name)
            dropped = self._tenant_delete(name, self.rows.ids_full[rows])
            self._tenant_ivfs.pop(name, None)
            self._tenant_ivf_pending.pop(name, None)
            if self._tenant_ivf_stored.pop(name, None) == self._gen:
                try:
                    self.tier.delete(self._tenant_ivf_key(name))
                except TierstoreError as exc:  # a cache: the next build's cleanup takes it with its generation
                    _log.warning("could not delete tenant %r's stored IVF (%s)", name, exc)
            return dropped

    def tenant_stats(self) -> dict[str, Any]:
        """Tenants, memberships and the memory of the tenant index (inverted index + cached row sets)."""
        with self._lock:
            self._check_open()
            postings = self._postings()
            cached = sum(m.nbytes for m in self._tenant_cache.values())
            local = sum(held[1].nbytes for held in self._tenant_ivfs.values())
            inverted = postings.nbytes
            column = self._attribute_columns().column_nbytes(TENANTS)
            held = [part[2] for part in (postings.base, postings.recent) if part is not None]
            live = sum(int(np.count_nonzero(self.rows.live[rows])) for rows in held)
            return {"tenants": len(self.tenants()), "memberships": live, "cached_tenants": len(self._tenant_cache),
                    "tenant_ivfs": len(self._tenant_ivfs), "tenant_ivf_builds": self._tenant_ivf_events["builds"],
                    "tenant_ivf_loads": self._tenant_ivf_events["loads"],
                    "tenant_index_bytes": inverted + cached + column + local, "inverted_bytes": inverted,
                    "cached_bytes": cached, "column_bytes": column, "tenant_ivf_bytes": local}

    def offload_tenants(self, keep: int = 0) -> int:
        """Offload all but the ``keep`` most recently searched tenants: their row sets leave memory
        (rebuilt from the resident tenant index on their next search) and large tenants' own
        IVFs go to the durable tier (the collection's writer keeps them there from their build;
        any other handle drops them), to come back from it on the tenant's next search instead
        of being trained again. Returns how many row sets went."""
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise InvalidArgument(f"keep must be an int >= 0, got {keep!r}")
        with self._lock:
            dropped = max(0, len(self._tenant_cache) - keep)
            for _ in range(dropped):
                self._tenant_cache.popitem(last=False)
            while len(self._tenant_ivfs) > keep:
                name, (gen, local, _) = self._tenant_ivfs.popitem(last=False)
                if gen == self._gen and self._tenant_ivf_stored.get(name) != gen:
                    self._save_tenant_ivf(name, local)  # its write-through at build failed: try again
            return dropped

    # ------------------------------------------------------------------ internals
    def _postings(self) -> _TenantPostings:
        """The tenant inverted index, extended with rows appended since it was last read."""
        self._fresh_caches()
        columns = self._attribute_columns()
        postings = self._tenant_postings
        if postings is None or postings.generation != self._gen or postings.rows > len(columns):
            postings = self._tenant_postings = _TenantPostings(columns, self._gen)
        else:
            postings.extend(columns)
        return postings

    def _tenant_rows(self, name: str) -> np.ndarray:
        """Live rows ``name`` holds, sorted (empty for an unknown tenant)."""
        held = self._postings().rows_of(name)
        return held[self.rows.live[held]]

    def _require_tenant(self, name: str) -> np.ndarray:
        self._check_open()
        rows = self._tenant_rows(name)
        if not rows.size:
            raise NotFound(f"tenant {name!r} holds no vectors in collection {self.name!r}")
        return rows

    def _tenant_matches(self, name: str, filter_spec: Any) -> _Matches:
        key = (name, _filter_key(filter_spec) if filter_spec is not None else None)
        cacheable = filter_spec is None or key[1] is not None  # a filter that is not plain JSON is not memoised
        self._fresh_caches()
        found = self._tenant_cache.get(key) if cacheable else None
        if found is not None:
            self._tenant_cache.move_to_end(key)
            return found
        predicate = parse_filter(filter_spec if filter_spec is not None else {}, self.settings["attributes"])
        rows = self._tenant_rows(name)
        if filter_spec is not None and rows.size:
            rows = rows[predicate.evaluate(self._attribute_columns(), rows)]
        found = _Matches(predicate, rows, self._indexed_rows, self.rows.count())
        found.compactable = False
        found.tenant = name if filter_spec is None else None
        if cacheable:
            self._tenant_cache[key] = found
            while len(self._tenant_cache) > _TENANT_CACHE:
                self._tenant_cache.popitem(last=False)
        return found

    def _tenant_ivf(self, found: _Matches) -> LocalIVF | None:
        """The large tenant's own IVF (:class:`LocalIVF`), from its second filtered-IVF search on:
        read back from the durable tier, else trained (on the background thread unless
        ``LOCAL_IVF_BACKGROUND`` is off); ``None`` while it has none. Its codes stay in memory; with the vectors in the tier (a
        tiered collection) it is built from one read of the tenant's rows and its rerank reads
        only the candidates, so it pays from ``LOCAL_IVF_MIN_ROWS_TIERED`` rows.

        All of them stay within ``LOCAL_IVF_BUDGET`` x the index's list bytes. To make room an
        IVF unused for ``LOCAL_IVF_IDLE`` large-tenant searches is dropped (least recently used
        first); one in use is never dropped for another, so two tenants cannot evict each
        other on every query: the one that does not fit is served by the shared lists.
        Rebuilt when the rows it lacks (added since) reach a quarter of those it holds, and
        after an index build (a new generation renumbers the rows).
        """
        name, vectors = found.tenant, self.vectors.resident
        if found.in_index.size < (LOCAL_IVF_MIN_ROWS if vectors is not None else LOCAL_IVF_MIN_ROWS_TIERED):
            return None
        self._tenant_clock += 1
        held = self._tenant_ivfs.get(name)
        if held is not None and held[0] == self._gen:
            local = held[1]
            if found.uncovered is None or found.uncovered[0] is not local:
                found.uncovered = _uncovered(local, found.in_index, self.rows.live)
            if found.uncovered[1].size * 4 <= local.rows.size:
                held[2] = self._tenant_clock
                self._tenant_ivfs.move_to_end(name)
                return local
        if held is not None:
            del self._tenant_ivfs[name]
        pending = self._tenant_ivf_pending.get(name)
        if pending is not None:  # trained on the background thread
            if not pending[2].done():
                return None
            del self._tenant_ivf_pending[name]
            local = _built(pending[2], name)
            if local is None or pending[0] != self._gen:
                return None
            self._tenant_ivf_events["builds"] += 1
            return self._install_tenant_ivf(name, found, local, save=True)
        stored = held is None and self._tenant_ivf_stored.get(name) == self._gen
        if found.searches < 1 and not stored:  # a tenant searched once is not worth an index yet
            return None
        n = found.in_index.size
        estimate = n * (self.dim // 4 + 8) + int(n ** 0.5 + 1) * self.dim * 4  # codes and ids; centroids
        if not self._room_for_tenant_ivf(estimate):
            return None  # no room now: the shared lists serve it
        local = self._load_tenant_ivf(name, found) if held is None and not found.ivf_looked else None
        found.ivf_looked = True  # one look in the tier per row set: a miss is not asked again
        if local is not None:
            self._tenant_ivf_events["loads"] += 1
            return self._install_tenant_ivf(name, found, local, save=False)
        if not LocalIVF.supports(self.dim):
            found.tenant = None  # no 4-bit PQ layout for this dimension: the shared lists serve it
            return None
        # A copy of the tenant's vectors (the resident array's rows, or one read of the tier).
        data = vectors[found.in_index] if vectors is not None else self.vectors.read_rows(found.in_index)
        build = functools.partial(LocalIVF.build, data, found.in_index, metric=self._index_metric,
                                  seed=self._index_params.seed if self._index_params is not None else 0)
        if LOCAL_IVF_BACKGROUND:
            if self._tenant_ivf_pool is None:
                self._tenant_ivf_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierstore-tenant-ivf")
            self._tenant_ivf_pending[name] = (self._gen, estimate, self._tenant_ivf_pool.submit(build))
            return None
        self._tenant_ivf_events["builds"] += 1
        return self._install_tenant_ivf(name, found, build(), save=True)

    def _room_for_tenant_ivf(self, estimate: int) -> bool:
        """Whether an IVF of ``estimate`` bytes fits the budget, after dropping idle IVFs (or ones
        of an older generation), least recently used first, as far as that is needed."""
        budget = LOCAL_IVF_BUDGET * self.index.directory.total_bytes()
        used = sum(entry[1].nbytes for entry in self._tenant_ivfs.values()) + sum(
            entry[1] for entry in self._tenant_ivf_pending.values())
        idle = [other for other, entry in self._tenant_ivfs.items()
                if self._tenant_clock - entry[2] > LOCAL_IVF_IDLE or entry[0] != self._gen]
        while idle and used + estimate > budget:
            used -= self._tenant_ivfs.pop(idle.pop(0))[1].nbytes
        return used + estimate <= budget

    def _install_tenant_ivf(self, name: str, found: _Matches, local: LocalIVF, *, save: bool) -> LocalIVF:
        """Keep ``local`` as ``name``'s IVF (and, built here, in the durable tier)."""
        if save:
            self._save_tenant_ivf(name, local)
        self._tenant_ivfs[name] = [self._gen, local, self._tenant_clock]
        found.uncovered = _uncovered(local, found.in_index, self.rows.live)
        return local

    def _stop_tenant_ivf_builds(self) -> None:
        """Cancel queued tenant IVF builds and wait for the running one (at close)."""
        if self._tenant_ivf_pool is not None:
            self._tenant_ivf_pool.shutdown(wait=True, cancel_futures=True)
            self._tenant_ivf_pool = None
        self._tenant_ivf_pending.clear()

    def _tenant_ivf_key(self, name: str) -> str:
        """Where a tenant's IVF waits in the durable tier: under the generation, so the build of the
        next one (which renumbers the rows) deletes it with the rest of the generation."""
        return f"{self._gen_prefix}/tenant-ivf/{hashlib.sha256(name.encode('utf-8')).hexdigest()[:40]}"

    def _save_tenant_ivf(self, name: str, local: LocalIVF) -> None:
        """Keep a freshly built tenant IVF in the durable tier too (by the collection's writer only:
        a reader never writes under the collection). A cache: a failed write only costs a rebuild."""
        if self._fenced or not (self._wrote or (self._writer_lock is not None and self._writer_lock.held)):
            return  # not the writer (a build alone takes a local directory's lock; on S3 a write marks it)
        try:
            self.tier.put(self._tenant_ivf_key(name), local.to_bytes(tenant=name, generation=self._gen))
            self._tenant_ivf_stored[name] = self._gen
        except TierstoreError as exc:
            _log.warning("could not keep tenant %r's IVF in the durable tier (%s); it will be rebuilt", name, exc)

    def _load_tenant_ivf(self, name: str, found: _Matches) -> LocalIVF | None:
        """The tenant's IVF from the durable tier, or ``None`` (absent, damaged, or not this tenant's
        rows of this generation). Whatever the blob says, every live row it can return must be one
        the tenant holds now, else it is not used: rows are never renumbered within a generation."""
        key = self._tenant_ivf_key(name)
        try:
            local, header = LocalIVF.from_bytes(self.tier.get(key), source=key)
        except NotFound:
            return None
        except (CorruptData, TierstoreError) as exc:
            _log.warning("ignoring tenant %r's stored IVF (%s); rebuilding it", name, exc)
            return None
        rows = local.rows
        if (header.get("tenant") != name or header.get("generation") != self._gen or rows.size == 0
                or rows.max() >= self.rows.n):
            return None
        alive = rows[self.rows.live[rows]]
        if not np.isin(alive, found.in_index, assume_unique=True).all():
            return None
        self._tenant_ivf_stored[name] = self._gen
        return local

    def _tenant_ivf_search(self, xq: np.ndarray, k: int, sp, found: _Matches, local: LocalIVF, candidates: int,
                           shift: np.float32 | None = None):
        """Candidates from the tenant's own IVF (``nprobe`` of its lists, ``LOCAL_IVF_CANDIDATES``
        x the usual candidates: its codes are half the shared lists'), plus the rows it lacks, reranked
        exactly; rows dead since it was built drop out in the rerank."""
        rows = local.search(xq, sp.nprobe, int(LOCAL_IVF_CANDIDATES * candidates))
        _, extra, all_live = found.uncovered
        vectors = self.vectors.resident
        if not extra.size and all_live and vectors is not None:  # the usual case: distinct, live, -1s last
            return exact_candidates(xq, rows, k, metric=self._index_metric, vectors=vectors, shift=shift)
        if extra.size:
            rows = np.concatenate([rows, np.broadcast_to(extra, (xq.shape[0], extra.size))], axis=1)
        distances, rows = rerank(xq, rows, k, live=self.rows.live_full, metric=self._index_metric, vectors=vectors,
                                 read_vectors=None if vectors is not None else self.vectors.read_rows)
        if shift is not None:
            distances += shift
        return distances, rows

    def _tenant_search(self, name, x, k, filter_spec, explain, params, checked: bool = False) -> SearchResult:
        if not checked:
            name = check_tenant_name(name)
        xq, k, sp = self._query_args(x, k, params)
        with self._lock:
            self._check_open()
            found = self._tenant_matches(name, filter_spec)
            vectors = self.vectors.resident
            if found.count and not found.delta.size and not explain and vectors is not None:
                # The planner's two common answers without its bookkeeping (same results).
                shift = _ONE if self.metric == "cosine" else None
                if found.count <= EXACT_MIN:  # most tenants are small: scanned exactly
                    distances, rows = exact_rows(xq, found.in_index, k, metric=self._index_metric, vectors=vectors,
                                                 shift=shift)
                    return SearchResult(self.rows.ids_full[rows], distances,
                                        {"matches": found.count, "plan": "exact", "tenant": name})
                candidates = k * max(sp.rerank, MIN_RERANK)
                asked = (found.tenant is not None and self.index is not None
                         and found.count > self._exact_limit(found, candidates))
                local = self._tenant_ivf(found) if asked else None
                if local is not None:  # a large tenant with its own IVF
                    distances, rows = self._tenant_ivf_search(xq, k, sp, found, local, candidates, shift)
                    return SearchResult(self.rows.ids_full[rows], distances,
                                        {"matches": found.count, "plan": "tenant_ivf", "tenant": name,
                                         "lists_probed": xq.shape[0] * min(sp.nprobe, local.nlist)})
                result = self._search_matches(xq, k, sp, found, explain, tenant_ivf=not asked)
            else:
                result = self._search_matches(xq, k, sp, found, explain)
        stats = result.stats
        # Collection-wide counts would tell a tenant how many rows the others hold
        # (matches / selectivity = every live row): report the tenant's own instead.
        stats.pop("selectivity", None)
        if "explain" in stats:
            stats["explain"].update(indexed_rows=int(found.in_index.size), delta_rows=int(found.delta.size))
        stats["tenant"] = name
        return result

    def _tenant_get(self, name, ids, include_vectors: bool) -> list:
        name = check_tenant_name(name)
        if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
            ids = [ids]
        wanted = np.atleast_1d(_as_array(ids))
        if wanted.dtype.kind not in "iu" or wanted.ndim != 1:
            raise InvalidType(f"ids must be a 1-D sequence of integers, got {wanted.dtype} of shape {wanted.shape}")
        out: list = [None] * wanted.size
        with self._lock:
            self._check_open()
            in_range = wanted <= np.iinfo(np.int64).max if wanted.dtype.kind == "u" else wanted >= 0
            rows = np.full(wanted.size, -1, np.int64)
            rows[in_range] = self.rows.lookup(wanted[in_range].astype(np.int64))
            mine = (rows >= 0) & np.isin(rows, self._tenant_rows(name))
            if not mine.any():
                return out
            held = self.get(wanted[mine].astype(np.int64), include_vectors=include_vectors)
        for slot, row in zip(np.flatnonzero(mine).tolist(), held):
            out[slot] = row
        return out

    def _tenant_count(self, name: str) -> int:
        name = check_tenant_name(name)
        with self._lock:
            self._check_open()
            return int(self._tenant_rows(name).size)

    def _holders_of(self, rows: np.ndarray) -> list[set[str]]:
        return self._attribute_columns().tags_of(TENANTS, rows)

    def _tenant_add(self, name, ids, vectors, attributes) -> int:
        name = check_tenant_name(name)
        if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
            ids = [ids]
        ids_arr = np.atleast_1d(_as_array(ids))
        if ids_arr.ndim != 1:  # checked before the look-up of who holds them
            raise InvalidType(f"ids must be a 1-D sequence of integers, got {ids_arr.dtype} of shape {ids_arr.shape}")
        with self._lock:
            self._check_open()
            if attributes is not None and (not isinstance(attributes, Sequence) or isinstance(attributes, (str, bytes))):
                raise InvalidType(f"attributes must be a list of dicts (one per id) or None, "
                                  f"got {type(attributes).__name__}")
            if ids_arr.dtype.kind in "iu" and ids_arr.size:
                rows = self.rows.lookup(ids_arr.astype(np.int64))
                existing = rows >= 0
                if existing.any():
                    for i, holders in zip(np.flatnonzero(existing).tolist(), self._holders_of(rows[existing])):
                        if holders != {name}:
                            raise AlreadyExists(f"id {int(ids_arr[i])} is already used in collection {self.name!r}; "
                                                "ids are global to the collection: choose another id")
            given = list(attributes) if attributes is not None else [None] * ids_arr.size
            for i, item in enumerate(given):
                if item is not None and not isinstance(item, Mapping):
                    raise InvalidType(f"attributes[{i}] must be a dict or None, got {type(item).__name__}")
                if item is not None and TENANTS in item:  # as col.add refuses it: memberships are not data
                    raise InvalidArgument(f"attributes[{i}] has {TENANTS!r}, a name tierstore keeps for tenants; "
                                          "a handle's rows belong to its tenant (share them with col.grant)")
            tagged = [_with_holders(a, {name}) for a in given]
            return self._upsert(ids, vectors, tagged, internal=True)

    def _tenant_delete(self, name, ids) -> int:
        name = check_tenant_name(name)
        with self._lock:
            self._check_open()
            ids_arr = _id_array(ids)
            rows = self.rows.lookup(ids_arr)
            mine = set(self._tenant_rows(name).tolist())
            keep = np.array([r >= 0 and int(r) in mine for r in rows.tolist()], bool)
            ids_arr, rows = ids_arr[keep], rows[keep]
            if not rows.size:
                return 0
            holders = self._holders_of(rows)
            alone = np.array([h == {name} for h in holders], bool)
            if alone.any():
                self.delete(ids_arr[alone])
            shared = ids_arr[~alone]
        if shared.size:
            self._change_holders(shared, lambda held: held - {name})
        return int(rows.size)

    def _change_holders(self, ids: object, change) -> int:
        """Rewrite rows ``ids`` with their holders changed by ``change`` (through the WAL)."""
        with self._lock:
            self._check_open()
            ids_arr = _id_array(ids)
            if not ids_arr.size:
                return 0
            rows = self.rows.lookup(ids_arr)
            if (rows < 0).any():
                raise NotFound(f"id {int(ids_arr[rows < 0][0])} is not in collection {self.name!r}")
            holders = self._holders_of(rows)
            changed = [i for i, h in enumerate(holders) if change(h) != h]
            if not changed:
                return 0
            picked = rows[changed]
            vectors = self._row_vectors(picked)
            attributes = [_with_holders(a, change(holders[i]))
                          for i, a in zip(changed, self._row_attributes(picked))]
            self._upsert(ids_arr[changed], vectors, attributes, internal=True)
            return len(changed)

    def _row_vectors(self, rows: np.ndarray) -> np.ndarray:
        stored = rows < self.vectors.rows
        out = np.empty((rows.size, self.dim), np.float32)
        if stored.any():
            out[stored] = self.vectors.read_rows(rows[stored])
        if (~stored).any():
            delta = np.concatenate(self._delta_x)
            out[~stored] = delta[rows[~stored] - self.vectors.rows]
        return out

    def _row_attributes(self, rows: np.ndarray) -> list:
        stored = rows < self.vectors.rows
        out: list = [None] * rows.size
        if stored.any():
            for i, a in zip(np.flatnonzero(stored).tolist(), self.vectors.attributes_of(rows[stored])):
                out[i] = a
        for i in np.flatnonzero(~stored).tolist():
            out[i] = self._delta_attrs[int(rows[i]) - self.vectors.rows]
        return out


def _built(future, name: str) -> LocalIVF | None:
    """A finished background build's IVF, or ``None`` (logged) when it failed."""
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - a cache: the shared lists keep serving the tenant
        _log.warning("building tenant %r's IVF failed (%s: %s); the shared lists serve it", name,
                     type(exc).__name__, exc)
        return None


def _uncovered(local: LocalIVF, rows: np.ndarray, live: np.ndarray) -> tuple[LocalIVF, np.ndarray, bool]:
    """``(local, rows it lacks, whether every row it holds is live)`` for a tenant's rows ``rows``
    (kept with the row set, which is made again whenever rows are added or die)."""
    return local, np.setdiff1d(rows, local.rows, assume_unique=True), bool(live[local.rows].all())


def _with_holders(attributes: Mapping | None, holders: set[str]) -> dict:
    out = {} if attributes is None else {k: v for k, v in attributes.items() if k != TENANTS}
    if holders:
        out[TENANTS] = sorted(holders)
    return out


def _as_array(ids: object) -> np.ndarray:
    try:
        return np.asarray(ids)
    except (ValueError, TypeError, OverflowError) as exc:  # ragged nested lists, objects numpy cannot convert
        raise InvalidArgument(f"ids cannot be read as an array ({exc}); pass a 1-D list or array of ints") from exc


def _id_array(ids: object) -> np.ndarray:
    """Distinct integer ids (a repeated id is one change)."""
    if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
        ids = [ids]
    arr = np.atleast_1d(_as_array(ids))
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise InvalidType(f"ids must be a 1-D sequence of integers, got {arr.dtype} of shape {arr.shape}")
    return np.unique(arr.astype(np.int64))
