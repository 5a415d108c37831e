"""What a search returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["SearchResult"]


@dataclass(frozen=True, eq=False)
class SearchResult:
    """``ids`` int64 and ``distances`` float32, both ``(nq, k)``, nearest first.

    Rows with fewer than ``k`` hits are padded with id ``-1`` and distance ``inf``.
    Distances are smaller-is-better for every metric: squared L2 (``"l2"``), negative
    inner product (``"ip"``), ``1 - cosine similarity`` (``"cosine"``). ``stats`` says
    how the search ran (lists probed, candidates, tier reads).
    """

    ids: np.ndarray
    distances: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __repr__(self) -> str:
        nq, k = self.ids.shape
        return f"<SearchResult {nq} queries x k={k}>"
