"""RowSelection: the rows a filtered scan may return, in the forms the scanners use.

A filter becomes a boolean mask over rows once per filter (and is memoised by the
collection); the faiss scanner needs it as an ``IDSelectorBitmap`` (a packed bitmap that
must outlive the search), built here on first use and then reused by every query.
"""

from __future__ import annotations

import faiss
import numpy as np

__all__ = ["RowSelection"]


class RowSelection:
    """Rows ``i`` with ``mask[i]`` true may be scored; every other row is skipped in the scan.

    Built from a mask, or from sorted row numbers (:meth:`from_rows`): a small set then
    becomes a faiss ``IDSelectorBatch`` (a hash set of its rows) rather than a bitmap of
    every row, so a small tenant costs bytes proportional to its own rows.
    """

    def __init__(self, mask: np.ndarray | None = None, *, rows: np.ndarray | None = None, size: int = 0) -> None:
        self._mask = None if mask is None else np.ascontiguousarray(mask, dtype=bool)
        self._rows = rows
        self.size = self._mask.size if mask is not None else size
        self._bitmap: np.ndarray | None = None
        self._selector = None
        self._params: dict[int, faiss.SearchParametersIVF] = {}

    @classmethod
    def from_rows(cls, rows: np.ndarray, size: int) -> RowSelection:
        """The selection of sorted ``rows`` among ``size`` rows."""
        return cls(rows=np.ascontiguousarray(rows, dtype=np.int64), size=size)

    @property
    def mask(self) -> np.ndarray:
        """The selection as a boolean mask over every row (made on first use)."""
        if self._mask is None:
            self._mask = np.zeros(self.size, bool)
            self._mask[self._rows] = True
        return self._mask

    @property
    def nbytes(self) -> int:
        total = 0 if self._mask is None else self._mask.nbytes
        total += 0 if self._bitmap is None else self._bitmap.nbytes
        return total + (0 if self._rows is None or self._bitmap is not None else self._rows.nbytes * 2)

    def faiss_params(self, nprobe: int) -> faiss.SearchParametersIVF:
        """Search parameters carrying the selector (built once per nprobe; the bitmap lives here)."""
        params = self._params.get(nprobe)
        if params is None:
            if self._selector is None:
                if self._rows is not None and self._rows.size * 64 < self.size:
                    self._selector = faiss.IDSelectorBatch(self._rows.size, faiss.swig_ptr(self._rows))
                else:
                    self._bitmap = np.packbits(self.mask, bitorder="little")
                    self._selector = faiss.IDSelectorBitmap(self.size, faiss.swig_ptr(self._bitmap))
            params = self._params[nprobe] = faiss.SearchParametersIVF(sel=self._selector, nprobe=nprobe)
        return params
