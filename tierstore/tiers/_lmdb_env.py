"""The process's handles on LMDB environments, shared by every LmdbTier on one path.

LMDB allows one handle per environment per process (py-lmdb refuses a second open), so
tiers on one path in one process (an unpickled copy, say) share a :class:`SharedEnv`
through a process-wide table, :data:`OPEN_ENVIRONMENTS`, the one piece of module state
here; the handle closes with its last tier. A forked child never uses the parent's
handle: it reopens the path on first use. A fork hook holds the write lock and the guard
while the process forks, so the copied handle has no open transaction and closing it in
the child leaves the parent's reader slots alone.

Each handle carries the locks its tiers share: the write lock (one write transaction at
a time) and a :class:`TxnGuard`, whose exclusive side (map resize, fork, close) waits for
every live transaction of the process to end.
"""

from __future__ import annotations

import os
import threading
import weakref
from contextlib import contextmanager
from typing import Any

import lmdb

from ..errors import ConfigError, TierUnavailable

__all__ = ["TxnGuard", "SharedEnv", "OpenEnvironments", "OPEN_ENVIRONMENTS"]

_MiB = 1024 * 1024


class TxnGuard:
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


class SharedEnv:
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
        self.guard = TxnGuard()
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

    def current(self) -> SharedEnv:
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



class OpenEnvironments:
    """The environments this process has open, by real path; see the module docstring."""

    def __init__(self) -> None:
        self._envs: weakref.WeakValueDictionary[str, SharedEnv] = weakref.WeakValueDictionary()
        self._lock, self._pid = threading.Lock(), os.getpid()

    def _process_lock(self) -> threading.Lock:
        if self._pid != os.getpid():  # a lock copied by fork may be held by a thread that is gone
            self._lock, self._pid = threading.Lock(), os.getpid()
        return self._lock

    def attach(self, path: str, settings: dict[str, Any]) -> SharedEnv:
        with self._process_lock():
            shared = self._envs.get(path)
            if shared is None or shared.env is None:
                shared = self._envs[path] = SharedEnv(path, settings)
            elif shared.settings["readonly"] and not settings["readonly"]:
                raise ConfigError(f"LMDB environment {path!r} is already open read-only in this process; "
                                  "close that tier first or open this one with readonly=True")
            shared.users += 1
            return shared

    def detach(self, shared: SharedEnv) -> None:
        with self._process_lock():
            shared.users -= 1
            if shared.users <= 0:
                if self._envs.get(shared.path) is shared:
                    del self._envs[shared.path]
                shared.close()


OPEN_ENVIRONMENTS = OpenEnvironments()
