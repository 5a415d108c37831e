"""Per-query candidate sets from the code scan, merged up the tree: pure numpy, no I/O.

A :class:`Candidates` holds, for ``nq`` queries, the best ``keep`` code-scan candidates
each as CSR (``counts``, then ``distances``/``rows`` sorted by distance, then row) and a
``cut`` per query: every entry with a distance *below* the cut is present; entries at
or beyond it may be missing (a source was truncated there). Distances are "smaller is
better" (faiss's squared L2, or the negated inner product).

Why the cut matters: ``col.search`` reranks faiss's global top-``C`` of the code scan.
Workers reproduce every code score bit for bit (same codec, same probe arrays), so the
merged top-``C`` is the same *set*, except when scores tie across the ``C``-th place:
faiss breaks such ties by its internal (quantized) order, which the float scores do not
show. :meth:`Candidates.top` flags exactly those queries as ambiguous, and the
coordinator resolves them the only exact way (see :mod:`.executor`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import EventError
from .events import decode_array, encode_array

__all__ = ["Candidates"]


@dataclass(frozen=True)
class Candidates:
    """See the module docstring."""

    counts: np.ndarray     # int32 (nq,)
    distances: np.ndarray  # float32 (sum(counts),)
    rows: np.ndarray       # int64 (sum(counts),)
    cut: np.ndarray        # float32 (nq,), inf: complete

    @property
    def nq(self) -> int:
        return int(self.counts.size)

    @classmethod
    def empty(cls, nq: int) -> "Candidates":
        return cls(np.zeros(nq, np.int32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                   np.full(nq, np.inf, np.float32))

    @classmethod
    def from_topk(cls, distances: np.ndarray, rows: np.ndarray, keep: int) -> "Candidates":
        """From a faiss top-``keep`` answer ``(n, keep)``, ``-1`` padded, sorted per row."""
        valid = rows >= 0
        counts = valid.sum(axis=1).astype(np.int32)
        cut = np.full(rows.shape[0], np.inf, np.float32)
        full = counts == keep
        if keep and full.any():
            cut[full] = distances[full, keep - 1]
        return cls(counts, distances[valid].astype(np.float32), rows[valid].astype(np.int64), cut)

    # --------------------------------------------------------------- merging
    @staticmethod
    def merge(parts: list[tuple["Candidates", np.ndarray]], nq: int, keep: int) -> "Candidates":
        """Merge sources; ``parts[i] = (candidates, queries)`` maps source query ``j`` to ``queries[j]``."""
        cut = np.full(nq, np.inf, np.float32)
        if not parts:
            return Candidates.empty(nq)
        qs, ds, rs = [], [], []
        for cand, queries in parts:
            queries = np.asarray(queries, dtype=np.int64)
            np.minimum.at(cut, queries, cand.cut)
            qs.append(np.repeat(queries, cand.counts))
            ds.append(cand.distances)
            rs.append(cand.rows)
        q, d, r = np.concatenate(qs), np.concatenate(ds), np.concatenate(rs)
        order = np.lexsort((r, d, q))
        q, d, r = q[order], d[order], r[order]
        starts = np.searchsorted(q, np.arange(nq))
        rank = np.arange(q.size) - starts[q]
        totals = np.bincount(q, minlength=nq)
        truncated = np.flatnonzero(totals > keep)
        if truncated.size:
            cut[truncated] = np.minimum(cut[truncated], d[starts[truncated] + keep - 1])
        kept = rank < keep
        counts = np.minimum(totals, keep).astype(np.int32)
        return Candidates(counts, d[kept], r[kept], cut)

    def top(self, c: int, *, strict_order: bool = False):
        """``(distances (nq, c), rows (nq, c), ambiguous (nq,), boundary (nq,))``: the best ``c`` per query.

        Padded with inf / -1; ``boundary``: the ``c``-th distance (inf when fewer).

        ``ambiguous[q]``: the set of the best ``c`` is not determined by the scores (a tie
        across place ``c``, or the tie region was truncated). ``strict_order`` also flags
        any tie among the first ``c + 1`` (callers that keep code-score order need it).
        """
        nq = self.nq
        starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        take = np.minimum(self.counts, c)
        rows = np.full((nq, c), -1, np.int64)
        dist = np.full((nq, c), np.inf, np.float32)
        pos = np.arange(c)[None, :]
        mask = pos < take[:, None]
        src = (starts[:, None] + pos)[mask]
        rows[mask] = self.rows[src]
        dist[mask] = self.distances[src]
        ambiguous = np.zeros(nq, bool)
        boundary = np.full(nq, np.inf, np.float32)
        full = np.flatnonzero(self.counts >= c)
        if full.size:
            v = self.distances[starts[full] + c - 1]
            tie_next = (self.counts[full] > c) & (self.distances[np.minimum(starts[full] + c, self.distances.size - 1)]
                                                  == v)
            ambiguous[full] = tie_next | (v >= self.cut[full])
            boundary[full] = v
        if strict_order and self.distances.size > 1:
            same = self.distances[1:] == self.distances[:-1]
            q_of = np.repeat(np.arange(nq), self.counts)
            within = (q_of[1:] == q_of[:-1]) & ((np.arange(1, q_of.size) - starts[q_of[1:]]) <= c)
            np.logical_or.at(ambiguous, q_of[1:][same & within], True)
        return dist, rows, ambiguous, boundary

    def tie_split(self, c: int, queries: np.ndarray, boundary: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For ambiguous ``queries`` (after :meth:`top`): ``(below, tied, complete)``.

        ``below`` ``(n, c)``: rows scoring strictly better than the ``c``-th place (-1 pad),
        all of them in every top-``c``; ``tied`` ``(n, w)``: every row scoring exactly the
        ``c``-th place's distance, of which faiss keeps an unknown subset; ``complete[i]``:
        no tied entry can be missing (the tie lies below the cut).
        """
        v = boundary[queries]
        q_of = np.repeat(np.arange(self.nq), self.counts)
        pick = np.isin(q_of, queries)
        q, d, r = q_of[pick], self.distances[pick], self.rows[pick]
        slot = np.searchsorted(queries, q)
        vq = v[slot]
        rank = np.arange(q.size) - np.searchsorted(q, q, side="left")

        def matrix(mask: np.ndarray) -> np.ndarray:
            qs, rs = slot[mask], r[mask]
            counts = np.bincount(qs, minlength=queries.size)
            width = max(int(counts.max()) if counts.size else 0, 1)
            pos = np.arange(qs.size) - np.searchsorted(qs, qs, side="left")
            out = np.full((queries.size, width), -1, np.int64)
            out[qs, pos] = rs
            return out

        below = matrix((d < vq) & (rank < c))
        tied = matrix(d == vq)
        complete = v < self.cut[queries]
        return below, tied, complete

    # ------------------------------------------------------------------ wire
    def to_json(self) -> dict:
        return {"counts": encode_array(self.counts, "<i4"), "distances": encode_array(self.distances, "<f4"),
                "rows": encode_array(self.rows, "<i8"), "cut": encode_array(self.cut, "<f4")}

    @classmethod
    def from_json(cls, obj: dict, nq: int) -> "Candidates":
        for key in ("counts", "distances", "rows", "cut"):
            if key not in obj:
                raise EventError(f"a worker response lacks {key!r}")
        counts = decode_array(obj["counts"], "<i4", "counts", nq)
        total = int(counts.sum())
        if (counts < 0).any():
            raise EventError("a worker response has negative counts")
        return cls(counts.astype(np.int32), decode_array(obj["distances"], "<f4", "distances", total).copy(),
                   decode_array(obj["rows"], "<i8", "rows", total).astype(np.int64),
                   decode_array(obj["cut"], "<f4", "cut", nq).copy())


def gather_children(calls, takes) -> tuple[list[tuple[Candidates, np.ndarray]], list[dict], list[int]]:
    """What the children of one node (or of the coordinator) answered: their candidates with
    the query positions each covered (``takes``), their per-node statistics (round trip and
    attempts added to the child's own entry) and the partitions they report as failed."""
    sources: list[tuple[Candidates, np.ndarray]] = []
    nodes: list[dict] = []
    failed: list[int] = []
    for call, take in zip(calls, takes):
        if call.response is None:
            continue
        sources.append((Candidates.from_json(call.response, int(take.size)), take))
        child_nodes = call.response.get("stats", {}).get("nodes", [])
        if child_nodes:
            child_nodes[0]["rtt_ms"] = call.rtt_ms
            child_nodes[0]["attempts"] = call.attempts
        nodes.extend(child_nodes)
        failed.extend(call.response.get("failed", []))
    return sources, nodes, failed
