"""Key layout shared by the manifest log and the write-ahead log.

Both keep numbered objects under a collection's prefix::

    "{prefix}/manifest/{version:020d}"
    "{prefix}/wal/{lsn:020d}"

Twenty-digit zero padding makes a tier's sorted ``list()`` order the numeric order, and
a key whose last segment is not exactly 20 ASCII digits (``{prefix}/wal/floor``, a
nested prefix) is never taken for a numbered one. Each writer names itself in what it
writes with :func:`default_writer_id` (for people reading the data, not for locking).
"""

from __future__ import annotations

import os
import socket
import uuid

from ..errors import CorruptData, InvalidType
from ..tiers.keys import validate_key
from .blob import decode_blob

__all__ = ["decode_numbered_blob", "NUMBER_DIGITS", "check_prefix", "parse_numbered", "default_writer_id"]

#: Digits of the zero-padded number that ends a manifest or WAL record key.
NUMBER_DIGITS = 20


def check_prefix(prefix: object) -> str:
    """Validate the prefix of a manifest log or WAL ('' = the root of the tier)."""
    if not isinstance(prefix, str):
        raise InvalidType(f"prefix must be a str, got {type(prefix).__name__}")
    prefix = prefix.rstrip("/")
    if prefix:
        validate_key(prefix)
    return prefix


def parse_numbered(keys: list[str], directory: str) -> list[int]:
    """The numbers of the keys ``directory + 20 digits`` among ``keys``, ascending."""
    cut = len(directory)
    found = []
    for key in keys:
        name = key[cut:]
        if len(name) == NUMBER_DIGITS and name.isascii() and name.isdigit() and key.startswith(directory):
            found.append(int(name))
    found.sort()
    return found


def default_writer_id() -> str:
    """``host:pid:random``: names the writer in what it commits (for people, not for locking)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def decode_numbered_blob(data: object, key: str, *, kind: str, fmt: int, number_field: str, number: int, what: str):
    """Decode the framed blob at ``key`` and check that it is a ``kind`` of format ``fmt``
    stored under its own number (``header[number_field] == number``); return the blob.

    A mismatch is :class:`CorruptData` naming the key: something else was written under
    the prefix, or the object was copied or renamed.
    """
    blob = decode_blob(data, source=key)
    head = blob.header
    if head.get("kind") != kind or head.get("format") != fmt:
        raise CorruptData(f"{key!r} is not a {what} of format {fmt} (kind={head.get('kind')!r}, "
                          f"format={head.get('format')!r}); was something else written under this prefix?")
    if head.get(number_field) != number:
        raise CorruptData(f"{what} {key!r} says it is {number_field} {head.get(number_field)!r}; the key says "
                          f"{number}: it was copied or renamed; restore the original object")
    return blob

