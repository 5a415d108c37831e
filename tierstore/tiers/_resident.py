"""ResidentTier: the bookkeeping shared by tiers whose values live in this process.

MemoryTier (bytes or pinned buffers) and GpuTier (device tensors) keep values in a dict
under a byte budget; this base holds the dict, the byte count and the lock, and the
budget checks. A subclass decides the stored form and says how big one is
(``_size_of``).
"""

from __future__ import annotations

import abc
import threading
from typing import Any

from ..errors import AlreadyExists, CapacityError, NotFound
from .base import BaseTier

__all__ = ["ResidentTier"]


class ResidentTier(BaseTier):
    """Values in a dict under ``capacity_bytes``; not durable."""

    durable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._values: dict[str, Any] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    @abc.abstractmethod
    def _size_of(stored: Any) -> int:
        """Bytes held by one stored value."""

    def _extra(self) -> dict[str, Any]:
        """Backend-specific entries for ``stats().extra``."""
        return {}

    def _lookup(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise NotFound(f"key {key!r} not found in {self.kind} tier {self.name!r}") from None

    def _check_fits(self, size: int) -> None:
        if self.capacity_bytes is not None and size > self.capacity_bytes:
            raise CapacityError(f"value of {size} bytes is larger than {self.kind} tier {self.name!r}'s capacity "
                                f"of {self.capacity_bytes} bytes; raise capacity_bytes or store it in a larger tier")

    def _reserve(self, key: str, size: int, create: bool) -> int:
        """Under ``self._lock``: raise unless ``key`` may take ``size`` bytes; return the old size."""
        old = self._values.get(key)
        if old is not None and create:
            raise AlreadyExists(f"key {key!r} already exists in {self.kind} tier {self.name!r}")
        old_size = 0 if old is None else self._size_of(old)
        if self.capacity_bytes is not None and self._bytes - old_size + size > self.capacity_bytes:
            raise CapacityError(f"{self.kind} tier {self.name!r} is full ({self._bytes} of {self.capacity_bytes} "
                                f"bytes used); cannot add {size} bytes: delete values or raise capacity_bytes")
        return old_size

    def _install(self, key: str, stored: Any, create: bool) -> None:
        """Check the budget again and store ``stored`` (the copy may have raced other writers)."""
        size = self._size_of(stored)
        with self._lock:
            old_size = self._reserve(key, size, create)
            self._values[key] = stored
            self._bytes += size - old_size

    def _size(self, key: str) -> int:
        return self._size_of(self._lookup(key))

    def _delete(self, key: str) -> bool:
        with self._lock:
            old = self._values.pop(key, None)
            if old is None:
                return False
            self._bytes -= self._size_of(old)
            return True

    def _contains(self, key: str) -> bool:
        return key in self._values

    def _list(self, prefix: str):
        with self._lock:
            keys = list(self._values)
        return [k for k in keys if k.startswith(prefix)]

    def _close(self) -> None:
        with self._lock:
            self._values.clear()
            self._bytes = 0

    def _extra_stats(self) -> dict:
        return {"items": len(self._values), "bytes_stored": self._bytes, "extra": self._extra()}

    @property
    def bytes_used(self) -> int:
        return self._bytes
