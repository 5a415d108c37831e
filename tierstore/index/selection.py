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
    """Rows ``i`` with ``mask[i]`` true may be scored; every other row is skipped in the scan."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = np.ascontiguousarray(mask, dtype=bool)
        self._bitmap: np.ndarray | None = None
        self._selector = None
        self._params: dict[int, faiss.SearchParametersIVF] = {}

    def faiss_params(self, nprobe: int) -> faiss.SearchParametersIVF:
        """Search parameters carrying the selector (built once per nprobe; the bitmap lives here)."""
        params = self._params.get(nprobe)
        if params is None:
            if self._selector is None:
                self._bitmap = np.packbits(self.mask, bitorder="little")
                self._selector = faiss.IDSelectorBitmap(self.mask.size, faiss.swig_ptr(self._bitmap))
            params = self._params[nprobe] = faiss.SearchParametersIVF(sel=self._selector, nprobe=nprobe)
        return params
