"""Quantizers: how a posting list's vectors are coded for scanning.

:func:`train_codes` trains a format by name and :func:`load_codes` reads a stored one.
The faiss-scanned formats (``sq8``, ``sq4``, ``rabitq``, ``pq4fs``) are in
:mod:`.faiss_codes`; ``osq`` (SQUASH's variance-based bit allocation, 4 bits per
dimension on average, numpy-scanned) in :mod:`.osq_codes`. Every format gives the
index the same surface: ``encode_lists``, ``new_scanner`` (``load_list``,
``clear_list``, ``search``, ``search_preassigned``), ``set_centroids``,
``to_bytes``/``from_bytes``.

``DEFAULT_QUANTIZER`` is the one that measured best (``bench/ann.py`` on manpages:
4-bit PQ fast-scan with exact rerank gives the highest single-query QPS at recall@10
0.95 of all formats; see docs/index.md for the figures).
"""

from __future__ import annotations

import numpy as np

from ...errors import InvalidArgument
from .faiss_codes import FAISS_FORMATS, FaissCodes, FaissScanner

__all__ = ["FaissCodes", "FaissScanner", "QUANTIZERS", "DEFAULT_QUANTIZER", "train_codes", "load_codes"]

QUANTIZERS = (*FAISS_FORMATS, "osq")
DEFAULT_QUANTIZER = "pq4fs"


def train_codes(name: str, x: np.ndarray, centroids: np.ndarray, *, metric: str, seed: int = 0):
    """Train the code format ``name`` on ``x`` for lists with these ``centroids``."""
    if name == "osq":
        from .osq_codes import OsqCodes

        return OsqCodes.train(name, x, centroids, metric=metric, seed=seed)
    if name in FAISS_FORMATS:
        return FaissCodes.train(name, x, centroids, metric=metric, seed=seed)
    raise InvalidArgument(f"unknown quantizer {name!r}; choose one of {QUANTIZERS}")


def load_codes(name: str, metric: str, data: bytes, centroids: np.ndarray):
    """A trained format from its stored bytes (:class:`~tierstore.errors.CorruptData` if damaged)."""
    from ...errors import CorruptData

    if name == "osq":
        from .osq_codes import OsqCodes

        return OsqCodes.from_bytes(name, metric, data, centroids)
    if name in FAISS_FORMATS:
        return FaissCodes.from_bytes(name, metric, data)
    raise CorruptData(f"the stored index names an unknown quantizer {name!r}")
