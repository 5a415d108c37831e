"""FileTier: one file per key under a root directory, written atomically.

Layout. Key ``d1/d2/.../last`` lives at ``root/<enc(d1)>/<enc(d2)>/.../@<xx>/<enc(last)>``
where ``xx`` is the first two hex digits of ``blake2b(key)``: each directory level
spreads its files over up to 256 shard directories, so a flat namespace of a million
keys never makes one huge directory. ``enc`` percent-encodes every ``%`` and a leading
``@``, so no key segment can be mistaken for a ``@xx`` shard or a ``@tmp.*`` file; the
rest of a segment is kept as is (the key rules already forbid NUL, control characters,
backslash and ``.``/``..`` segments). Keys that differ only in case collide on a
case-insensitive file system.

Writes go to ``@tmp.<random>`` in the shard directory, are fsynced, then renamed over
the final name (``os.replace``) or, in create mode, hard-linked to it (``os.link``
fails atomically when the name exists). Readers see the old or the new value, never
part of one; a failed write leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import secrets
from typing import Any
from urllib.parse import unquote

import aiofiles

from ..errors import AlreadyExists, ConfigError, InvalidKey, NotFound, TierUnavailable
from .base import BaseTier, check_range
from .keys import MAX_SEGMENT_BYTES, validate_key

__all__ = ["FileTier"]

_TMP_PREFIX = "@tmp."
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)


def encode_segment(segment: str) -> str:
    """Return the file name of one key segment (``%`` -> ``%25``, leading ``@`` -> ``%40``)."""
    if "%" not in segment and not segment.startswith("@"):
        return segment
    encoded = segment.replace("%", "%25")
    if encoded.startswith("@"):
        encoded = "%40" + encoded[1:]
    if len(encoded.encode("utf-8")) > MAX_SEGMENT_BYTES:
        raise InvalidKey(f"key segment {segment[:40]!r}... is {len(encoded.encode('utf-8'))} bytes once '%' and a "
                         f"leading '@' are escaped for the file tier; the limit is {MAX_SEGMENT_BYTES}: "
                         "shorten the segment or use fewer '%' characters")
    return encoded


def decode_segment(name: str) -> str:
    """Invert :func:`encode_segment`."""
    return unquote(name) if "%" in name else name


def _read_at(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    chunks, got = [data], len(data)  # short reads: values over 2 GiB, or a truncated file
    while got < length:
        chunk = os.pread(fd, length - got, offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, value: memoryview) -> None:
    written = 0
    while written < value.nbytes:
        written += os.write(fd, value[written:])


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(directory: str) -> list[str]:
    """Create ``directory`` and its missing parents; return those created, outermost first."""
    missing = []
    while not os.path.isdir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # a concurrent writer made it first
            os.mkdir(path)
    return missing[::-1]


class FileTier(BaseTier):
    """Values as files under ``path`` (created if missing), one file per key.

    Durable: with ``fsync=True`` (the default) each write is fsynced together with the
    directories it changed before ``put`` returns. ``get`` costs one ``open``, ``fstat``
    and ``read``; ``get_range`` reads only the range. ``get_async`` and
    ``get_range_async`` read through aiofiles on the tier's thread pool. Pickle-safe:
    a pickled tier reopens ``path``.
    """

    kind = "file"
    durable = True

    def __init__(self, path: str | os.PathLike, *, name: str | None = None, max_workers: int = 8,
                 fsync: bool = True) -> None:
        super().__init__(name=name, max_workers=max_workers)
        self.path = os.path.normpath(os.fspath(path))
        self.fsync = bool(fsync)
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ConfigError(f"file tier path {self.path!r} is a regular file; give a directory path "
                              "(it is created if missing)")
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise TierUnavailable(f"cannot create file tier directory {self.path!r}: {exc}; "
                                  "check the parent directory's permissions") from exc

    def __reduce__(self):
        return functools.partial(type(self), name=self.name, max_workers=self._max_workers, fsync=self.fsync), \
            (self.path,)

    # -------------------------------------------------------------------- helpers
    def _locate(self, key: str) -> tuple[str, str]:
        """Return (shard directory, file path) of ``key``."""
        shard = f"@{hashlib.blake2b(key.encode('utf-8')).digest()[0]:02x}"
        if "%" in key or "@" in key:
            *dirs, last = map(encode_segment, key.split("/"))
            directory = os.path.join(self.path, *dirs, shard)
            return directory, os.path.join(directory, last)
        cut = key.rfind("/") + 1  # plain keys (the common case): no segment needs escaping
        directory = f"{self.path}/{key[:cut]}{shard}"
        return directory, f"{directory}/{key[cut:]}"

    def _missing(self, key: str) -> NotFound:
        return NotFound(f"key {key!r} not found in file tier {self.name!r}")

    def _unavailable(self, action: str, key: str, exc: OSError) -> TierUnavailable:
        return TierUnavailable(f"file tier {self.name!r} at {self.path!r}: {action} {key!r} failed: {exc}; "
                               "check the directory's permissions and free disk space")

    def _open_for_read(self, key: str) -> int:
        try:
            return os.open(self._locate(key)[1], _READ_FLAGS)
        except FileNotFoundError:
            raise self._missing(key) from None
        except OSError as exc:
            raise self._unavailable("opening", key, exc) from exc

    # ----------------------------------------------------------------- primitives
    def _get(self, key: str) -> bytes:
        fd = self._open_for_read(key)
        try:
            return _read_at(fd, os.fstat(fd).st_size, 0)
        except OSError as exc:
            raise self._unavailable("reading", key, exc) from exc
        finally:
            os.close(fd)

    def _get_range(self, key: str, start: int, end: int | None) -> bytes:
        fd = self._open_for_read(key)
        try:
            size = os.fstat(fd).st_size
            stop = size if end is None else min(end, size)
            return _read_at(fd, stop - start, start) if start < stop else b""
        except OSError as exc:
            raise self._unavailable("reading", key, exc) from exc
        finally:
            os.close(fd)

    def _size(self, key: str) -> int:
        try:
            return os.stat(self._locate(key)[1]).st_size
        except FileNotFoundError:
            raise self._missing(key) from None
        except OSError as exc:
            raise self._unavailable("stat of", key, exc) from exc

    def _contains(self, key: str) -> bool:
        try:
            os.stat(self._locate(key)[1])
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._unavailable("stat of", key, exc) from exc
        return True

    def _put(self, key: str, value: memoryview, create: bool) -> None:
        directory, final = self._locate(key)
        tmp: str | None = os.path.join(directory, f"{_TMP_PREFIX}{secrets.token_hex(8)}")
        created: list[str] = []
        try:
            try:
                fd = os.open(tmp, _WRITE_FLAGS, 0o644)
            except FileNotFoundError:  # first key in this shard directory
                created = _make_dirs(directory)
                fd = os.open(tmp, _WRITE_FLAGS, 0o644)
            try:
                _write_all(fd, value)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if create:
                try:
                    os.link(tmp, final)  # unlike a rename, fails when the name exists
                except FileExistsError:
                    raise AlreadyExists(f"key {key!r} already exists in file tier {self.name!r} "
                                        "(mode='create')") from None
                os.unlink(tmp)
            else:
                os.replace(tmp, final)
            tmp = None
            if self.fsync:
                for path in {directory, *map(os.path.dirname, created)}:
                    _fsync_dir(path)
        except OSError as exc:
            raise self._unavailable("writing", key, exc) from exc
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def _delete(self, key: str) -> bool:
        directory, path = self._locate(key)
        try:
            os.unlink(path)
            if self.fsync:
                _fsync_dir(directory)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._unavailable("deleting", key, exc) from exc
        return True

    def _list(self, prefix: str) -> list[str]:
        *dirs, partial = prefix.split("/")
        try:
            start = os.path.join(self.path, *map(encode_segment, dirs))
        except InvalidKey:
            return []  # no stored key can have a segment that long
        found: list[str] = []
        # (directory, key text of that directory, required start of the next segment)
        stack = [(start, "".join(d + "/" for d in dirs), partial)]
        try:
            while stack:
                directory, key_base, wanted = stack.pop()
                try:
                    entries = self._scan(directory)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                for name, path, is_dir in entries:
                    if name.startswith("@"):  # a shard directory (temporary files start with '@' too)
                        if is_dir:
                            found.extend(key_base + segment for segment in self._shard_names(path)
                                         if segment.startswith(wanted))
                    elif is_dir:
                        segment = decode_segment(name)
                        if segment.startswith(wanted):
                            stack.append((path, key_base + segment + "/", ""))
        except OSError as exc:
            raise self._unavailable("listing", prefix, exc) from exc
        return found

    @staticmethod
    def _scan(directory: str) -> list[tuple[str, str, bool]]:
        with os.scandir(directory) as entries:
            return [(e.name, e.path, e.is_dir(follow_symlinks=False)) for e in entries]

    @staticmethod
    def _shard_names(shard: str) -> list[str]:
        with os.scandir(shard) as entries:
            return [decode_segment(e.name) for e in entries if not e.name.startswith(_TMP_PREFIX)]

    def _extra_stats(self) -> dict[str, Any]:
        return {"extra": {"path": self.path, "fsync": self.fsync}}

    # ---------------------------------------------------------------- async reads
    async def get_async(self, key: str) -> bytes:
        """Async :meth:`get` through aiofiles."""
        key = validate_key(key)
        self._check_open()
        return await self._read_async(key, 0, None)

    async def get_range_async(self, key: str, start: int, end: int | None = None) -> bytes:
        """Async :meth:`get_range` through aiofiles."""
        key = validate_key(key)
        start, end = check_range(start, end)
        self._check_open()
        return await self._read_async(key, start, end)

    async def _read_async(self, key: str, start: int, end: int | None) -> bytes:
        """Read ``[start, end)`` of the value with aiofiles and count the get like ``get`` does."""
        try:
            async with aiofiles.open(self._locate(key)[1], "rb", executor=self._pool()) as handle:
                if start:
                    await handle.seek(start)
                value = await handle.read(-1 if end is None else end - start)
        except FileNotFoundError:
            self._stats.record_get(False)
            raise self._missing(key) from None
        except OSError as exc:
            raise self._unavailable("reading", key, exc) from exc
        self._stats.record_get(True, len(value))
        return value
