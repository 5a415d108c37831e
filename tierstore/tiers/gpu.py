"""GpuTier: values as uint8 torch tensors on one device, under a byte budget."""

from __future__ import annotations

from typing import Any

import numpy

from .._optional import require
from ..errors import CapacityError, ConfigError, InvalidArgument, InvalidType, TierUnavailable
from ._resident import ResidentTier
from .base import check_mode
from .keys import validate_key

__all__ = ["GpuTier"]


def _first_line(exc: BaseException) -> str:
    # CUDA errors append several lines of debugging advice; the full text stays in __cause__.
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _resolve_device(torch, device: object):
    """Return the concrete ``torch.device`` that ``device`` names, proven usable by a probe."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise InvalidType(f"device must be a str such as 'cuda:0' or 'cpu', a torch.device or None, "
                          f"got {type(device).__name__}")
    try:
        # A round trip proves the device exists, is compiled in, and holds readable data
        # ('meta' has no data). The probe's device is concrete: 'cuda' becomes 'cuda:0'.
        probe = torch.zeros(1, dtype=torch.uint8, device=torch.device(device))
        probe.cpu()
    except (RuntimeError, AssertionError, NotImplementedError, ValueError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not usable by GpuTier ({_first_line(exc)}); use device='cuda' or "
                          f"'cuda:N' on a CUDA machine, 'cpu', or None to pick automatically") from exc
    return probe.device


class GpuTier(ResidentTier):
    """Values held as 1-D ``torch.uint8`` tensors on one torch device; lost on ``close()``.

    ``capacity_bytes`` is required (device memory is never unbounded): a ``put`` that
    would pass it raises :class:`CapacityError` (a :class:`~tierstore.tiers.TieredStore`
    evicts before it gets there), and so does a device out-of-memory error. Other device
    errors raise :class:`TierUnavailable`; torch's exception is in ``__cause__``.

    ``device=None`` picks ``"cuda"`` when ``torch.cuda.is_available()``, else ``"cpu"``;
    :attr:`device` and ``stats().extra["device"]`` say which (``"cuda"`` resolves to the
    current device, ``"cuda:0"`` say). ``device="cpu"`` behaves the same on machines
    without a GPU, which is what tests use.

    ``put`` uploads the caller's buffer with one host-to-device copy (on ``"cpu"`` it
    copies once), so the tier never keeps a reference to the caller's buffer.
    ``get`` makes one device-to-host copy into a staging buffer and returns ``bytes``;
    ``get_range`` copies only the slice. On CUDA the staging buffers are page-locked and
    come from torch's caching host allocator, which keeps them for reuse: host memory
    about the size of the largest values in flight at once stays page-locked.
    :meth:`get_tensor` and :meth:`put_tensor` move tensors without any host round trip.
    Freed values return to torch's caching allocator, not to the driver.

    Async twins run on the tier's thread pool (``max_workers`` threads); torch releases
    the GIL during copies.
    """

    kind = "gpu"
    _inline_async = False

    def __init__(self, capacity_bytes: int, device: Any = None, *, name: str | None = None,
                 max_workers: int = 4) -> None:
        if capacity_bytes is None:
            raise ConfigError("GpuTier needs capacity_bytes (device memory is never unbounded); "
                              "give the byte budget this tier may hold, e.g. capacity_bytes=8 << 30")
        super().__init__(name=name, max_workers=max_workers, capacity_bytes=capacity_bytes)
        self._torch = require("torch", "kv", "GpuTier")
        self.device = _resolve_device(self._torch, device)

    # ------------------------------------------------------------------ storage
    def _admit(self, key: str, size: int, create: bool) -> None:
        """Refuse a write before any device memory is spent on it."""
        self._check_fits(size)
        with self._lock:
            self._reserve(key, size, create)

    def _store(self, key: str, size: int, make_tensor, create: bool) -> None:
        # Check, copy outside the lock (copies may be slow and run on several threads),
        # then check again on install: another writer may have filled the tier meanwhile.
        self._admit(key, size, create)
        self._install(key, self._device_call(make_tensor, f"store {size} bytes"), create)

    def _device_call(self, fn, action: str):
        """Run ``fn`` and translate torch's device errors (all ``RuntimeError``)."""
        torch = self._torch
        try:
            return fn()
        except torch.cuda.OutOfMemoryError as exc:
            raise CapacityError(f"{self.device} ran out of memory trying to {action} in gpu tier {self.name!r}; "
                                f"lower capacity_bytes or free device memory used by other code") from exc
        except RuntimeError as exc:
            raise TierUnavailable(f"device {self.device} failed to {action} in gpu tier {self.name!r}: "
                                  f"{_first_line(exc)}") from exc

    def _staging(self, nbytes: int):
        """A host buffer for one transfer; page-locked for a CUDA device.

        Page-locked buffers come from torch's caching host allocator, so they are reused
        rather than allocated per call, and the copy is one DMA. Measured on an H200: a
        256 MiB ``put`` of ``bytes`` ran at 14 GB/s, against 8 GB/s for
        ``torch.frombuffer(...).to("cuda")`` of a writable buffer and 1.4 GB/s through a
        fresh pageable copy; a 4 MiB ``get`` at 8 GB/s against 0.7 GB/s for ``.cpu()``.
        """
        torch = self._torch
        if self.device.type == "cuda":
            try:
                return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            except RuntimeError:
                pass  # page-locked memory is exhausted or refused: pageable still works
        return torch.empty(nbytes, dtype=torch.uint8)

    def _upload(self, value: memoryview):
        """Return a new uint8 tensor on the device holding a copy of ``value``."""
        torch = self._torch
        if value.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8, device=self.device)
        if self.device.type == "cpu":
            # The stored tensor must not alias the caller's buffer: copy once.
            host = torch.empty(value.nbytes, dtype=torch.uint8)
            host.numpy()[:] = value
            return host
        # Wrap the caller's buffer without a copy (DLPack accepts read-only buffers such as
        # bytes, where torch.frombuffer warns) and upload it with one host-to-device copy.
        # Measured on an H200 this matched a raw frombuffer(...).to("cuda") (ratio 1.01),
        # where staging through a pinned buffer first reached only 0.65.
        wrapped = torch.from_dlpack(numpy.frombuffer(value, dtype=numpy.uint8))
        return wrapped.to(self.device)

    def _raw_bytes(self, tensor):
        """Return ``tensor``'s raw bytes as a new 1-D uint8 tensor on the device, never host-staged."""
        torch = self._torch
        dense = tensor.detach()
        flat = dense.contiguous().reshape(-1).view(torch.uint8)
        if flat.device != self.device:
            return flat.to(self.device)
        # contiguous() of a non-contiguous tensor is already a private copy; otherwise the
        # view shares the caller's storage and must be cloned.
        return flat.clone() if dense.is_contiguous() else flat

    # ---------------------------------------------------------------- primitives
    def _to_host(self, tensor) -> bytes:
        def download() -> bytes:
            if self.device.type == "cpu" or tensor.numel() == 0:
                return tensor.cpu().numpy().tobytes()
            host = self._staging(tensor.numel())
            host.copy_(tensor)
            return host.numpy().tobytes()

        return self._device_call(download, f"read {tensor.numel()} bytes")

    def _get(self, key: str) -> bytes:
        return self._to_host(self._lookup(key))

    def _get_range(self, key: str, start: int, end: int | None) -> bytes:
        return self._to_host(self._lookup(key)[start:end])

    def _put(self, key: str, value: memoryview, create: bool) -> None:
        self._store(key, value.nbytes, lambda: self._upload(value), create)

    @staticmethod
    def _size_of(stored) -> int:
        return int(stored.numel())

    def _extra(self) -> dict:
        return {"device": str(self.device)}

    # ------------------------------------------------------------ tensor surface
    def get_tensor(self, key: str):
        """Return the stored 1-D ``torch.uint8`` tensor of ``key`` on :attr:`device`, without a copy.

        Treat it as read-only: writing into it changes the stored value for every
        reader. Reinterpret it with ``t.view(dtype).reshape(shape)`` (the caller keeps
        dtype and shape; the tier stores bytes only). Raises :class:`NotFound` when absent.
        """
        key = validate_key(key)
        self._check_open()
        return self._counted_read(lambda: self._lookup(key), size=lambda t: int(t.numel()))

    def put_tensor(self, key: str, tensor: Any, *, mode: str = "overwrite") -> None:
        """Store the raw bytes of ``tensor`` (any dtype, shape and device) under ``key``.

        The bytes are ``tensor.contiguous().view(torch.uint8)``, copied to :attr:`device`
        without a host round trip; dtype and shape are not recorded, so ``get`` and
        :meth:`get_tensor` return the bytes. The tier never aliases ``tensor``. ``mode``
        works as in :meth:`put`.
        """
        key = validate_key(key)
        torch = self._torch
        if not isinstance(tensor, torch.Tensor):
            raise InvalidType(f"tensor must be a torch.Tensor, got {type(tensor).__name__}; use put() for bytes")
        if tensor.layout != torch.strided or tensor.is_quantized:
            raise InvalidArgument(f"put_tensor needs a dense, unquantized tensor, got layout {tensor.layout}"
                                  f"{' (quantized)' if tensor.is_quantized else ''}; call .to_dense() or "
                                  ".dequantize() first")
        if tensor.device.type == "meta":
            raise InvalidArgument("put_tensor got a 'meta' tensor, which has no data; materialize it first")
        create = check_mode(mode)
        self._check_open()
        size = tensor.numel() * tensor.element_size()
        self._store(key, size, lambda: self._raw_bytes(tensor), create)
        self._stats.record_put(size)
