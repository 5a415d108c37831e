"""The shared machinery of every byte tier.

:class:`BaseTier` owns what is the same in every backend: key and value validation,
``closed`` checks, statistics, the batched defaults, and the async twins. A backend
implements a handful of ``_underscored`` primitives that receive already-validated
arguments; the public methods wrap them.

Async twins run the sync primitive on a bounded thread pool owned by the tier (created
lazily, re-created after ``fork``), so lmdb, boto3 and disk calls never block the event
loop. A backend whose primitives never block (memory, GPU) sets ``_inline_async = True``
and its twins run inline. No event loop is created or stored anywhere.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import os
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from ..errors import AlreadyExists, InvalidArgument, InvalidType, NotFound, StoreClosed
from .keys import validate_key, validate_prefix
from .stats import StatsCounter, TierStats

__all__ = ["BaseTier", "as_buffer", "normalize_items", "normalize_ranges", "check_range", "PUT_MODES"]

PUT_MODES = ("overwrite", "create")


def as_buffer(value: object) -> memoryview:
    """Return a flat byte view of ``value`` or raise :class:`InvalidType`.

    Accepts ``bytes``, ``bytearray``, ``memoryview`` and any C-contiguous object with the
    buffer protocol (a numpy array, say). ``None``, ``str`` and numbers are rejected: text
    must be encoded by the caller, so no tier guesses an encoding.
    """
    if isinstance(value, bytes):
        return memoryview(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        raise InvalidType(f"value must be bytes-like (bytes, bytearray, memoryview, contiguous array), "
                          f"got {type(value).__name__}" + ("; encode text first" if isinstance(value, str) else ""))
    try:
        view = memoryview(value)  # type: ignore[arg-type]
    except TypeError as exc:
        raise InvalidType(f"value must be bytes-like, got {type(value).__name__}") from exc
    if not view.c_contiguous:
        raise InvalidArgument("value must be C-contiguous; copy it first (numpy.ascontiguousarray)")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def check_mode(mode: object) -> bool:
    """Return True for ``mode="create"``; raise for anything but the two modes."""
    if mode not in PUT_MODES:
        raise InvalidArgument(f"mode must be 'overwrite' or 'create', got {mode!r}")
    return mode == "create"


def check_range(start: object, end: object) -> tuple[int, int | None]:
    """Validate a byte range ``[start, end)``; ``end=None`` means to the end of the value."""
    if isinstance(start, bool) or not isinstance(start, int):
        raise InvalidType(f"start must be an int, got {type(start).__name__}")
    if end is not None and (isinstance(end, bool) or not isinstance(end, int)):
        raise InvalidType(f"end must be an int or None, got {type(end).__name__}")
    if start < 0:
        raise InvalidArgument(f"start must be >= 0, got {start}")
    if end is not None and end < start:
        raise InvalidArgument(f"end ({end}) must be >= start ({start})")
    return start, end


def normalize_ranges(requests: object) -> list[tuple[str, int, int | None]]:
    """Validate the ``(key, start, end)`` requests of a ``get_ranges`` before any read."""
    if isinstance(requests, (str, bytes)) or not isinstance(requests, Iterable):
        raise InvalidType(f"requests must be an iterable of (key, start, end) tuples, got {type(requests).__name__}")
    out = []
    for request in requests:
        if not isinstance(request, (tuple, list)) or len(request) != 3:
            raise InvalidType(f"each request must be a (key, start, end) tuple, got {request!r:.60}")
        key, start, end = request
        # The common case (int start, int or None end, in order) skips check_range's calls.
        if not (type(start) is int and start >= 0 and (end is None or type(end) is int and end >= start)):
            start, end = check_range(start, end)
        out.append((validate_key(key), start, end))
    return out


def normalize_items(items: object) -> list[tuple[str, memoryview]]:
    """Validate the ``(key, value)`` pairs of a ``put_many`` before anything is written."""
    if isinstance(items, Mapping):
        pairs = list(items.items())
    elif isinstance(items, Iterable) and not isinstance(items, (str, bytes)):
        pairs = list(items)
    else:
        raise InvalidType(f"items must be a mapping or an iterable of (key, value) pairs, got {type(items).__name__}")
    out = []
    for pair in pairs:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise InvalidType(f"each item must be a (key, value) tuple, got {pair!r:.60}")
        out.append((validate_key(pair[0]), as_buffer(pair[1])))
    return out


class BaseTier(abc.ABC):
    """Common surface of all byte tiers; see :mod:`tierstore.tiers` for the contract.

    Subclasses implement ``_get``, ``_get_range``, ``_put``, ``_delete``, ``_contains``,
    ``_size``, ``_list`` and ``_close``; they may override ``_get_many`` / ``_put_many`` /
    ``_get_ranges`` with a faster batched path.
    """

    kind: ClassVar[str] = "tier"
    #: True when values survive ``close()`` and a reopen of the same location.
    durable: ClassVar[bool] = False
    #: True when the primitives never block, so async twins run inline.
    _inline_async: ClassVar[bool] = False

    def __init__(self, *, name: str | None = None, max_workers: int = 8,
                 capacity_bytes: int | None = None) -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise InvalidArgument(f"max_workers must be a positive int, got {max_workers!r}")
        if capacity_bytes is not None and (isinstance(capacity_bytes, bool)
                                           or not isinstance(capacity_bytes, int) or capacity_bytes <= 0):
            raise InvalidArgument(f"capacity_bytes must be a positive int or None, got {capacity_bytes!r}")
        self.name = name or self.kind
        self.capacity_bytes = capacity_bytes
        self._max_workers = max_workers
        self._executor: ThreadPoolExecutor | None = None
        self._executor_pid = 0
        self._executor_lock = threading.Lock()
        self._closed = False
        self._stats = StatsCounter()

    # ----------------------------------------------------------------- primitives
    @abc.abstractmethod
    def _get(self, key: str) -> bytes:
        ...

    def _get_range(self, key: str, start: int, end: int | None) -> bytes:
        return self._get(key)[start:end]

    @abc.abstractmethod
    def _put(self, key: str, value: memoryview, create: bool) -> None:
        ...

    @abc.abstractmethod
    def _delete(self, key: str) -> bool:
        ...

    @abc.abstractmethod
    def _contains(self, key: str) -> bool:
        ...

    def _size(self, key: str) -> int:
        return len(self._get(key))

    @abc.abstractmethod
    def _list(self, prefix: str) -> Iterable[str]:
        ...

    def _close(self) -> None:
        pass

    def _get_many(self, keys: list[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for key in keys:
            try:
                out.append(self._get(key))
            except NotFound:
                out.append(None)
        return out

    def _get_ranges(self, requests: list[tuple[str, int, int | None]]) -> list[bytes | None]:
        """The slices of validated ``(key, start, end)`` requests in order, ``None`` where the key is missing."""
        get_range = self._get_range
        out: list[bytes | None] = []
        for key, start, end in requests:
            try:
                out.append(get_range(key, start, end))
            except NotFound:
                out.append(None)
        return out

    def _put_many(self, items: list[tuple[str, memoryview]], create: bool) -> None:
        conflicts = []
        for key, value in items:
            try:
                self._put(key, value, create)
            except AlreadyExists:
                conflicts.append(key)
        if conflicts:
            raise AlreadyExists(f"{len(conflicts)} key(s) already exist and were left unchanged "
                                f"(mode='create'): {conflicts[:5]}")

    def _extra_stats(self) -> dict[str, Any]:
        """Backend-specific figures: ``items``/``bytes_stored`` and an ``extra`` dict."""
        return {}

    # ------------------------------------------------------------------- surface
    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"{self.kind} tier {self.name!r} is closed")

    def _counted_read(self, read, size=len):
        """Run ``read()`` and count it as one lookup: a hit of ``size(value)`` bytes, or a miss."""
        try:
            value = read()
        except NotFound:
            self._stats.record_get(False)
            raise
        self._stats.record_get(True, size(value))
        return value

    def get(self, key: str) -> bytes:
        """Return the value of ``key``; raise :class:`NotFound` when it is absent."""
        key = validate_key(key)
        self._check_open()
        return self._counted_read(lambda: self._get(key))

    def get_range(self, key: str, start: int, end: int | None = None) -> bytes:
        """Return bytes ``[start, end)`` of the value, clipped to its length like a slice."""
        key = validate_key(key)
        start, end = check_range(start, end)
        self._check_open()
        return self._counted_read(lambda: self._get_range(key, start, end))

    def put(self, key: str, value: object, *, mode: str = "overwrite") -> None:
        """Store ``value`` under ``key`` atomically (readers see the old or the new value).

        With ``mode="create"`` the write fails with :class:`AlreadyExists` when the key
        is present, and the stored value is left unchanged.
        """
        key = validate_key(key)
        view = as_buffer(value)
        create = check_mode(mode)
        self._check_open()
        self._put(key, view, create)
        self._stats.record_put(view.nbytes)

    def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it was present (S3 always answers True). Idempotent."""
        key = validate_key(key)
        self._check_open()
        existed = self._delete(key)
        self._stats.add("deletes")
        return existed

    def contains(self, key: str) -> bool:
        """Return whether ``key`` is present."""
        key = validate_key(key)
        self._check_open()
        return self._contains(key)

    def size(self, key: str) -> int:
        """Return the length in bytes of the value of ``key``; :class:`NotFound` if absent."""
        key = validate_key(key)
        self._check_open()
        return self._size(key)

    def list(self, prefix: str = "") -> list[str]:
        """Return the sorted keys that start with ``prefix`` (plain string prefix)."""
        prefix = validate_prefix(prefix)
        self._check_open()
        return sorted(self._list(prefix))

    def get_many(self, keys: Iterable[str]) -> list[bytes | None]:
        """Return the values of ``keys`` in order, ``None`` for each missing key."""
        if isinstance(keys, (str, bytes)):
            raise InvalidType("keys must be an iterable of str, not a single str/bytes")
        keys = [validate_key(k) for k in keys]
        self._check_open()
        values = self._get_many(keys)
        found = [v for v in values if v is not None]
        self._stats.record_gets(len(found), len(values) - len(found), sum(map(len, found)))
        return values

    def get_ranges(self, requests: Iterable[tuple[str, int, int | None]]) -> list[bytes]:
        """Return bytes ``[start, end)`` of each ``(key, start, end)`` request, in order.

        Each slice is clipped like :meth:`get_range`'s. Every request is validated before
        any read; a missing key raises :class:`NotFound` naming it (the other requests
        are still read and counted). Counted like one ``get_range`` per request.
        """
        requests = normalize_ranges(requests)
        values = self._read_ranges(requests)
        missing = [req[0] for req, value in zip(requests, values) if value is None]
        if missing:
            raise NotFound(f"key {missing[0]!r} not found in {self.kind} tier {self.name!r} "
                           f"({len(missing)} of {len(requests)} ranged read(s) missed)")
        return values  # type: ignore[return-value]

    def _read_ranges(self, requests: list[tuple[str, int, int | None]]) -> list[bytes | None]:
        """:meth:`get_ranges` of already-validated requests, ``None`` for a missing key, counted.

        A :class:`~tierstore.tiers.TieredStore` reads each level through this, so that a
        key missing from one level does not fail the batch.
        """
        self._check_open()
        values = self._get_ranges(requests)
        hits = nbytes = 0
        for value in values:
            if value is not None:
                hits += 1
                nbytes += len(value)
        self._stats.record_gets(hits, len(values) - hits, nbytes)
        return values

    def put_many(self, items: Mapping[str, object] | Iterable[tuple[str, object]], *,
                 mode: str = "overwrite") -> None:
        """Store many values. All keys and values are validated before anything is written.

        Each value is written atomically; the batch is not a transaction (except in LMDB).
        In ``mode="create"`` the keys that already exist are reported in one
        :class:`AlreadyExists` after the others are written.
        """
        pairs = normalize_items(items)
        create = check_mode(mode)
        self._check_open()
        self._put_many(pairs, create)
        self._stats.record_put(sum(v.nbytes for _, v in pairs), len(pairs))

    def stats(self) -> TierStats:
        """Return a snapshot of this tier's counters."""
        extra = dict(self._extra_stats())
        fixed = {"name": self.name, "kind": self.kind, "capacity_bytes": self.capacity_bytes,
                 "items": extra.pop("items", None), "bytes_stored": extra.pop("bytes_stored", None),
                 "extra": extra.pop("extra", {})}
        return self._stats.snapshot(**fixed)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release the backend and the thread pool. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._close()
        finally:
            with self._executor_lock:
                executor, self._executor = self._executor, None
            if executor is not None and self._executor_pid == os.getpid():
                executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close_async()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.name!r} {state}>"

    # ---------------------------------------------------------------- async twins
    def _pool(self) -> ThreadPoolExecutor:
        pid = os.getpid()
        with self._executor_lock:
            if self._executor is None or self._executor_pid != pid:
                # A pool inherited through fork has no threads; make a fresh one.
                self._executor = ThreadPoolExecutor(self._max_workers, thread_name_prefix=f"tierstore-{self.kind}")
                self._executor_pid = pid
            return self._executor

    async def _run(self, fn, *args, **kwargs):
        if self._inline_async:
            return fn(*args, **kwargs)
        self._check_open()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool(), functools.partial(fn, *args, **kwargs))

    async def get_async(self, key: str) -> bytes:
        return await self._run(self.get, key)

    async def get_range_async(self, key: str, start: int, end: int | None = None) -> bytes:
        return await self._run(self.get_range, key, start, end)

    async def put_async(self, key: str, value: object, *, mode: str = "overwrite") -> None:
        return await self._run(self.put, key, value, mode=mode)

    async def delete_async(self, key: str) -> bool:
        return await self._run(self.delete, key)

    async def contains_async(self, key: str) -> bool:
        return await self._run(self.contains, key)

    async def size_async(self, key: str) -> int:
        return await self._run(self.size, key)

    async def list_async(self, prefix: str = "") -> list[str]:
        return await self._run(self.list, prefix)

    async def get_many_async(self, keys: Iterable[str]) -> list[bytes | None]:
        return await self._run(self.get_many, list(keys) if not isinstance(keys, (str, bytes)) else keys)

    async def get_ranges_async(self, requests: Iterable[tuple[str, int, int | None]]) -> list[bytes]:
        if isinstance(requests, Iterable) and not isinstance(requests, (str, bytes)):
            requests = list(requests)  # a generator is consumed here, not on a pool thread
        return await self._run(self.get_ranges, requests)

    async def put_many_async(self, items, *, mode: str = "overwrite") -> None:
        return await self._run(self.put_many, items, mode=mode)

    async def close_async(self) -> None:
        # close() joins the pool, so it must not run on one of the pool's own threads.
        await asyncio.get_running_loop().run_in_executor(None, self.close)
