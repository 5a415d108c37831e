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

Processes: LMDB allows one handle per environment per process (py-lmdb refuses a second
open), so tiers on one path in one process (an unpickled copy, say) share a
:class:`_SharedEnv` through a process-wide table, the one piece of module state here; the
handle closes with its last tier. A forked child never uses the parent's handle: it
reopens the path on first use. A fork hook holds the write lock and the guard while
the process forks, so the copied handle has no open transaction and closing it in the
child leaves the parent's reader slots alone.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import weakref
from contextlib import contextmanager
from typing import Any

import lmdb

from ..errors import AlreadyExists, ConfigError, InvalidArgument, NotFound, TierUnavailable
from .base import BaseTier

__all__ = ["LmdbTier"]

_MiB = 1024 * 1024
_DIGEST_BYTES = 32
_BYTES_KEY = b"bytes_stored"
_MAX_ATTEMPTS = 24  # map growths (each at least doubles) or adoptions per operation
_HINTS = {lmdb.ReadersFullError: "raise max_readers", lmdb.DiskError: "free disk space",
          lmdb.ReadonlyError: "check the directory's permissions"}


class _TxnGuard:
    """Any number of transactions (shared side), or one exclusive holder (remap, fork, close).

    A waiting exclusive holder blocks new shared holders, so it cannot starve. Not
    reentrant: code holding either side must not ask for the other. Exclusive holders
    take the write lock first, so they also exclude the write transaction.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._active = 0
        self._waiting = 0
        self._exclusive = False

    def __enter__(self) -> None:
        with self._lock:  # not ``with self._cond``: Condition's wrappers cost a microsecond a read
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._active += 1

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._active -= 1
            if not self._active and self._waiting:
                self._cond.notify_all()

    def acquire_exclusive(self) -> None:
        with self._cond:
            self._waiting += 1
            try:
                while self._exclusive or self._active:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True

    def release_exclusive(self) -> None:
        with self._cond:
            self._exclusive = False
            self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        self.acquire_exclusive()
        try:
            yield
        finally:
            self.release_exclusive()


class _SharedEnv:
    """One process's handle on one environment, with the locks every tier on it shares."""

    def __init__(self, path: str, settings: dict[str, Any]) -> None:
        self.path, self.settings, self.users = path, settings, 0
        self.env: lmdb.Environment | None = None
        self._reset_locks()
        self._open()
        # One set of hooks per handle, holding it weakly: once it is gone they do nothing.
        ref = weakref.ref(self)
        os.register_at_fork(before=lambda: getattr(ref(), "_before_fork", _noop)(),
                            after_in_parent=lambda: getattr(ref(), "_after_fork_in_parent", _noop)(),
                            after_in_child=lambda: getattr(ref(), "_reset_locks", _noop)())

    def _reset_locks(self) -> None:
        self.guard = _TxnGuard()
        self.write_lock = threading.Lock()
        self._reopen_lock = threading.Lock()
        self._held_for_fork = False

    def _open(self) -> None:
        path, settings = self.path, self.settings
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"LMDB path {path!r} is a file; LmdbTier needs a directory (it creates "
                              "data.mdb and lock.mdb inside): give a directory path")
        readonly = settings["readonly"]
        if readonly and not os.path.exists(os.path.join(path, "data.mdb")):
            raise ConfigError(f"no LMDB environment at {path!r} to open read-only; "
                              "create it first with readonly=False")
        try:
            env = lmdb.open(path, map_size=settings["map_size"], subdir=True, readonly=readonly,
                            sync=settings["sync"], max_readers=settings["max_readers"], max_dbs=3)
        except (lmdb.Error, OSError) as exc:
            raise TierUnavailable(f"cannot open LMDB environment at {path!r}: {exc}; check that the directory "
                                  "is writable and not open elsewhere in this process under another path") from exc
        try:
            self.dbs = [env.open_db(name, create=not readonly) for name in (b"data", b"long_keys", b"meta")]
        except lmdb.Error as exc:
            env.close()
            raise ConfigError(f"{path!r} is not a tierstore LMDB environment (missing databases: {exc}); "
                              "open a fresh directory or one written by LmdbTier") from exc
        self.env, self.pid = env, os.getpid()
        self.max_key = env.max_key_size()

    def current(self) -> _SharedEnv:
        """Return self, first reopening the environment if this is a forked child."""
        if self.pid != os.getpid():
            with self._reopen_lock:
                if self.pid != os.getpid():
                    # No transaction was open when the process forked (_before_fork), so
                    # closing the inherited copy only drops this process's mappings.
                    self.env.close()
                    self._open()
        return self

    def grow(self, nbytes: int) -> None:
        """Grow the map to fit ``nbytes`` more (0: adopt the size another process set).

        The caller holds the write lock.
        """
        with self.guard.exclusive():
            env = self.env
            if nbytes == 0:
                env.set_mapsize(0)
                return
            info = env.info()
            used = (info["last_pgno"] + 1) * env.stat()["psize"]
            target = max(2 * info["map_size"], used + 2 * nbytes + 8 * _MiB)
            env.set_mapsize(-(-target // _MiB) * _MiB)

    def close(self) -> None:
        with self.write_lock, self.guard.exclusive():
            env, self.env = self.env, None
            if env is not None:
                env.close()

    def _before_fork(self) -> None:
        if self.env is not None:
            self.write_lock.acquire()
            self.guard.acquire_exclusive()
            self._held_for_fork = True

    def _after_fork_in_parent(self) -> None:
        if self._held_for_fork:
            self._held_for_fork = False
            self.guard.release_exclusive()
            self.write_lock.release()


def _noop() -> None:
    pass


def _storage_key(key: str, max_key: int) -> bytes:
    """The LMDB key of ``key``: its UTF-8, or head + NUL + digest when that is too long."""
    raw = key.encode("utf-8")
    if len(raw) <= max_key:
        return raw
    return raw[:max_key - _DIGEST_BYTES - 1] + b"\0" + hashlib.blake2b(raw, digest_size=_DIGEST_BYTES).digest()


def _add_bytes(txn, shared: _SharedEnv, delta: int) -> None:
    """Add ``delta`` to the ``bytes_stored`` total, inside the write transaction."""
    total = int.from_bytes(txn.get(_BYTES_KEY, b"", db=shared.dbs[2]), "little") + delta
    txn.put(_BYTES_KEY, max(total, 0).to_bytes(8, "little"), db=shared.dbs[2])


class _OpenEnvironments:
    """The environments this process has open, by real path; see the module docstring."""

    def __init__(self) -> None:
        self._envs: weakref.WeakValueDictionary[str, _SharedEnv] = weakref.WeakValueDictionary()
        self._lock, self._pid = threading.Lock(), os.getpid()

    def _process_lock(self) -> threading.Lock:
        if self._pid != os.getpid():  # a lock copied by fork may be held by a thread that is gone
            self._lock, self._pid = threading.Lock(), os.getpid()
        return self._lock

    def attach(self, path: str, settings: dict[str, Any]) -> _SharedEnv:
        with self._process_lock():
            shared = self._envs.get(path)
            if shared is None or shared.env is None:
                shared = self._envs[path] = _SharedEnv(path, settings)
            elif shared.settings["readonly"] and not settings["readonly"]:
                raise ConfigError(f"LMDB environment {path!r} is already open read-only in this process; "
                                  "close that tier first or open this one with readonly=True")
            shared.users += 1
            return shared

    def detach(self, shared: _SharedEnv) -> None:
        with self._process_lock():
            shared.users -= 1
            if shared.users <= 0:
                if self._envs.get(shared.path) is shared:
                    del self._envs[shared.path]
                shared.close()


_OPEN_ENVIRONMENTS = _OpenEnvironments()


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
        self._shared = _OPEN_ENVIRONMENTS.attach(os.path.realpath(self.path), settings)

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
    def _write_once(shared: _SharedEnv, body):
        txn = shared.env.begin(write=True, buffers=True)
        try:
            result = body(txn, shared)
            txn.commit()
            return result
        except BaseException:
            with shared.guard.exclusive():  # see "Concurrency" in the module docstring
                txn.abort()  # a no-op when a failed commit already ended it
            raise

    def _grow(self, shared: _SharedEnv, nbytes: int) -> None:
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
        _OPEN_ENVIRONMENTS.detach(self._shared)

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
