"""OSQ posting-list codes for the index: :class:`~.osq.OsqCodec` behind the scanner interface.

The faiss formats (:mod:`.faiss_codes`) are scanned by SIMD kernels; OSQ (SQUASH's
variance-based bit allocation) has no faiss kernel, so :class:`OsqScanner` scans in
faiss's single-threaded vector kernels (``fvec_inner_products_ny``): one product per
probed list over its float32 cells, which are kept unpacked in memory. It is several times slower than
``pq4fs`` per scanned vector (about 0.1 us against 0.02 us) and exists for what OSQ is
good at: the smallest codes at a given accuracy (bytes per list on S3).

Codes are of the *residual* to the list's centroid ``r = x - c`` (one KLT rotation
trained on residuals): clustered data is coded far more accurately than raw vectors.
The codec scores inner products ``q . r_hat``; the scanner turns them into the
metric's scores with per-list and per-vector terms computed once at load:

* ``"ip"``: ``q . x_hat = q . c + q . r_hat`` (``q . c`` is the coarse score);
* ``"l2"``: ``|q - x_hat|^2 = |q - c|^2 - 2 q . r_hat + (2 c . r_hat + |r_hat|^2)``.
"""

from __future__ import annotations

import numpy as np

from ...errors import CorruptData
from .faiss_codes import coarse_search
from .osq import OsqCodec

__all__ = ["OsqCodes", "OsqScanner"]


class OsqCodes:
    """The trained OSQ codec of an index (same surface as :class:`~.faiss_codes.FaissCodes`)."""

    blocked = False

    def __init__(self, name: str, metric: str, codec: OsqCodec, centroids: np.ndarray) -> None:
        self.name, self.metric, self.codec = name, metric, codec
        self.centroids = np.array(centroids, dtype=np.float32)

    @classmethod
    def train(cls, name: str, x: np.ndarray, centroids: np.ndarray, *, metric: str, seed: int = 0,
              bits_per_dim: float = 4.0) -> "OsqCodes":
        from ..clustering import assign_nearest

        real = np.flatnonzero(np.abs(centroids).sum(axis=1) > 0)  # spare slots are all zero
        rng = np.random.default_rng(seed)
        sample = x if x.shape[0] <= 100_000 else x[np.sort(rng.choice(x.shape[0], 100_000, replace=False))]
        nearest = real[assign_nearest(sample, centroids[real], metric)[1][:, 0]]
        codec = OsqCodec.train(sample - centroids[nearest], bits_per_dim=bits_per_dim, metric="ip", seed=seed)
        return cls(name, metric, codec, centroids)

    @classmethod
    def from_bytes(cls, name: str, metric: str, data: bytes, centroids: np.ndarray) -> "OsqCodes":
        codec = OsqCodec.from_bytes(data)
        if codec.metric != "ip":
            raise CorruptData(f"the stored OSQ codec scores {codec.metric!r}; the index needs 'ip' residual codes")
        return cls(name, metric, codec, centroids)

    def to_bytes(self) -> bytes:
        return self.codec.to_bytes()

    @property
    def code_size(self) -> int:
        return self.codec.code_bytes

    def list_code_bytes(self, count: int) -> int:
        return count * self.codec.code_bytes

    def encode_lists(self, x: np.ndarray, list_nos: np.ndarray, offsets: np.ndarray) -> list[bytes]:
        residuals = x - self.centroids[np.asarray(list_nos, dtype=np.int64)]
        codes = self.codec.encode(residuals) if x.shape[0] else np.zeros((0, self.code_size), np.uint8)
        return [codes[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]

    def set_centroids(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        """Move list centroids (after a split); lists are re-encoded by the caller."""
        self.centroids[np.asarray(slots)] = vectors

    def new_scanner(self) -> "OsqScanner":
        return OsqScanner(self)

    def memory_bytes(self) -> int:
        return len(self.to_bytes())


class OsqScanner:
    """Held lists as unpacked float32 cells and their per-vector terms."""

    def __init__(self, codes: OsqCodes) -> None:
        self.codes = codes
        self.codec = codec = codes.codec
        # Products go through faiss's single-threaded SIMD kernels, not numpy's BLAS:
        # alternating OpenBLAS threads with faiss's OpenMP ones (coarse search, rerank)
        # makes both spin against each other, 100x slower on a small machine.
        self._rot_t = np.ascontiguousarray(codec.rotation[:, codec.used_dims].T, dtype=np.float32)
        self._step = np.asarray(codec.step, dtype=np.float32)
        self._offset = np.asarray(codec.offset, dtype=np.float32)
        self._mean = np.asarray(codec.mean, dtype=np.float32)
        self._lists: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        self._coarse = None

    def attach_coarse(self, coarse) -> None:
        self._coarse = coarse

    def refresh(self) -> None:
        """Nothing cached depends on centroids other than the rewritten lists' own terms."""

    def load_list(self, list_no: int, ids: np.ndarray, codes: np.ndarray) -> None:
        packed = np.asarray(codes, dtype=np.uint8).reshape(ids.shape[0], self.codes.code_size)
        raw = self.codec.unpack(packed) if ids.size else np.zeros((0, self.codec.d_used), np.uint8)
        # float32 cells: the product runs ~10x faster than on uint8 (no per-scan conversion),
        # at 4 bytes per used dimension in memory; the stored codes stay packed.
        cells = np.ascontiguousarray(raw, dtype=np.float32)
        extra = np.zeros(ids.shape[0], np.float32)
        if self.codes.metric == "l2" and ids.size:
            residuals = self.codec.decode_cells(raw)
            centroid = self.codes.centroids[int(list_no)]
            extra = (2.0 * residuals @ centroid + np.einsum("nd,nd->n", residuals, residuals)).astype(np.float32)
        self._lists[int(list_no)] = (np.array(ids, dtype=np.int64), cells, extra, packed.copy())

    def clear_list(self, list_no: int) -> None:
        self._lists.pop(int(list_no), None)

    def list_arrays(self, list_no: int) -> tuple[np.ndarray, np.ndarray]:
        ids, _, _, packed = self._lists[int(list_no)]
        return ids.copy(), packed.reshape(-1).copy()

    def _weights(self, query: np.ndarray) -> tuple[np.ndarray, float]:
        """Per-query weights and constant: ``q . r_hat = const + weights . cells``."""
        import faiss

        query = np.ascontiguousarray(query, dtype=np.float32)
        d, used = self._rot_t.shape[1], self._rot_t.shape[0]
        rotated = np.empty(used, np.float32)
        faiss.fvec_inner_products_ny(faiss.swig_ptr(rotated), faiss.swig_ptr(query), faiss.swig_ptr(self._rot_t),
                                     d, used)
        return rotated * self._step, float((query * self._mean).sum() + (rotated * self._offset).sum())

    def search(self, xq: np.ndarray, nprobe: int, candidates: int) -> tuple[np.ndarray, np.ndarray]:
        coarse, lists = coarse_search(self._coarse, xq, nprobe)
        return self.search_preassigned(xq, lists, coarse, candidates)

    def search_preassigned(self, xq: np.ndarray, lists: np.ndarray, coarse: np.ndarray,
                           candidates: int, allowed=None) -> tuple[np.ndarray, np.ndarray]:
        """Scores (faiss's convention: inner product for "ip", squared L2 for "l2") and rows.

        ``allowed``: a :class:`~tierstore.index.selection.RowSelection`; other rows are never returned.
        """
        n = xq.shape[0]
        scores = np.full((n, candidates), np.inf if self.codes.metric == "l2" else -np.inf, np.float32)
        rows = np.full((n, candidates), -1, np.int64)
        import faiss

        l2 = self.codes.metric == "l2"
        used = self._rot_t.shape[0]
        for q in range(n):  # per query: one SIMD product per probed list, no copies of the cells
            weights, const = self._weights(xq[q])
            parts_ids, parts_dist = [], []
            for list_no, bias in zip(lists[q].tolist(), coarse[q].tolist()):
                held = self._lists.get(list_no)
                if held is None or held[0].size == 0:
                    continue
                ids, cells, extra, _ = held
                dot = np.empty(ids.size, np.float32)
                faiss.fvec_inner_products_ny(faiss.swig_ptr(dot), faiss.swig_ptr(weights), faiss.swig_ptr(cells),
                                             used, ids.size)
                dot += const  # q . r_hat
                # smaller is better for the selection; scores are reported in faiss's convention
                parts_dist.append(bias - 2.0 * dot + extra if l2 else -(bias + dot))
                parts_ids.append(ids)
            if not parts_ids:
                continue
            ids, dist = np.concatenate(parts_ids), np.concatenate(parts_dist)
            if allowed is not None:
                keep = allowed.mask[ids]
                ids, dist = ids[keep], dist[keep]
                if not ids.size:
                    continue
            take = min(candidates, dist.size)
            best = np.argpartition(dist, take - 1)[:take] if dist.size > take else np.arange(dist.size)
            best = best[np.argsort(dist[best], kind="stable")]
            rows[q, :take] = ids[best]
            scores[q, :take] = dist[best] if l2 else -dist[best]
        return scores, rows
