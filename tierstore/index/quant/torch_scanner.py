"""Posting lists resident on a torch device (the GPU tier), scanned with torch.

When a collection is opened with ``scan_device="cuda"``, the lists it holds are decoded
once, at load, into full vectors (``centroid + decoded residual``, float16 on a GPU,
float32 on the CPU) in one arena tensor on that device, and a search is a few tensor
operations for the whole batch, with no per-list Python loop:

    scores = queries @ arena.T                 # (nq, rows held), one matmul
    scores[~probed[:, list_of_row]] = worst    # only the lists each query probes
    best = scores.topk(candidates)

so probing more lists costs the GPU almost nothing. Exact rerank then runs as usual.
Formats: ``sq8``, ``sq4`` (faiss ``decode_vectors``) and ``pq4fs`` (its PQ decoder over
unpacked fast-scan blocks); ``rabitq`` and ``osq`` are not supported here. torch is
imported only when such a scanner is made.
"""

from __future__ import annotations

import faiss
import numpy as np

from ...errors import ConfigError
from .faiss_codes import coarse_search

__all__ = ["TorchScanner", "TORCH_FORMATS"]

TORCH_FORMATS = ("sq8", "sq4", "pq4fs")


class TorchScanner:
    """Held lists decoded into one device tensor; see the module docstring."""

    def __init__(self, codes, device: str) -> None:
        if codes.name not in TORCH_FORMATS:
            raise ConfigError(f"scanning on a torch device supports quantizers {TORCH_FORMATS}, not {codes.name!r}; "
                              "rebuild the index with one of them or open without scan_device")
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigError("scan_device needs torch: pip install 'tierstore[kv]'") from exc
        self.torch = torch
        self.codes = codes
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self._lists: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # ids, stored bytes, vectors
        self._arena = None
        self._scale = 1.0
        self._coarse = None
        self._nslots = int(codes.index.nlist)

    # --------------------------------------------------------------- holding lists
    def attach_coarse(self, coarse) -> None:
        self._coarse = coarse

    def refresh(self) -> None:
        """Nothing to do: lists were decoded against the centroid they were encoded with."""

    def _decode(self, list_no: int, ids: np.ndarray, stored: np.ndarray) -> np.ndarray:
        index, n = self.codes.index, int(ids.shape[0])
        flat = np.ascontiguousarray(stored, dtype=np.uint8)
        if self.codes.blocked:  # unpack the 32-vector fast-scan blocks into flat codes
            packer = index.get_CodePacker()
            nvec, block = packer.nvec, packer.block_size
            blocks = -(-n // nvec)
            codes = np.empty((blocks * nvec, index.code_size), np.uint8)
            for b in range(blocks):
                packer.unpack_all(faiss.swig_ptr(flat[b * block:]), faiss.swig_ptr(codes[b * nvec:]))
            del packer
            vectors = index.pq.decode(codes[:n])
            if index.by_residual:
                vectors += index.quantizer.reconstruct(list_no)
            return vectors
        codes = flat.reshape(n, index.code_size)
        vectors = np.empty((n, index.d), np.float32)
        list_nos = np.full(n, list_no, np.int64)
        index.decode_vectors(n, faiss.swig_ptr(codes), faiss.swig_ptr(list_nos), faiss.swig_ptr(vectors))
        return vectors

    def load_list(self, list_no: int, ids: np.ndarray, codes: np.ndarray) -> None:
        ids = np.array(ids, dtype=np.int64)
        vectors = self._decode(int(list_no), ids, codes) if ids.size else np.zeros((0, self.codes.index.d), np.float32)
        self._lists[int(list_no)] = (ids, np.array(codes, dtype=np.uint8), vectors)
        self._arena = None

    def clear_list(self, list_no: int) -> None:
        if self._lists.pop(int(list_no), None) is not None:
            self._arena = None

    def list_arrays(self, list_no: int) -> tuple[np.ndarray, np.ndarray]:
        ids, stored, _ = self._lists[int(list_no)]
        return ids.copy(), stored.copy()

    def _build_arena(self):
        torch = self.torch
        held = sorted(self._lists)
        ids = np.concatenate([self._lists[i][0] for i in held]) if held else np.zeros(0, np.int64)
        vectors = (np.concatenate([self._lists[i][2] for i in held]) if held
                   else np.zeros((0, self.codes.index.d), np.float32))
        owner = np.repeat(np.asarray(held, np.int64), [self._lists[i][0].size for i in held])
        # Rows are stored divided by the largest row norm and queries are scaled to unit
        # norm, so every float16 product is at most 1 in magnitude: float16 overflows
        # past 65,504, which a dot of unnormalised vectors (SIFT-like data) passes.
        norms = np.einsum("nd,nd->n", vectors, vectors)
        self._scale = float(np.sqrt(norms.max())) if norms.size and norms.max() > 0 else 1.0
        x = torch.from_numpy(vectors / np.float32(self._scale)).to(self.device, self.dtype)
        self._arena = (x, torch.from_numpy(norms).to(self.device), torch.from_numpy(ids).to(self.device),
                       torch.from_numpy(owner).to(self.device))
        return self._arena

    # -------------------------------------------------------------------- search
    def search(self, xq: np.ndarray, nprobe: int, candidates: int) -> tuple[np.ndarray, np.ndarray]:
        coarse, lists = coarse_search(self._coarse, xq, nprobe)
        return self.search_preassigned(xq, lists, coarse, candidates)

    def search_preassigned(self, xq: np.ndarray, lists: np.ndarray, coarse: np.ndarray,
                           candidates: int, allowed=None) -> tuple[np.ndarray, np.ndarray]:
        """Scores in faiss's convention (inner product for "ip", squared L2 for "l2") and rows.

        ``allowed``: a :class:`~tierstore.index.selection.RowSelection`; other rows are never returned.
        """
        torch = self.torch
        x, norms, ids, owner = self._arena or self._build_arena()
        n, l2 = xq.shape[0], self.codes.metric == "l2"
        take = min(candidates, int(ids.shape[0]))
        scores = np.full((n, candidates), np.inf if l2 else -np.inf, np.float32)
        rows = np.full((n, candidates), -1, np.int64)
        if take == 0:
            return scores, rows
        with torch.no_grad():
            q = torch.from_numpy(np.ascontiguousarray(xq, dtype=np.float32)).to(self.device)
            q_norm = q.norm(dim=1, keepdim=True).clamp_min(1e-30)
            dots = ((q / q_norm).to(self.dtype) @ x.T).float() * (q_norm * self._scale)
            dist = norms[None, :] - 2.0 * dots if l2 else -dots   # smaller is better
            probed = torch.zeros((n, self._nslots + 1), dtype=torch.bool, device=self.device)
            wanted = torch.from_numpy(np.where(lists >= 0, lists, self._nslots)).to(self.device)
            probed.scatter_(1, wanted, True)
            dist = dist.masked_fill(~probed[:, :self._nslots][:, owner], float("inf"))
            if allowed is not None:
                ok = torch.from_numpy(allowed.mask).to(self.device)[ids]
                dist = dist.masked_fill(~ok[None, :], float("inf"))
            best, where = torch.topk(dist, take, dim=1, largest=False)
            found = ids[where]
            found = torch.where(torch.isinf(best), torch.full_like(found, -1), found)
            best = best.cpu().numpy()
            if l2:
                best = best + (xq * xq).sum(1, keepdims=True)
        rows[:, :take] = found.cpu().numpy()
        scores[:, :take] = best if l2 else -best
        return scores, rows
