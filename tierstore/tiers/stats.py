"""Statistics kept by tiers and by the hierarchy (plain data, no I/O)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields

__all__ = ["TierStats", "StatsCounter"]


@dataclass(frozen=True)
class TierStats:
    """A snapshot of one tier's counters.

    ``gets`` counts key lookups (``get``, ``get_range`` and each key of ``get_many``);
    ``hits + misses == gets``. Byte counters count payload bytes moved through the
    public surface. ``evictions``, ``promotions`` and ``demotions`` are kept by a
    :class:`~tierstore.tiers.TieredStore` for each of its levels and stay 0 for a tier
    used alone. ``items`` and ``bytes_stored`` are ``None`` where the backend cannot
    tell them cheaply (S3).
    """

    name: str
    kind: str
    gets: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0
    deletes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0
    promotions: int = 0
    demotions: int = 0
    items: int | None = None
    bytes_stored: int | None = None
    capacity_bytes: int | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_COUNTERS = ("gets", "hits", "misses", "puts", "deletes", "bytes_read", "bytes_written",
             "evictions", "promotions", "demotions")


class StatsCounter:
    """Thread-safe counters behind :class:`TierStats` (one lock, plain integers)."""

    __slots__ = ("_lock",) + _COUNTERS

    def __init__(self) -> None:
        self._lock = threading.Lock()
        for name in _COUNTERS:
            setattr(self, name, 0)

    def record_get(self, hit: bool, nbytes: int = 0) -> None:
        with self._lock:
            self.gets += 1
            if hit:
                self.hits += 1
                self.bytes_read += nbytes
            else:
                self.misses += 1

    def record_gets(self, hits: int, misses: int, nbytes: int) -> None:
        with self._lock:
            self.gets += hits + misses
            self.hits += hits
            self.misses += misses
            self.bytes_read += nbytes

    def record_put(self, nbytes: int, count: int = 1) -> None:
        with self._lock:
            self.puts += count
            self.bytes_written += nbytes

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    def snapshot(self, **fixed) -> TierStats:
        with self._lock:
            counts = {name: getattr(self, name) for name in _COUNTERS}
        return TierStats(**fixed, **counts)
