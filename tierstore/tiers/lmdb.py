"""LmdbTier: values in one LMDB environment, shared by threads and processes.

Layout: the environment (a directory) holds three named databases, ``data`` (storage
key -> value, as-is), ``long_keys`` (storage key -> full key, long keys only) and
``meta`` (the running ``bytes_stored`` total, kept in the same transactions).

Long keys: LMDB keys are at most ``env.max_key_size()`` bytes (511); tierstore keys up
to 1024. A longer key is stored as its first ``max_key_size - 33`` bytes, a NUL and the
32-byte blake2b digest of the whole key. Keys never contain NUL, so this cannot collide
with a short key, and it keeps the leading bytes: ``list(prefix)`` still seeks
(``set_range``) instead of scanning, and reads the full key from ``long_keys``.

Concurrency: read transactions hold the shared side of a readers/writer guard; write
transactions hold a write lock, and reads go on during a write. ``set_mapsize`` needs
no live transaction in the process, so it holds the write lock and the guard's
exclusive side. On ``MapFullError`` the writer aborts, grows the map to
``max(2 * size, used + 2 * batch + 8 MiB)`` and retries; on ``MapResizedError``
(another process grew it) the new size is adopted. A write transaction is aborted only
with readers held off: py-lmdb 3.0's abort of one can wait indefinitely while other
threads of the process keep starting read transactions.

Processes: tiers on one path in one process share one handle, which closes with its
last tier; a forked child reopens the path on first use. That machinery (the shared
handle, its locks and fork hooks) is in :mod:`tierstore.tiers._lmdb_env`.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any

import lmdb

from ..errors import AlreadyExists, ConfigError, InvalidArgument, NotFound, TierUnavailable
from ._lmdb_env import OPEN_ENVIRONMENTS, SharedEnv
from .base import BaseTier

__all__ = ["LmdbTier"]

_MiB = 1024 * 1024
_DIGEST_BYTES = 32
_BYTES_KEY = b"bytes_stored"
_MAX_ATTEMPTS = 24  # map growths (each at least doubles) or adoptions per operation
_HINTS = {lmdb.ReadersFullError: "raise max_readers", lmdb.DiskError: "free disk space",
          lmdb.ReadonlyError: "check the directory's permissions"}


def _storage_key(key: str, max_key: int) -> bytes:
    """The LMDB key of ``key``: its UTF-8, or head + NUL + digest when that is too long."""
    raw = key.encode("utf-8")
    if len(raw) <= max_key:
        return raw
    return raw[:max_key - _DIGEST_BYTES - 1] + b"\0" + hashlib.blake2b(raw, digest_size=_DIGEST_BYTES).digest()


def _add_bytes(txn, shared: SharedEnv, delta: int) -> None:
    """Add ``delta`` to the ``bytes_stored`` total, inside the write transaction."""
    total = int.from_bytes(txn.get(_BYTES_KEY, b"", db=shared.dbs[2]), "little") + delta
    txn.put(_BYTES_KEY, max(total, 0).to_bytes(8, "little"), db=shared.dbs[2])


class LmdbTier(BaseTier):
    """Values in one LMDB environment (a directory at ``path``, created if missing).

    Durable and shared: other processes may open the same path (``readonly=True`` or
    not) and see every committed value. The map starts at ``map_size`` bytes and grows
    on demand, so values larger than the initial map are fine. ``put_many`` is one
    transaction: in ``mode="create"`` the keys that already exist are skipped, the rest
    commit together, then one :class:`AlreadyExists` names the skipped keys.

    Fork- and pickle-safe: a forked child reopens the environment on first use; a
    pickled tier reopens ``path`` with the same settings. Tiers on one path in one
    process share a handle, whose settings (map size, ``sync``, ``max_readers``) are
    those of the first tier opened.
    """

    kind = "lmdb"
    durable = True

    def __init__(self, path: str | os.PathLike, map_size: int = 1024 * _MiB, *, name: str | None = None,
                 max_workers: int = 8, readonly: bool = False, sync: bool = True, max_readers: int = 512) -> None:
        super().__init__(name=name, max_workers=max_workers)
        for label, number in (("map_size", map_size), ("max_readers", max_readers)):
            if isinstance(number, bool) or not isinstance(number, int) or number <= 0:
                raise InvalidArgument(f"{label} must be a positive int, got {number!r}")
        self.path = os.fspath(path)
        self.map_size, self.readonly, self.sync, self.max_readers = map_size, bool(readonly), bool(sync), max_readers
        settings = {"map_size": map_size, "readonly": self.readonly, "sync": self.sync, "max_readers": max_readers}
        self._shared = OPEN_ENVIRONMENTS.attach(os.path.realpath(self.path), settings)

    def __reduce__(self):
        return (functools.partial(type(self), name=self.name, max_workers=self._max_workers, readonly=self.readonly,
                                  sync=self.sync, max_readers=self.max_readers), (self.path, self.map_size))

    # --------------------------------------------------------------- transactions
    def _unavailable(self, action: str, exc: lmdb.Error) -> TierUnavailable:
        hint = next((h for cls, h in _HINTS.items() if isinstance(exc, cls)), "see the chained lmdb error")
        return TierUnavailable(f"LMDB tier {self.name!r} at {self.path!r}: {action} failed: {exc}; {hint}")

    def _read(self, body, *, buffers: bool = False):
        """Run ``body(txn, shared)`` in a read transaction; adopt a map grown elsewhere."""
        shared = self._shared.current()
        for _ in range(_MAX_ATTEMPTS):
            try:
                with shared.guard, shared.env.begin(buffers=buffers) as txn:
                    return body(txn, shared)
            except lmdb.MapResizedError:
                with shared.write_lock:
                    self._grow(shared, 0)
            except lmdb.Error as exc:
                raise self._unavailable("read", exc) from exc
        raise TierUnavailable(f"LMDB tier {self.name!r}: the map kept being resized by other processes")

    def _write(self, body, nbytes: int):
        """Run ``body(txn, shared)`` in a write transaction, growing the map when full."""
        if self.readonly:
            raise ConfigError(f"LMDB tier {self.name!r} was opened with readonly=True; "
                              "open it with readonly=False to write")
        shared = self._shared.current()
        with shared.write_lock:
            for _ in range(_MAX_ATTEMPTS):
                try:
                    return self._write_once(shared, body)
                except lmdb.MapFullError:
                    self._grow(shared, max(nbytes, 1))
                except lmdb.MapResizedError:
                    self._grow(shared, 0)
                except lmdb.Error as exc:
                    raise self._unavailable("write", exc) from exc
        raise TierUnavailable(f"LMDB tier {self.name!r}: a write of {nbytes} bytes still did not fit after "
                              f"{_MAX_ATTEMPTS} map growths; check free disk space")

    @staticmethod
    def _write_once(shared: SharedEnv, body):
        txn = shared.env.begin(write=True, buffers=True)
        try:
            result = body(txn, shared)
            txn.commit()
            return result
        except BaseException:
            with shared.guard.exclusive():  # see "Concurrency" in the module docstring
                txn.abort()  # a no-op when a failed commit already ended it
            raise

    def _grow(self, shared: SharedEnv, nbytes: int) -> None:
        try:
            shared.grow(nbytes)
        except lmdb.Error as exc:
            raise self._unavailable(f"growing the map for {nbytes} bytes", exc) from exc

    def _missing(self, key: str) -> NotFound:
        return NotFound(f"key {key!r} not found in LMDB tier {self.name!r}")

    # ----------------------------------------------------------------- primitives
    def _lookup(self, key: str, view=None, *, missing_ok: bool = False):
        """Return the value of ``key``, or ``view(value)`` computed on a zero-copy buffer."""
        def body(txn, shared):
            value = txn.get(_storage_key(key, shared.max_key), db=shared.dbs[0])
            if value is None:
                if missing_ok:
                    return None
                raise self._missing(key)
            return value if view is None else view(value)
        return self._read(body, buffers=view is not None)

    def _get(self, key: str) -> bytes:
        return self._lookup(key)

    def _get_range(self, key: str, start: int, end: int | None) -> bytes:
        return self._lookup(key, lambda value: bytes(value[start:end]))

    def _size(self, key: str) -> int:
        return self._lookup(key, len)

    def _contains(self, key: str) -> bool:
        return self._lookup(key, len, missing_ok=True) is not None

    def _get_many(self, keys: list[str]) -> list[bytes | None]:
        def body(txn, shared):
            storage_keys = [_storage_key(key, shared.max_key) for key in keys]
            found = dict(txn.cursor(db=shared.dbs[0]).getmulti(storage_keys))
            return [found.get(skey) for skey in storage_keys]
        return self._read(body)

    def _get_ranges(self, requests: list[tuple[str, int, int | None]]) -> list[bytes | None]:
        def body(txn, shared):  # one read transaction; each slice copied out of the map
            data, max_key, get = shared.dbs[0], shared.max_key, txn.get
            out: list[bytes | None] = []
            for key, start, end in requests:
                value = get(_storage_key(key, max_key), db=data)
                out.append(None if value is None else bytes(value[start:end]))
            return out
        return self._read(body, buffers=True)

    def _put(self, key: str, value: memoryview, create: bool) -> None:
        if self._write(self._puts_body([(key, value)], create), value.nbytes):
            raise AlreadyExists(f"key {key!r} already exists in LMDB tier {self.name!r} (mode='create')")

    def _put_many(self, items: list[tuple[str, memoryview]], create: bool) -> None:
        conflicts = self._write(self._puts_body(items, create), sum(value.nbytes for _, value in items))
        if conflicts:
            raise AlreadyExists(f"{len(conflicts)} key(s) already exist in LMDB tier {self.name!r} and were left "
                                f"unchanged (mode='create'; the other keys were written): {conflicts[:5]}")

    @staticmethod
    def _puts_body(items: list[tuple[str, memoryview]], create: bool):
        """A write-transaction body storing ``items``; it returns the keys skipped by create mode."""
        def body(txn, shared):
            data, long_keys = shared.dbs[:2]
            skeys = [_storage_key(key, shared.max_key) for key, _ in items]
            cursor = txn.cursor(db=data)
            old_sizes = {bytes(skey): len(value) for skey, value in cursor.getmulti(skeys)}
            conflicts: list[str] = []
            if create:
                todo: dict[bytes, memoryview] = {}
                for (key, value), skey in zip(items, skeys):
                    if skey in old_sizes or skey in todo:
                        conflicts.append(key)
                    else:
                        todo[skey] = value
            else:
                todo = dict(zip(skeys, (value for _, value in items)))  # the last value of a repeated key wins
            cursor.putmulti(todo.items(), overwrite=not create)
            long_pairs = [(skey, key.encode("utf-8")) for (key, _), skey in zip(items, skeys)
                          if b"\0" in skey and skey in todo]
            if long_pairs:
                txn.cursor(db=long_keys).putmulti(long_pairs)
            delta = sum(v.nbytes for v in todo.values()) - sum(old_sizes.get(skey, 0) for skey in todo)
            _add_bytes(txn, shared, delta)
            return conflicts
        return body

    def _delete(self, key: str) -> bool:
        def body(txn, shared):
            data, long_keys = shared.dbs[:2]
            skey = _storage_key(key, shared.max_key)
            previous = txn.get(skey, db=data)
            if previous is None:
                return False
            size = len(previous)
            txn.delete(skey, db=data)
            if b"\0" in skey:
                txn.delete(skey, db=long_keys)
            _add_bytes(txn, shared, -size)
            return True
        return self._write(body, 0)

    def _list(self, prefix: str) -> list[str]:
        def body(txn, shared):
            data, long_keys = shared.dbs[:2]
            wanted = prefix.encode("utf-8")
            # A long key's storage form keeps only its first (max_key - 33) bytes.
            seek = wanted[:shared.max_key - _DIGEST_BYTES - 1]
            cursor = txn.cursor(db=data)
            found = []
            if not cursor.set_range(seek):
                return found
            for skey in cursor.iternext(values=False):
                if not skey.startswith(seek):
                    break
                full = txn.get(skey, db=long_keys) if b"\0" in skey else skey
                if full.startswith(wanted):
                    found.append(full.decode("utf-8"))
            return found
        return self._read(body)

    def _close(self) -> None:
        OPEN_ENVIRONMENTS.detach(self._shared)

    def _extra_stats(self) -> dict[str, Any]:
        if self._closed:
            return {"extra": {"path": self.path}}

        def body(txn, shared):
            info, psize = shared.env.info(), txn.stat(shared.dbs[0])["psize"]
            return {"items": txn.stat(shared.dbs[0])["entries"],
                    "bytes_stored": int.from_bytes(txn.get(_BYTES_KEY, b"", db=shared.dbs[2]), "little"),
                    "extra": {"path": self.path, "map_size": info["map_size"],
                              "used_bytes": (info["last_pgno"] + 1) * psize, "readers": info["num_readers"]}}
        return self._read(body)
