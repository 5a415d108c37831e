"""A byte-budgeted cache of verified KV chunk payloads held on one torch device (a GPU).

``db.kv_cache(..., gpu_cache=bytes)`` (or ``connect(..., gpu_cache=bytes)``) keeps the
most recently loaded chunks in device memory, so a chunk that a later request loads to
the same device costs one device-to-device copy and no host read, host-to-device
transfer or checksum pass. What is admitted was verified on its way in (a chunk read
from a lower tier is checked before it is cached), so hits are not checked again.

Hits return a fresh copy of the payload (the decoded tensors never alias the cache, so
a caller may modify them). Eviction is least-recently-used within ``capacity_bytes``; a
chunk larger than the whole budget is not cached.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from ..._optional import torch as _torch
from ...errors import InvalidArgument
from .chunks import ChunkHeader

__all__ = ["DeviceChunkCache"]


class DeviceChunkCache:
    """Chunk payloads (uint8 tensors) on ``device`` under ``capacity_bytes``."""

    def __init__(self, capacity_bytes: int, device: Any = None) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise InvalidArgument(f"gpu_cache must be a positive byte count, got {capacity_bytes!r}")
        from ...tiers.gpu import _resolve_device

        torch = _torch()
        self.device = _resolve_device(torch, device)
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, tuple[ChunkHeader, Any]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def serves(self, device: Any) -> bool:
        """Whether loads to ``device`` can use this cache (same device type and index)."""
        if device is None:
            return False
        torch = _torch()
        wanted = torch.device(device)
        if wanted.type != self.device.type:
            return False
        return wanted.index is None or self.device.index is None or wanted.index == self.device.index

    def get(self, key: str) -> tuple[ChunkHeader, Any] | None:
        """``(header, payload copy)`` of a cached chunk, or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
        header, payload = entry
        return header, payload.clone()

    def put(self, key: str, header: ChunkHeader, payload: Any) -> Any:
        """Admit a verified payload (moved to the device if it is elsewhere); returns the
        device tensor the caller may decode from (not the cached one)."""
        on_device = payload.to(self.device)  # the caller decodes from this one
        size = int(on_device.numel())
        if size > self.capacity_bytes:
            return on_device
        cached = on_device.clone()  # the cache's own copy: nothing the caller holds aliases it
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= int(old[1].numel())
            while self._entries and self._bytes + size > self.capacity_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= int(dropped.numel())
                self.evictions += 1
            self._entries[key] = (header, cached)
            self._bytes += size
        return on_device

    def discard(self, key: str) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= int(old[1].numel())

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"device": str(self.device), "capacity_bytes": self.capacity_bytes, "bytes": self._bytes,
                    "chunks": len(self._entries), "hits": self.hits, "misses": self.misses,
                    "evictions": self.evictions}

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
