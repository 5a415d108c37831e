"""The coordinator: ``col.search(xq, k, executor=FanoutExecutor(invoker, partitions=P, branching=b))``.

What runs where:

* **coordinator** (this process, holding the collection's resident state): validates
  the queries, chooses each query's lists from the resident centroids (the same
  ``probe`` / ``probe_filtered`` calls as ``col.search``), routes lists to partitions,
  builds the invocation tree, and at the end reranks the merged candidates exactly,
  drops replicas and tombstones, searches the unindexed delta and merges: all with the
  very functions ``col.search`` uses. Exact vectors, tombstones, the WAL's delta and the
  attribute columns stay here, so workers never need them.
* **workers**: code-scan their partitions' posting lists and merge the top candidates
  of their sub-trees (:mod:`.worker`).

**Identical results.** Workers reproduce every code score bit for bit, and candidates
are merged by (distance, row), so the coordinator gets the same top-``C`` set faiss
would have found locally. The one thing floats cannot show is how faiss orders *exactly
tied* code scores across the ``C``-th place (fast-scan scores are quantized, so ties
happen); such queries are flagged (:meth:`Candidates.top`) and recomputed with the local
search, counted in ``stats["serverless"]["tie_fallbacks"]`` (about 1% of queries with
the default ``pq4fs`` codes; none with ``sq8``). Every returned id equals ``col.search``.

**Filters** are evaluated here, over the resident attribute columns and the live row
table (which include the WAL's writes the workers cannot see); workers receive the
matching rows as a compact selection (sorted rows or a bitmap, zlib'd) and score only
those rows in the scan, exactly as the local filtered plan does. Shipping the selection
instead of the filter keeps workers stateless about attributes and deletes, and makes
the filtered result identical by construction. Filters the planner runs as an exact
scan of a few matches (or collections without an index) run locally: no lists to fan out.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from ..client import _filtered  # the filtered planner's constants: the same plan as col.search
from ..client.results import SearchResult
from ..errors import ConfigError, InvalidArgument, InvalidType
from ..index.rerank import merge_topk, rerank
from .candidates import Candidates, gather_children
from .events import encode_array, encode_selection
from .plan import PartitionPlan, TreeShape, build_plan, directory_digest, route
from .tree import call_children

__all__ = ["FanoutExecutor"]

def _s3_location(tier) -> tuple[str, str]:
    """``(bucket, prefix)`` of the S3 tier under a collection (directly or at the bottom of a stack)."""
    for candidate in [tier, *getattr(tier, "tiers", [])]:
        if getattr(candidate, "kind", None) == "s3":
            return candidate.bucket, candidate.prefix
    raise ConfigError("serverless search needs a collection stored in S3: open the database with "
                      "tierstore.connect('s3://bucket/prefix', ...)")


class FanoutExecutor:
    """Search a collection with a tree of workers over its posting lists (see the module docstring).

    :param invoker: how workers are called (:class:`InProcessInvoker`,
        :class:`ProcessInvoker`, :class:`LambdaInvoker`).
    :param partitions: ``P``, how many partitions the posting lists are cut into (capped
        at the number of stored lists).
    :param branching: ``b``, children per node (the coordinator invokes ``b`` roots).
    :param workers: worker nodes (default ``P``: one partition each); fewer nodes scan
        several partitions each.
    :param retries: re-invocations of a failed worker before it counts as failed.
    :param allow_partial: return what the other workers found when some fail, with
        ``res.stats["partial"] = True`` and ``stats["failed_partitions"]``; otherwise a
        failure raises :class:`~tierstore.errors.WorkerError` naming the partitions.
    :param tie_extra: candidates returned beyond ``C`` per query, to see ties at the cut.
    """

    def __init__(self, invoker, *, partitions: int = 8, branching: int = 4, workers: int | None = None,
                 retries: int = 1, allow_partial: bool = False, tie_extra: int | None = None) -> None:
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise InvalidArgument(f"partitions must be an int >= 1, got {partitions!r}")
        if isinstance(branching, bool) or not isinstance(branching, int) or branching < 2:
            raise InvalidArgument(f"branching must be an int >= 2, got {branching!r}")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise InvalidArgument(f"workers must be None or an int >= 1, got {workers!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
            raise InvalidArgument(f"retries must be an int from 0 to 10, got {retries!r}")
        if not isinstance(allow_partial, bool):
            raise InvalidType(f"allow_partial must be a bool, got {allow_partial!r}")
        self.invoker = invoker
        self.partitions, self.branching, self.workers = partitions, branching, workers
        self.retries, self.allow_partial, self.tie_extra = retries, allow_partial, tie_extra
        self._plans: dict[tuple[str, int], PartitionPlan] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"<FanoutExecutor partitions={self.partitions} branching={self.branching} "
                f"invoker={type(self.invoker).__name__}>")

    # ------------------------------------------------------------------ plan
    def plan(self, col) -> PartitionPlan:
        """The partition plan of ``col``'s current index (cached per index state)."""
        digest = directory_digest(col.index.directory)
        with self._lock:
            plan = self._plans.get((digest, self.partitions))
            if plan is None:
                plan = build_plan(col.index.directory, self.partitions)
                self._plans = {(digest, self.partitions): plan}  # older states are not searched again
            return plan

    def shape(self, plan: PartitionPlan) -> TreeShape:
        nodes = min(self.workers or plan.partitions, plan.partitions)
        return TreeShape(nodes, self.branching)

    # ---------------------------------------------------------------- search
    def search(self, col, x: object, k: int = 10, *, filter=None, explain: bool = False,
               **params: Any) -> SearchResult:
        """The result of ``col.search(x, k, filter=filter, **params)``, computed by the worker tree."""
        started = time.perf_counter()
        xq, k, sp = col._search_args(x, k, params)
        min_rerank, target_factor, exact_min = _filtered.MIN_RERANK, _filtered.TARGET_FACTOR, _filtered.EXACT_MIN
        with col._lock:
            col._check_open()
            index = col.index
            local = index is None or not col._indexed_rows
            found = None
            if not local and filter is not None:
                found = col._matches(filter)
                candidates = k * max(sp.rerank, min_rerank)
                local = not found.in_index.size or found.count <= max(exact_min, 8 * candidates)
            if local:  # nothing to fan out: no index, or the planner's exact plan over a few matches
                res = col.search(x, k, filter=filter, explain=explain, **params)
                res.stats["serverless"] = {"fanout": False}
                return res
            bucket, prefix = _s3_location(col.tier)
            index_key = col._manifest.thawed_state()["index"]
            plan = self.plan(col)
            if found is None:
                candidates = k * sp.rerank if sp.rerank else 2 * k
                coarse, lists = index.probe(xq, sp.nprobe, sp.prune_ratio)
                selection = None
            else:
                if found.per_list is None:
                    found.per_list = np.bincount(col.rows.row_list[found.in_index],
                                                 minlength=index.directory.nlist).astype(np.int32)
                coarse, lists = index.probe_filtered(xq, sp.nprobe, found.per_list, target_factor * candidates)
                selection = encode_selection(found.in_index, col._indexed_rows)
        keep = candidates + (self.tie_extra if self.tie_extra is not None else max(4, candidates // 4))
        base = {"v": 1, "op": "search", "bucket": bucket, "prefix": prefix, "index": index_key,
                "digest": plan.digest, "partitions": plan.partitions, "dim": int(xq.shape[1]),
                "width": int(lists.shape[1]), "keep": int(keep), "selection": selection,
                "partial": self.allow_partial, "retries": self.retries}
        fan_start = time.perf_counter()
        merged, failed, nodes = self._fan_out(base, plan, xq, lists, coarse)
        fan_ms = (time.perf_counter() - fan_start) * 1e3
        with col._lock:
            col._check_open()
            if col.index is not index:
                raise ConfigError("the collection's index changed during the serverless search; search again")
            live = col.rows.live_full
            strict = found is None and not sp.rerank
            distances, rows, ambiguous, boundary = merged.top(candidates, strict_order=strict)
            if ambiguous.any() and not strict:
                ambiguous = _settle_ties(col, xq, k, merged, candidates, ambiguous, boundary,
                                         live if found is None and col._indexed_dead else None)
            parts = []
            if found is None:
                if sp.rerank:
                    vectors = col.vectors.resident
                    checked = live if col._indexed_dead else None
                    parts.append(rerank(xq, rows, k, live=checked, metric=col._index_metric, vectors=vectors,
                                        read_vectors=None if vectors is not None else col.vectors.read_rows))
                else:
                    scores = distances if col._index_metric == "l2" else -distances
                    parts.append(col._code_topk(scores, rows, k, live))
                if col._flat.ntotal:
                    parts.append(_flat_part(col, xq, k, live))
                stats: dict[str, Any] = {"lists_probed": int((lists >= 0).sum())}
            else:
                parts.append(col._rerank(xq, rows, k))
                if found.delta.size and col._flat.ntotal:
                    parts.append(col._flat_filtered(xq, k, found.delta))
                stats = {"matches": found.count, "selectivity": found.selectivity, "plan": "filtered_ivf",
                         "lists_probed": int((lists >= 0).sum())}
                if explain:
                    stats["explain"] = {"filter": str(found.predicate), "exact_limit": max(exact_min, 8 * candidates),
                                        "candidates": candidates, "nprobe": sp.nprobe,
                                        "indexed_rows": col._indexed_rows, "delta_rows": int(col._flat.ntotal)}
            final_d, final_rows = merge_topk(parts, k)
            ids = col.rows.ids_full[final_rows]
            final_d = final_d + 1.0 if col.metric == "cosine" else final_d
            final_d = np.asarray(final_d, dtype=np.float32)
            fallback = np.flatnonzero(ambiguous) if not failed else np.zeros(0, np.int64)
            if fallback.size:
                # The caller's own rows, so that they are prepared exactly as before.
                again = x if np.ndim(x) == 1 else np.asarray(x)[fallback]
                exact = col.search(again, k, filter=filter, **params)
                ids = ids.copy()
                ids[fallback] = exact.ids
                final_d[fallback] = exact.distances
        shape = self.shape(plan)
        stats["serverless"] = _summary(nodes, plan, shape, fallback.size, fan_ms,
                                       (time.perf_counter() - started) * 1e3)
        stats["partial"] = bool(failed)
        if failed:
            stats["failed_partitions"] = failed
        return SearchResult(ids, final_d, stats)

    # ---------------------------------------------------------------- fan-out
    def _fan_out(self, base: dict, plan: PartitionPlan, xq: np.ndarray, lists: np.ndarray, coarse: np.ndarray):
        nq = xq.shape[0]
        shape = self.shape(plan)
        routes = route(plan, lists)
        specs = [spec for spec in (_spec(shape, plan, routes, node) for node in shape.roots()) if spec is not None]
        events, maps, covered = [], [], []
        for spec, queries, parts in specs:
            take = queries
            events.append({**base, "nq": int(take.size), "level": 1, "node": spec["node"],
                           "queries": encode_array(xq[take], "<f4"),
                           "lists": encode_array(lists[take], "<i8"), "coarse": encode_array(coarse[take], "<f4"),
                           "scan": spec["scan"], "children": spec["children"]})
            maps.append(take)
            covered.append(parts)
        calls, failed = call_children(self.invoker, events, covered, retries=self.retries,
                                      partial=self.allow_partial)
        sources, nodes, reported = gather_children(calls, maps)
        failed = sorted(set(failed) | set(reported))
        return Candidates.merge(sources, nq, base["keep"]), failed, nodes


def _settle_ties(col, xq: np.ndarray, k: int, merged: Candidates, c: int, ambiguous: np.ndarray,
                 boundary: np.ndarray, live: np.ndarray | None) -> np.ndarray:
    """Clear the ambiguity of queries whose code-score tie at place ``c`` cannot change the result.

    faiss keeps some subset of the rows tied at the ``c``-th code distance; the reranked
    top-``k`` is the same for every subset when the rows strictly better than the tie
    already give ``k`` results and each tied row is exactly farther than the ``k``-th of
    them. (The rerank's heap then never admits a tied row, whichever are present.)
    """
    queries = np.flatnonzero(ambiguous)
    below, tied, complete = merged.tie_split(c, queries, boundary)
    vectors = col.vectors.resident
    read = None if vectors is not None else col.vectors.read_rows
    sub = xq[queries]
    kth, _ = rerank(sub, below, k, live=live, metric=col._index_metric, vectors=vectors, read_vectors=read)
    nearest_tied, _ = rerank(sub, tied, 1, live=live, metric=col._index_metric, vectors=vectors, read_vectors=read)
    settled = complete & np.isfinite(kth[:, -1]) & (nearest_tied[:, 0] > kth[:, -1])
    out = ambiguous.copy()
    out[queries[settled]] = False
    return out


def _spec(shape: TreeShape, plan: PartitionPlan, routes: list[np.ndarray], node: int):
    """``(spec, queries, partitions)`` of ``node``'s sub-tree, query indices global; ``None`` without work."""
    scans = [(part, routes[part]) for part in shape.node_partitions(node, plan.partitions) if routes[part].size]
    children = [c for c in (_spec(shape, plan, routes, child) for child in shape.children(node)) if c is not None]
    if not scans and not children:
        return None
    queries = np.unique(np.concatenate([q for _, q in scans] + [q for _, q, _ in children])).astype(np.int32)
    covered = [part for part, _ in scans] + [p for _, _, parts in children for p in parts]
    spec = {"node": int(node),
            "scan": [{"partition": int(part), "queries": encode_array(np.searchsorted(queries, q), "<i4")}
                     for part, q in scans],
            "children": [{"node": s["node"], "take": encode_array(np.searchsorted(queries, q), "<i4"),
                          "scan": s["scan"], "children": s["children"]} for s, q, _ in children]}
    return spec, queries, covered


def _flat_part(col, xq: np.ndarray, k: int, live: np.ndarray):
    """The exact delta's top-k, as ``col.search`` computes it."""
    scores, local = col._flat.search(xq, min(k + col._flat_dead, col._flat.ntotal))
    rows = np.where(local >= 0, local + col._indexed_rows, -1)
    distances = scores if col._index_metric == "l2" else -scores
    ok = rows >= 0
    ok[ok] = live[rows[ok]]
    return np.where(ok, distances, np.inf).astype(np.float32), np.where(ok, rows, -1)


def _summary(nodes: list[dict], plan: PartitionPlan, shape: TreeShape, fallbacks: int, fan_ms: float,
             total_ms: float) -> dict:
    levels: dict[int, list[dict]] = {}
    for node in nodes:
        levels.setdefault(int(node["level"]), []).append(node)
    per_level = []
    for level in sorted(levels):
        group = levels[level]
        overhead = [n["rtt_ms"] - n["handler_ms"] for n in group if "rtt_ms" in n]
        per_level.append({"level": level, "nodes": len(group),
                          "max_handler_ms": max(n["handler_ms"] for n in group),
                          "mean_scan_ms": float(np.mean([n["scan_ms"] for n in group])),
                          "mean_invoke_overhead_ms": float(np.mean(overhead)) if overhead else 0.0})
    cold = sum(1 for n in nodes if n["cold"])
    return {"fanout": True, "partitions": plan.partitions, "workers": shape.nodes, "branching": shape.branching,
            "depth": shape.depth, "invocations": len(nodes), "cold": cold, "warm": len(nodes) - cold,
            "retried": sum(1 for n in nodes if n.get("attempts", 1) > 1),
            "s3_gets": sum(int(n["s3_gets"]) for n in nodes), "s3_bytes": sum(int(n["s3_bytes"]) for n in nodes),
            # what Lambda bills: every node's whole handler time (waits on children included), per ms
            "billed_ms": float(sum(np.ceil(n["handler_ms"]) for n in nodes)),
            "levels": per_level, "tie_fallbacks": int(fallbacks), "fanout_ms": fan_ms, "total_ms": total_ms}
