"""The SPANN-style index: resident centroids, posting lists in the tiers, faiss scanning.

Build (:meth:`SpannIndex.build`): balanced two-level k-means into lists of about
``target_list_size`` (:mod:`.clustering`), boundary replication by the RNG rule
(:mod:`.replication`), codes from the chosen quantizer (:mod:`.quant`), lists
coalesced into segment blobs (:mod:`.postings`). What stays resident: centroids, the
trained codec, the posting directory and whatever posting lists the cache holds.

Search: :meth:`SpannIndex.search_codes` (every list resident) is one faiss call, coarse
search and code scan in C++; :meth:`SpannIndex.probe` + :meth:`SpannIndex.scan` pick the
nearest centroids (pruned lists become ``-1``), fetch the probed lists that are not
cached in one round of ranged reads and scan them. Either returns ``candidates`` rows per
query; reranking, dropping replicas and tombstones are :mod:`.rerank`'s, called by the
collection, which holds the full-precision vectors.

Cache: ``cache_bytes=None`` loads every list at open (the in-memory mode). A byte budget
keeps the most recently probed lists, evicting least recently used ones; faiss keeps
the capacity of an emptied list, so once evicted bytes exceed the budget the scanner is
rebuilt from the lists it still holds (amortised, rare).

Updates (:meth:`SpannIndex.update`, SPFresh's LIRE) are in :mod:`.updates`.
"""

from __future__ import annotations

import collections
import math
import sys

import faiss
import numpy as np
from tqdm import tqdm

from ..errors import CorruptData, InvalidArgument
from ..store.blob import decode_blob, encode_blob
from .clustering import balanced_kmeans
from .params import IndexParams
from .postings import PostingDirectory, empty_directory, fetch_lists, list_bytes, write_segments
from .quant import load_codes, train_codes
from .quant.faiss_codes import coarse_search
from .replication import group_posting_lists, replicate_boundary
from .updates import ListUpdates

__all__ = ["SpannIndex"]

class _SilentBar:
    """What a build calls on its progress bar, doing nothing (``progress=False``)."""

    def __enter__(self) -> _SilentBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_postfix_str(self, text: str) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None


class SpannIndex(ListUpdates):
    """A built index over rows ``0..n-1`` (see the module docstring)."""

    def __init__(self, *, tier, prefix: str, metric: str, dim: int, params: IndexParams, centroids: np.ndarray,
                 active: np.ndarray, codes, directory: PostingDirectory, next_segment: int,
                 cache_bytes: int | None, coalesce_gap: int = 0, dead: np.ndarray | None = None,
                 scan_device: str | None = None) -> None:
        self.tier = tier
        self.scan_device = scan_device
        self.prefix = prefix
        self.key_suffix = ""  # new segment keys end with it (a writer's tag: see Collection)
        self.metric = metric
        self.dim = dim
        self.params = params
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.active = np.asarray(active, dtype=bool)
        self.codes = codes
        self.directory = directory
        self.next_segment = next_segment
        self.cache_bytes = cache_bytes
        self.coalesce_gap = coalesce_gap
        self.fetch_rounds = 0
        self.fetched_requests = 0
        self.fetched_bytes = 0
        self.list_lookups = 0  # lists a search wanted from the cache (tiered mode)
        self.fetched_lists = 0  # of which were not held and came from the tier
        self._moved: set[int] = set()
        self._centroids_moved = False
        # Tombstoned rows still stored in each list (approximate for replicas): drives lazy purges.
        self.dead = np.zeros(self.directory.nlist, dtype=np.int64) if dead is None else dead
        self._reset_coarse()
        self._new_scanner()
        if cache_bytes is None:
            self._load(np.flatnonzero(self.directory.segment >= 0))

    # ------------------------------------------------------------------ coarse
    def _reset_coarse(self) -> None:
        self.active_lists = np.flatnonzero(self.active).astype(np.int64)
        d = self.dim
        self._centroid_norms = np.einsum("nd,nd->n", self.centroids, self.centroids)
        # One coarse index serves probing and the scanner: the active centroids labelled
        # with their list slots, so one faiss call (IndexIVF::search) does coarse search and
        # scan in C++, and retired or spare slots can never be probed.
        flat = faiss.IndexFlatL2(d) if self.metric == "l2" else faiss.IndexFlatIP(d)
        self._slot_coarse = faiss.IndexIDMap2(flat)
        self._slot_coarse.own_fields = True
        flat.this.disown()
        self._slot_coarse.add_with_ids(self.centroids[self.active_lists], self.active_lists)
        if getattr(self, "scanner", None) is not None:
            self.scanner.attach_coarse(self._slot_coarse)

    def _new_scanner(self) -> None:
        if self.scan_device is not None:
            from .quant.torch_scanner import TorchScanner

            self.scanner = TorchScanner(self.codes, self.scan_device)
        else:
            self.scanner = self.codes.new_scanner()
        self.scanner.attach_coarse(self._slot_coarse)
        self.loaded = np.zeros(self.directory.nlist, dtype=bool)
        self._lru: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._cached = 0
        self._garbage = 0

    @property
    def nlist(self) -> int:
        return int(self.active.sum())

    # ------------------------------------------------------------------- build
    @classmethod
    def build(cls, tier, prefix: str, x: np.ndarray, *, metric: str, params: IndexParams,
              cache_bytes: int | None = None, coalesce_gap: int = 0,
              progress: bool | None = None, scan_device: str | None = None, key_suffix: str = "",
              group: np.ndarray | None = None):
        """Partition, replicate, encode and write the rows of ``x``.

        Returns ``(index, assignment, order)``: the index's row ``r`` is ``x[order[r]]``
        (rows are renumbered list by list) and ``assignment[r]`` is its primary list.
        ``group`` (an int per row, e.g. a tenant): rows are renumbered group by group first,
        list by list within a group, so a group's vectors are neighbours in memory.

        ``progress``: show a tqdm bar of the build's stages (default: when stderr is a
        terminal and there are at least 100,000 vectors).
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[0] == 0:
            raise InvalidArgument("cannot build an index over an empty collection; add vectors first")
        if progress is None:
            progress = x.shape[0] >= 100_000 and sys.stderr.isatty()
        # No tqdm object at all without a bar: even a disabled one starts tqdm's monitor
        # thread, which then outlives the database.
        bar = (tqdm(total=4, desc=f"index {x.shape[0]:,} vectors", unit="stage") if progress
               else _SilentBar())
        with bar:
            return cls._build(tier, prefix, x, metric, params, cache_bytes, coalesce_gap, bar, scan_device,
                              key_suffix, group)

    @classmethod
    def _build(cls, tier, prefix, x, metric, params, cache_bytes, coalesce_gap, bar, scan_device, key_suffix,
               group=None):
        params = params.resolved(x.shape[0])  # the index keeps (and saves) the list size it used
        bar.set_postfix_str("balanced k-means")
        part = balanced_kmeans(x, target_list_size=min(params.target_list_size, x.shape[0]),
                               max_list_size=params.list_limit, metric=metric, seed=params.seed, niter=params.niter)
        # Rows are renumbered list by list, so a list's vectors are neighbours in the vector
        # chunks too: the rerank reads of one query's candidates then coalesce. With groups
        # (tenants), group by group first: a tenant's exact scan then streams its own rows.
        order = (np.argsort(part.assignment, kind="stable") if group is None
                 else np.lexsort((part.assignment, np.asarray(group, np.int64))))
        x = x[order]
        part = type(part)(centroids=part.centroids, assignment=part.assignment[order])
        nlist = part.nlist
        slots = nlist + max(1, math.ceil(nlist * params.spare_lists))
        centroids = np.zeros((slots, x.shape[1]), dtype=np.float32)
        centroids[:nlist] = part.centroids
        active = np.zeros(slots, dtype=bool)
        active[:nlist] = True
        bar.update()
        bar.set_postfix_str(f"train {params.quantizer}")
        codes = train_codes(params.quantizer, x, centroids, metric=metric, seed=params.seed)
        bar.update()
        bar.set_postfix_str("replicate and encode")
        lists = replicate_boundary(x, part.centroids, part.assignment, max_replicas=params.max_replicas,
                                   closure=params.closure, rng_factor=params.rng_factor, metric=metric)
        offsets, rows = group_posting_lists(lists, slots)
        list_nos = np.repeat(np.arange(slots), np.diff(offsets))
        encoded = codes.encode_lists(x[rows], list_nos, offsets)
        stored = {i: list_bytes(rows[offsets[i]:offsets[i + 1]], encoded[i]) for i in range(nlist)}
        counts = {i: int(offsets[i + 1] - offsets[i]) for i in range(nlist)}
        bar.update()
        bar.set_postfix_str("write posting lists")
        directory = empty_directory(slots)
        keys = write_segments(tier, prefix, directory, stored, counts, first_segment=0,
                              segment_bytes=params.segment_bytes, key_suffix=key_suffix)
        index = cls(tier=tier, prefix=prefix, metric=metric, dim=x.shape[1], params=params, centroids=centroids,
                    active=active, codes=codes, directory=directory, next_segment=len(keys),
                    cache_bytes=cache_bytes, coalesce_gap=coalesce_gap, scan_device=scan_device)
        bar.update()
        index.key_suffix = key_suffix
        return index, part.assignment, order

    # -------------------------------------------------------------- persistence
    def save(self, key: str) -> None:
        """Write the resident state (centroids, directory, codec) as one blob at ``key``."""
        d = self.directory
        header = {"kind": "spann-index", "format": 1, "metric": self.metric, "dim": self.dim,
                  "params": self.params.to_json(), "slots": d.nlist, "segment_keys": d.segment_keys,
                  "next_segment": self.next_segment, "quantizer": self.codes.name}
        sections = {"centroids": self.centroids, "active": self.active.astype(np.uint8), "dead": self.dead,
                    "codec": self.codes.to_bytes(),
                    **{f"dir.{name}": np.ascontiguousarray(arr) for name, arr in d.arrays().items()}}
        self.tier.put(key, encode_blob(header, sections=sections, align=64))

    @classmethod
    def open(cls, tier, key: str, *, cache_bytes: int | None = None, coalesce_gap: int = 0,
             scan_device: str | None = None) -> "SpannIndex":
        value = tier.get(key)
        blob = decode_blob(value, source=key)
        head = blob.header
        if head.get("kind") != "spann-index" or head.get("format") != 1:
            raise CorruptData(f"{key!r} is not a tierstore index (header {head!r:.120})")
        slots, dim = int(head["slots"]), int(head["dim"])

        def arr(name: str, dtype) -> np.ndarray:
            return np.frombuffer(blob.section(name), dtype=dtype).copy()

        centroids = arr("centroids", "<f4").reshape(slots, dim)
        directory = PostingDirectory(list(head["segment_keys"]), arr("dir.segment", "<i4"), arr("dir.offset", "<i8"),
                                     arr("dir.length", "<i8"), arr("dir.count", "<i8"),
                                     arr("dir.checksum", "<u8"))
        codes = load_codes(head["quantizer"], head["metric"], bytes(blob.section("codec")), centroids)
        return cls(tier=tier, prefix=key.rsplit("/", 1)[0], metric=head["metric"], dim=dim,
                   params=IndexParams.from_json(head["params"]), centroids=centroids,
                   active=arr("active", np.uint8).astype(bool), codes=codes, directory=directory,
                   next_segment=int(head["next_segment"]), cache_bytes=cache_bytes, coalesce_gap=coalesce_gap,
                   dead=arr("dead", "<i8"), scan_device=scan_device)

    # ------------------------------------------------------------------- cache
    def _load(self, list_nos: np.ndarray) -> None:
        if list_nos.size == 0:
            return
        fetched, plan = fetch_lists(self.tier, self.directory, list_nos, coalesce_gap=self.coalesce_gap)
        self.fetch_rounds += 1
        self.fetched_requests += len(plan.requests)
        self.fetched_lists += int(list_nos.size)
        self.fetched_bytes += plan.bytes
        for list_no, (ids, codes) in fetched.items():
            self.scanner.load_list(list_no, ids, codes)
            self.loaded[list_no] = True
            if self.cache_bytes is not None:
                self._lru[list_no] = ids.nbytes + codes.nbytes
                self._cached += ids.nbytes + codes.nbytes

    def _evict(self, keep: np.ndarray) -> None:
        keep_set = set(keep.tolist())
        for list_no in list(self._lru):
            if self._cached <= self.cache_bytes:
                break
            if list_no in keep_set:
                continue
            size = self._lru.pop(list_no)
            self.scanner.clear_list(list_no)
            self.loaded[list_no] = False
            self._cached -= size
            self._garbage += size
        if self._garbage > max(self.cache_bytes, 1 << 20):
            self._compact()

    def _compact(self) -> None:
        """Move the held lists into a fresh scanner, releasing what evicted lists left behind."""
        old, loaded, lru, cached = self.scanner, self.loaded, self._lru, self._cached
        self._new_scanner()  # resets the cache bookkeeping, restored below
        for list_no in lru:
            self.scanner.load_list(list_no, *old.list_arrays(list_no))
        self.loaded, self._lru, self._cached, self._garbage = loaded, lru, cached, 0

    def ensure_loaded(self, lists: np.ndarray) -> None:
        """Fetch the probed lists that are not cached (one round) and mark all as recently used."""
        if self.cache_bytes is None:
            return
        wanted = np.unique(lists[lists >= 0])
        missing = wanted[~self.loaded[wanted]]
        self.list_lookups += int(wanted.size)
        self._load(missing)
        for list_no in wanted.tolist():
            if list_no in self._lru:
                self._lru.move_to_end(list_no)
        if self._cached > self.cache_bytes:
            self._evict(wanted)

    def resident_bytes(self) -> int:
        """Bytes held in memory: centroids (our copy and the coarse index's), directory, codec
        (whose faiss quantizer holds the centroids once more), tombstone counts, cached lists
        (with the capacity faiss keeps for emptied lists)."""
        d = self.directory
        active = int(self.active.sum()) * (self.dim * 4 + 16)  # IndexIDMap2: vectors and both id maps
        fixed = (self.centroids.nbytes + self._centroid_norms.nbytes + active + self.dead.nbytes
                 + sum(a.nbytes for a in d.arrays().values()) + self.codes.memory_bytes())
        if self.cache_bytes is None:
            return fixed + d.total_bytes()
        return fixed + self._cached + self._garbage

    # ------------------------------------------------------------------ search
    def probe(self, xq: np.ndarray, nprobe: int, prune_ratio: float | None) -> tuple[np.ndarray, np.ndarray]:
        """The lists to scan per query ``(nq, nprobe)`` (-1: pruned or absent) and their coarse scores."""
        nprobe = min(nprobe, self.active_lists.size)
        coarse, lists = coarse_search(self._slot_coarse, xq, nprobe)
        if prune_ratio is not None and nprobe > 1:
            if self.metric == "l2":
                d2 = coarse
            else:  # squared L2 from inner products: |q|^2 + |c|^2 - 2 q.c
                d2 = np.einsum("nd,nd->n", xq, xq)[:, None] + self._centroid_norms[lists] - 2 * coarse
            lists = np.where(d2 <= prune_ratio * np.maximum(d2[:, :1], 1e-12), lists, -1)
        return coarse, lists

    def probe_filtered(self, xq: np.ndarray, nprobe: int, matches: np.ndarray,
                       target: int) -> tuple[np.ndarray, np.ndarray]:
        """Lists to scan under a filter, widened per query until they hold ``target`` matches.

        ``matches[slot]``: how many rows matching the filter have that list as their
        primary list (counted from the resident row table and attribute columns, no
        I/O). Each query takes its lists in centroid order, skips lists without a match,
        and stops at the first prefix whose matches reach ``target`` (and never before
        ``nprobe`` lists): one pass, yet at least ``min(target, all matches)`` candidates
        (SQUASH's guarantee). The coarse search looks at ``nprobe`` lists, or, when the
        matches are too sparse for that on average, at 8 times more or twice the lists that
        hold ``target`` matches on average (whichever is more), widening 8-fold up to every
        active list until the lists seen hold enough.
        """
        if xq.shape[0] == 1:
            return self._probe_filtered_one(xq, nprobe, matches, target)
        active = self.active_lists.size
        width = min(active, nprobe)
        total = int(matches.sum())
        if total * nprobe < target * active:  # too few matches near any query on average
            # twice the lists that hold ``target`` matches on average: usually one coarse search
            width = min(active, max(8 * nprobe, -(-2 * target * active // max(total, 1))))
        while True:
            coarse, lists = coarse_search(self._slot_coarse, xq, width)
            counts = matches[lists]  # every slot returned is active (width <= active lists)
            cum = counts.cumsum(axis=1)
            if width == active or cum[:, -1].min() >= target:
                break
            width = min(active, 8 * width)
        if width == min(active, nprobe):  # the usual broad filter: the nprobe nearest lists suffice
            return coarse, np.where(counts > 0, lists, -1)
        need = np.maximum(np.minimum((cum < target).sum(axis=1) + 1, width), min(nprobe, width))
        keep = (np.arange(width)[None, :] < need[:, None]) & (counts > 0)
        return coarse, np.where(keep, lists, -1)

    def _probe_filtered_one(self, xq: np.ndarray, nprobe: int, matches: np.ndarray,
                            target: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`probe_filtered` for one query: every active list scored by one matrix-vector
        product and sorted (for a few hundred lists, a third of the cost of widening faiss's
        heap search); the same lists, scores as faiss gives them."""
        active = self.active_lists
        scores = (self.centroids @ xq[0])[active]
        if self.metric == "l2":  # squared distances, as IndexFlatL2 returns them
            scores = self._centroid_norms[active] - 2 * scores + float(xq[0] @ xq[0])
            order = np.argsort(scores)
        else:
            order = np.argsort(-scores)
        lists = active[order]
        counts = matches[lists]
        need = max(min(int(np.searchsorted(counts.cumsum(), target)) + 1, lists.size), min(nprobe, lists.size))
        lists, counts = lists[:need], counts[:need]
        return scores[order[:need]][None, :], np.where(counts > 0, lists, -1)[None, :]

    def search_codes(self, xq: np.ndarray, nprobe: int, candidates: int) -> tuple[np.ndarray, np.ndarray]:
        """Coarse search and code scan in one call (every list resident, no pruning)."""
        return self.scanner.search(xq, min(nprobe, self.active_lists.size), self._bounded(candidates))

    def _bounded(self, candidates: int) -> int:
        """``candidates`` capped at the entries the lists hold: more only pads with -1, and a huge
        ``k * rerank`` would allocate (nq, candidates) arrays for nothing."""
        if candidates <= 4096:
            return candidates
        return min(candidates, max(1, int(self.directory.count.sum())))

    def scan(self, xq: np.ndarray, coarse: np.ndarray, lists: np.ndarray, candidates: int, allowed=None):
        """Code-scan the probed lists: ``(scores, rows)`` of the best ``candidates`` per query.

        ``xq`` float32 C-contiguous; ``lists``/``coarse`` from :meth:`probe`. Scores are
        faiss's: squared L2 (smaller better) or inner product (larger better).
        ``allowed``: a :class:`~tierstore.index.selection.RowSelection` (a filter's rows);
        other rows are not scored.
        """
        self.ensure_loaded(lists)
        candidates = self._bounded(candidates)
        if allowed is None:
            return self.scanner.search_preassigned(xq, lists, coarse, candidates)
        return self.scanner.search_preassigned(xq, lists, coarse, candidates, allowed)

    def live_segments(self) -> set[str]:
        used = np.unique(self.directory.segment[self.directory.segment >= 0])
        return {self.directory.segment_keys[int(i)] for i in used}
