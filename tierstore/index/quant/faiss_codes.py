"""Code formats scanned by faiss kernels: SQ8, SQ4, RaBitQ and 4-bit PQ fast-scan.

A :class:`FaissCodes` is a trained, empty faiss ``IndexIVF`` over the index's own
centroids. It does three jobs:

* :meth:`FaissCodes.encode_lists` turns vectors and their (replicated) list numbers into
  the stored bytes of each posting list: exactly the bytes faiss keeps in its inverted
  lists, so loading a list is one ``add_entries`` memcpy (fast-scan formats store their
  32-vector blocks already packed);
* :meth:`FaissCodes.new_scanner` gives a :class:`FaissScanner`: an empty clone whose
  inverted lists a cache fills from fetched blobs, scanned by faiss's SIMD kernels
  (``search``, or ``search_preassigned`` where list numbers ``-1`` are skipped, which
  is how pruned probes are dropped);
* :meth:`FaissCodes.to_bytes` / :meth:`FaissCodes.from_bytes` persist the trained codec
  (``faiss.serialize_index`` of the empty index; faiss's own format, never pickle).

Formats, all encoding the residual to the list centroid:

=========  ====================================  ============  =========================
name       faiss index                            bytes/vector  notes
=========  ====================================  ============  =========================
``sq8``    IndexIVFScalarQuantizer QT_8bit        d             per-dimension ranges
``sq4``    IndexIVFScalarQuantizer QT_4bit        d / 2         per-dimension ranges
``rabitq`` IndexIVFRaBitQ                         d / 8 + 8     1 bit/dim plus factors
``pq4fs``  IndexIVFPQFastScan (M = d/2, 4 bits)   d / 4         SIMD fast-scan, blocks of 32
=========  ====================================  ============  =========================

The OSQ format (variance-based bit allocation, SQUASH) lives in :mod:`.osq`.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from ...errors import CorruptData, InvalidArgument

__all__ = ["FaissCodes", "FaissScanner", "FAISS_FORMATS", "coarse_search"]

FAISS_FORMATS = ("sq8", "sq4", "rabitq", "pq4fs")
_TRAIN_SAMPLE = 65_536


def coarse_search(coarse: faiss.Index, xq: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, lists)`` of the ``nprobe`` nearest centroids per query (raw SWIG call, no copies)."""
    n = xq.shape[0]
    scores = np.empty((n, nprobe), dtype=np.float32)
    lists = np.empty((n, nprobe), dtype=np.int64)
    coarse.search_c(n, faiss.swig_ptr(xq), nprobe, faiss.swig_ptr(scores), faiss.swig_ptr(lists))
    return scores, lists


def _faiss_metric(metric: str) -> int:
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def _make_ivf(name: str, quantizer: faiss.Index, d: int, nlist: int, metric: str) -> faiss.IndexIVF:
    fm = _faiss_metric(metric)
    if name == "sq8":
        return faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, fm)
    if name == "sq4":
        return faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_4bit, fm)
    if name == "rabitq":
        return faiss.IndexIVFRaBitQ(quantizer, d, nlist, fm)
    if name == "pq4fs":
        if d % 2:
            raise InvalidArgument(f"quantizer 'pq4fs' needs an even dimension, got {d}; use 'sq8' or 'rabitq'")
        return faiss.IndexIVFPQFastScan(quantizer, d, nlist, d // 2, 4, fm)
    raise InvalidArgument(f"unknown faiss code format {name!r}; choose one of {FAISS_FORMATS}")


def _flat_quantizer(centroids: np.ndarray, metric: str) -> faiss.Index:
    d = centroids.shape[1]
    quantizer = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
    quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return quantizer


@dataclass(eq=False)
class FaissCodes:
    """A trained faiss code format bound to a set of centroids (see the module docstring)."""

    name: str
    metric: str
    index: faiss.IndexIVF

    # ------------------------------------------------------------------ creation
    @classmethod
    def train(cls, name: str, x: np.ndarray, centroids: np.ndarray, *, metric: str, seed: int = 0) -> "FaissCodes":
        """Train format ``name`` on a sample of ``x`` (residuals to ``centroids``)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        d, nlist = x.shape[1], centroids.shape[0]
        index = _make_ivf(name, _flat_quantizer(centroids, metric), d, nlist, metric)
        if x.shape[0] > _TRAIN_SAMPLE:
            rows = np.random.default_rng(seed).choice(x.shape[0], _TRAIN_SAMPLE, replace=False)
            x = x[np.sort(rows)]
        if name == "pq4fs":
            index.pq.cp.seed = seed
            index.by_residual = True  # faiss defaults to coding raw vectors here: far less accurate
            # No precomputed residual table: it is nlist x M x 16 floats (10 MiB at 574 lists of
            # 384-d, 59 MiB at 1M vectors), held by the codec and every scanner, more than the
            # rest of a tiered index; inner product never reads it and L2 computes each probed
            # list's table at search time (d x 16 multiply-adds a list).
            index.use_precomputed_table = -1
        index.train(x)
        return cls(name, metric, index)

    @classmethod
    def from_bytes(cls, name: str, metric: str, data: bytes) -> "FaissCodes":
        """Load a codec written by :meth:`to_bytes`; damage raises :class:`CorruptData`."""
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as exc:
            raise CorruptData(f"the stored {name!r} codec cannot be read by faiss: {exc}") from exc
        if not isinstance(index, faiss.IndexIVF) or index.ntotal != 0:
            raise CorruptData(f"the stored {name!r} codec is not an empty faiss IVF index")
        return cls(name, metric, index)

    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self.index).tobytes()

    # ------------------------------------------------------------------- layout
    @property
    def code_size(self) -> int:
        return int(self.index.code_size)

    @property
    def blocked(self) -> bool:
        """True for fast-scan formats, whose lists are stored as packed 32-vector blocks."""
        return isinstance(self.index, faiss.IndexIVFFastScan)

    def list_code_bytes(self, count: int) -> int:
        """Bytes of the codes of a list of ``count`` vectors."""
        if self.blocked:
            packer = self.index.get_CodePacker()
            try:
                return -(-count // packer.nvec) * packer.block_size
            finally:
                del packer
        return count * self.code_size

    def encode_lists(self, x: np.ndarray, list_nos: np.ndarray, offsets: np.ndarray) -> list[bytes]:
        """Codes of each list: ``x`` rows grouped by list (CSR ``offsets``), ``list_nos`` per row."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        list_nos = np.ascontiguousarray(list_nos, dtype=np.int64)
        codes = np.empty((x.shape[0], self.code_size), dtype=np.uint8)
        if x.shape[0]:
            self.index.encode_vectors(x.shape[0], faiss.swig_ptr(x), faiss.swig_ptr(list_nos),
                                      faiss.swig_ptr(codes), False)
        nlists = len(offsets) - 1
        if not self.blocked:
            return [codes[offsets[i]:offsets[i + 1]].tobytes() for i in range(nlists)]
        packer = self.index.get_CodePacker()
        nvec, block = packer.nvec, packer.block_size
        out = []
        for i in range(nlists):
            count = int(offsets[i + 1] - offsets[i])
            blocks = -(-count // nvec)
            flat = np.zeros((blocks * nvec, self.code_size), dtype=np.uint8)
            flat[:count] = codes[offsets[i]:offsets[i + 1]]
            packed = np.zeros(blocks * block, dtype=np.uint8)
            for b in range(blocks):  # build time only: one call per 32 vectors
                packer.pack_all(faiss.swig_ptr(flat[b * nvec:]), faiss.swig_ptr(packed[b * block:]))
            out.append(packed.tobytes())
        del packer
        return out

    def set_centroids(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        """Move the centroids of list ``slots`` (after a split); refresh what depends on them."""
        flat = faiss.downcast_index(self.index.quantizer)
        xb = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
        xb[np.asarray(slots)] = vectors
        if getattr(self.index, "use_precomputed_table", -1) != -1 and getattr(self.index, "by_residual", False):
            self.index.precompute_table()  # a codec stored with the residual table

    # ------------------------------------------------------------------ scanning
    def new_scanner(self) -> "FaissScanner":
        """An empty clone (own inverted lists) to fill with fetched lists and scan."""
        return FaissScanner(faiss.clone_index(self.index), self)

    def memory_bytes(self) -> int:
        """Resident bytes of the trained codec and its coarse quantizer."""
        return int(faiss.serialize_index(self.index).size)


class FaissScanner:
    """Posting lists held in a faiss IVF's inverted lists, scanned by its SIMD kernels.

    The IVF's coarse quantizer is replaced (:meth:`attach_coarse`) by an index of the
    *active* centroids labelled with their list slots, so :meth:`search` is one C++ call
    (coarse search + scan) and retired or spare slots can never be probed.
    """

    def __init__(self, ivf: faiss.IndexIVF, codes: FaissCodes) -> None:
        self.ivf = ivf
        self.codes = codes
        self._coarse = None
        self._previous = None

    def attach_coarse(self, coarse: faiss.Index) -> None:
        """Scan through ``coarse`` (kept alive by the caller) instead of the clone's own quantizer.

        The clone keeps ownership of its own quantizer: the pointer is put back before the
        IVF is destroyed (:meth:`__del__`), so faiss frees exactly what it allocated.
        """
        if self._previous is None:
            self._previous = self.ivf.quantizer
        self.ivf.quantizer = coarse
        self._coarse = coarse

    def __del__(self) -> None:
        ivf, previous = getattr(self, "ivf", None), getattr(self, "_previous", None)
        if ivf is not None and previous is not None:
            ivf.quantizer = previous

    def refresh(self) -> None:
        """Recompute what the scanner derives from the centroids after some moved.

        PQ fast-scan with residuals keeps a table of centroid terms; it is computed over
        every slot, so through the codec's full quantizer, then the slot index goes back.
        """
        if getattr(self.ivf, "by_residual", False) and getattr(self.ivf, "use_precomputed_table", -1) != -1:
            self.ivf.quantizer = self.codes.index.quantizer
            try:
                self.ivf.precompute_table()
            finally:
                self.ivf.quantizer = self._coarse

    def load_list(self, list_no: int, ids: np.ndarray, codes: np.ndarray) -> None:
        """Put a fetched list into an empty slot (one memcpy)."""
        self.ivf.invlists.add_entries(int(list_no), int(ids.shape[0]), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
        self.ivf.ntotal += int(ids.shape[0])

    def clear_list(self, list_no: int) -> None:
        """Empty one list (faiss keeps its capacity until the scanner is replaced)."""
        self.ivf.ntotal -= int(self.ivf.invlists.list_size(int(list_no)))
        self.ivf.invlists.resize(int(list_no), 0)

    def list_arrays(self, list_no: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of one held list's ids and stored code bytes."""
        invlists = self.ivf.invlists
        n = invlists.list_size(int(list_no))
        ids = faiss.rev_swig_ptr(invlists.get_ids(int(list_no)), n).copy()
        codes = faiss.rev_swig_ptr(invlists.get_codes(int(list_no)), self.codes.list_code_bytes(n)).copy()
        return ids, codes

    def search(self, xq: np.ndarray, nprobe: int, candidates: int) -> tuple[np.ndarray, np.ndarray]:
        """Coarse search and scan in one faiss call; ``xq`` float32 C-contiguous."""
        ivf = self.ivf
        if ivf.nprobe != nprobe:
            ivf.nprobe = nprobe
        n = xq.shape[0]
        scores = np.empty((n, candidates), dtype=np.float32)
        rows = np.empty((n, candidates), dtype=np.int64)
        ivf.search_c(n, faiss.swig_ptr(xq), candidates, faiss.swig_ptr(scores), faiss.swig_ptr(rows))
        return scores, rows

    def search_preassigned(self, xq: np.ndarray, lists: np.ndarray, coarse: np.ndarray,
                           candidates: int, allowed=None) -> tuple[np.ndarray, np.ndarray]:
        """Scan the given lists (``-1`` skipped) with their coarse scores.

        ``allowed``: a :class:`~tierstore.index.selection.RowSelection`; only those rows
        are scored (a faiss ``IDSelectorBitmap`` checked inside the scan, no extra pass).
        """
        ivf = self.ivf
        if ivf.nprobe != lists.shape[1]:
            ivf.nprobe = lists.shape[1]
        n = xq.shape[0]
        scores = np.empty((n, candidates), dtype=np.float32)
        rows = np.empty((n, candidates), dtype=np.int64)
        params = None if allowed is None else allowed.faiss_params(lists.shape[1])
        # The raw SWIG call: the Python wrapper's checks and copies cost ~8 us a query.
        ivf.search_preassigned_c(n, faiss.swig_ptr(xq), candidates, faiss.swig_ptr(lists), faiss.swig_ptr(coarse),
                                 faiss.swig_ptr(scores), faiss.swig_ptr(rows), False, params)
        return scores, rows
