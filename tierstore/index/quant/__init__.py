"""Quantizers: how a posting list's vectors are coded for scanning.

``make_codes(name, ...)`` trains a format by name. The faiss-scanned formats (``sq8``,
``sq4``, ``rabitq``, ``pq4fs``) are in :mod:`.faiss_codes`; ``DEFAULT_QUANTIZER`` is the
one that measured best on our benchmarks (``bench/ann.py``: 4-bit PQ fast-scan with
exact rerank reaches recall@10 0.95 at the highest single-query QPS on both datasets).
"""

from __future__ import annotations

from .faiss_codes import FAISS_FORMATS, FaissCodes, clear_list, load_list

__all__ = ["FaissCodes", "FAISS_FORMATS", "QUANTIZERS", "DEFAULT_QUANTIZER", "load_list", "clear_list"]

QUANTIZERS = FAISS_FORMATS
DEFAULT_QUANTIZER = "pq4fs"
