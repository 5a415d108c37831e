"""One writer per collection in a local directory: an OS file lock, taken on first write.

``connect("./data")`` lets any number of processes open a directory and read. The first
:class:`~tierstore.client.collection.Collection` handle that writes a collection (add,
delete, a checkpoint, a build) takes an exclusive, non-blocking ``flock`` on
``./data/locks/<collection>.lock`` and holds it until the handle closes; any other handle
(another process, or a second ``connect`` of the same directory in this process) gets
:class:`~tierstore.errors.WriterConflict` before it writes anything. The kernel drops the
lock when the holder exits, SIGKILL included, so a crash never leaves a stale lock.

A forked child does not inherit the right to write: the lock is tied to the pid that took
it, and the child's own attempt conflicts with its parent.
"""

from __future__ import annotations

import fcntl
import os

from ..errors import TierUnavailable, WriterConflict

__all__ = ["WriterLock"]


class WriterLock:
    """An exclusive ``flock`` on ``path``, taken by :meth:`acquire` and dropped by :meth:`release`."""

    def __init__(self, path: str, what: str) -> None:
        self.path, self.what = path, what
        self._fd: int | None = None
        self._pid = 0

    def acquire(self) -> None:
        """Take the lock (a no-op when this process holds it); :class:`WriterConflict` when another does."""
        if self._fd is not None and self._pid == os.getpid():
            return
        self._fd = None  # a forked child: the inherited descriptor is its parent's lock
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise TierUnavailable(f"cannot open the writer lock {self.path!r}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WriterConflict(
                f"{self.what} is being written by another handle (another process, or another connect() of this "
                f"directory; it holds {self.path!r}). One handle writes a collection at a time: write through that "
                "one, or close it and open the collection again here. Reading from this handle is fine; it shows "
                "the state as of its open.") from None
        except OSError as exc:
            os.close(fd)
            raise TierUnavailable(f"cannot lock {self.path!r}: {exc}") from exc
        self._fd, self._pid = fd, os.getpid()

    @property
    def held(self) -> bool:
        """Whether this process holds the lock (taken by a write of this handle)."""
        return self._fd is not None and self._pid == os.getpid()

    def release(self) -> None:
        """Drop the lock (idempotent; a forked child leaves its parent's lock alone)."""
        fd, self._fd = self._fd, None
        if fd is not None and self._pid == os.getpid():
            os.close(fd)  # closing the descriptor releases the flock
