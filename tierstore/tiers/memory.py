"""MemoryTier: values in process memory, under an optional byte budget."""

from __future__ import annotations

from ..errors import ConfigError, TierUnavailable
from ._resident import ResidentTier
from .keys import validate_key

__all__ = ["MemoryTier"]


class MemoryTier(ResidentTier):
    """Values held in this process's memory; lost on ``close()``.

    ``capacity_bytes`` bounds the bytes held: a ``put`` that would pass it raises
    :class:`CapacityError` (a :class:`~tierstore.tiers.TieredStore` evicts before it
    gets there). ``get`` returns the stored ``bytes`` object itself, without a copy.

    With ``pinned=True`` values are kept in page-locked torch buffers (torch with CUDA
    required) and :meth:`get_tensor` hands them out for fast, asynchronous GPU upload;
    ``get`` then copies into ``bytes``.
    """

    kind = "memory"
    _inline_async = True

    def __init__(self, capacity_bytes: int | None = None, *, pinned: bool = False, name: str | None = None) -> None:
        super().__init__(name=name, capacity_bytes=capacity_bytes)
        self._torch = None
        if pinned:
            try:
                import torch
            except ImportError as exc:
                raise ConfigError("pinned=True needs torch; install tierstore[kv] or use pinned=False") from exc
            if not torch.cuda.is_available():
                raise ConfigError("pinned=True needs a CUDA device (page-locked memory is a CUDA feature); "
                                  "use pinned=False on this machine")
            self._torch = torch
        self.pinned = pinned

    def _store_form(self, value: memoryview):
        if self._torch is None:
            return value.obj if type(value.obj) is bytes and value.nbytes == len(value.obj) else value.tobytes()
        torch = self._torch
        try:
            buf = torch.empty(value.nbytes, dtype=torch.uint8, pin_memory=True)
            if value.nbytes:
                buf.numpy()[:] = memoryview(value)
        except RuntimeError as exc:
            raise TierUnavailable(f"could not allocate {value.nbytes} bytes of pinned memory: {exc}") from exc
        return buf

    def _as_bytes(self, stored) -> bytes:
        return stored if type(stored) is bytes else stored.numpy().tobytes()

    def _get(self, key: str) -> bytes:
        return self._as_bytes(self._lookup(key))

    def _get_range(self, key: str, start: int, end: int | None) -> bytes:
        stored = self._lookup(key)
        if type(stored) is bytes:
            return stored[start:end]
        return stored.numpy()[start:end].tobytes()

    def _put(self, key: str, value: memoryview, create: bool) -> None:
        self._check_fits(value.nbytes)
        self._install(key, self._store_form(value), create)

    @staticmethod
    def _size_of(stored) -> int:
        return len(stored) if type(stored) is bytes else int(stored.numel())

    def _extra(self) -> dict:
        return {"pinned": self.pinned}

    def get_tensor(self, key: str):
        """Return the pinned torch buffer of ``key`` (only with ``pinned=True``); no copy."""
        if self._torch is None:
            raise ConfigError("get_tensor needs a MemoryTier created with pinned=True")
        key = validate_key(key)
        self._check_open()
        return self._counted_read(lambda: self._lookup(key), size=lambda t: int(t.numel()))

    def __reduce__(self):
        # A volatile tier pickles as its configuration: the copy arrives empty, which is
        # what a cache sent to another process should be.
        return (_rebuild_memory_tier, (self.capacity_bytes, self.pinned, self.name))


def _rebuild_memory_tier(capacity_bytes, pinned, name):
    return MemoryTier(capacity_bytes, pinned=pinned, name=name)
