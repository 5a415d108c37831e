"""LocalIVF: a small IVF over a subset of a collection's rows (a large tenant's own index).

Curator gives a tenant that is dense somewhere in the shared tree its own sub-tree; with a
two-level tree (the shared posting lists) a large tenant is spread thinly over most lists,
and probing them costs a shared index's fixed price for a few of its rows each. A tenant
this large gets its own small IVF instead: ``sqrt(n)`` centroids trained on its vectors,
4-bit fast-scan PQ codes (``d/4`` bytes a vector, half of the shared lists' codes; the
candidates are reranked exactly from the collection's vectors, so the coarser codes cost
little recall: measured on bench/tenants.py). It holds codes and row numbers only, never a
copy of the vectors: ~0.14 KB a row of 384 dimensions, against 1.5 KB for the vector.

Row numbers are fixed when it is built: rows that die later are dropped by the rerank's
live check, and rows the tenant gains later are searched exactly beside it (the caller
rebuilds it when they become many). It serialises to one checked blob
(:meth:`to_bytes`, :mod:`tierstore.store.blob`), so a cold tenant's index can wait in the
durable tier instead of memory and come back without training.
"""

from __future__ import annotations

import faiss
import numpy as np

from ..errors import CorruptData, InvalidArgument, NotFound
from ..store.blob import decode_blob, encode_blob

__all__ = ["LocalIVF"]

_KIND = "tenant-ivf"


class LocalIVF:
    """A faiss IVF-PQ fast-scan index over ``rows`` (ids are positions in ``rows``)."""

    def __init__(self, index: faiss.Index, rows: np.ndarray) -> None:
        self.index = index
        self.rows = rows
        self._rows_or_none = np.append(rows, -1)  # faiss's -1 padding maps to row -1
        self._params: dict[int, faiss.SearchParametersIVF] = {}
        self.nbytes = int(rows.nbytes) + _index_bytes(index)

    @staticmethod
    def supports(dim: int) -> bool:
        """Whether vectors of ``dim`` dimensions have a 4-bit PQ layout (an even ``dim``)."""
        return dim % 2 == 0

    @classmethod
    def build(cls, vectors: np.ndarray, rows: np.ndarray, *, metric: str, seed: int = 0) -> LocalIVF:
        """Train and fill an index over ``vectors`` (the vectors of sorted ``rows``, normalised
        for cosine; faiss releases the GIL while it trains). :class:`InvalidArgument` for an
        odd dimension (no 4-bit PQ layout, see :meth:`supports`)."""
        n, d = vectors.shape
        if not cls.supports(d):
            raise InvalidArgument(f"a tenant IVF needs an even dimension, got {d}")
        m = d // 4 if d % 4 == 0 else d // 2
        fm = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        quantizer = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
        index = faiss.IndexIVFPQFastScan(quantizer, d, max(1, int(round(n ** 0.5))), m, 4, fm)
        index.own_fields = True
        quantizer.this.disown()
        index.by_residual = True
        index.cp.seed = index.pq.cp.seed = seed
        # 10 k-means iterations for the PQ codebooks (faiss's default is 25): on the 6,583-row
        # manpages tenant training took 0.63 -> 0.32 s at the same recall@10 (0.952 / 0.954).
        index.pq.cp.niter = 10
        data = np.ascontiguousarray(vectors, dtype=np.float32)
        index.train(data)
        index.add(data)
        return cls(index, np.ascontiguousarray(rows, dtype=np.int64))

    def to_bytes(self, **header) -> bytes:
        """One checked blob: the faiss index, the row numbers, and ``header`` (JSON values)."""
        return encode_blob({"kind": _KIND, "format": 1, "rows": int(self.rows.size), **header},
                           sections={"index": faiss.serialize_index(self.index), "rows": self.rows.astype("<i8")},
                           align=64)

    @classmethod
    def from_bytes(cls, data: object, *, source: str | None = None) -> tuple[LocalIVF, dict]:
        """``(index, header)`` from :meth:`to_bytes`; :class:`CorruptData` when the blob is damaged
        or is not such an index."""
        blob = decode_blob(data, source=source)
        header = blob.header
        if header.get("kind") != _KIND or header.get("format") != 1:
            raise CorruptData(f"{source or 'blob'} is not a tenant IVF (kind {header.get('kind')!r})")
        try:
            rows = np.frombuffer(blob.section("rows"), "<i8").astype(np.int64)
            index = faiss.deserialize_index(np.frombuffer(blob.section("index"), np.uint8).copy())
        except (NotFound, ValueError, RuntimeError) as exc:  # a section missing or cut; faiss cannot parse it
            raise CorruptData(f"{source or 'blob'}: not a readable tenant IVF ({exc})") from exc
        if (not isinstance(index, faiss.IndexIVFPQFastScan) or index.ntotal != rows.size
                or rows.size != header.get("rows") or (rows.size and rows.min() < 0)):
            raise CorruptData(f"{source or 'blob'}: the index and its {rows.size} row numbers do not agree")
        return cls(index, rows), header

    @property
    def nlist(self) -> int:
        return int(self.index.nlist)

    def search(self, xq: np.ndarray, nprobe: int, candidates: int) -> np.ndarray:
        """The best ``candidates`` rows per query by code score, ``(nq, candidates)``, -1 padded."""
        nprobe = min(nprobe, self.index.nlist)
        params = self._params.get(nprobe)
        if params is None:
            params = self._params[nprobe] = faiss.SearchParametersIVF(nprobe=nprobe)
        candidates = min(candidates, self.rows.size)
        nq = xq.shape[0]
        scores = np.empty((nq, candidates), np.float32)
        local = np.empty((nq, candidates), np.int64)
        self.index.search_c(nq, faiss.swig_ptr(xq), candidates, faiss.swig_ptr(scores), faiss.swig_ptr(local),
                            params)
        return self._rows_or_none[local]


def _index_bytes(index: faiss.IndexIVF) -> int:
    """Resident bytes, as its serialised size (codes, ids, centroids and PQ codebooks)."""
    return int(faiss.serialize_index(index).nbytes)
