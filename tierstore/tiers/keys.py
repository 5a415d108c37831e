"""Key rules shared by every tier.

A key is a ``str`` of ``/``-separated segments, like an object-store key. The same rules
hold in every tier so that a value can move between tiers without being renamed:

* 1 to :data:`MAX_KEY_BYTES` bytes of UTF-8;
* no leading or trailing ``/`` and no empty segment (``a//b``);
* no ``.`` or ``..`` segment, no backslash, no NUL or other control character;
* each segment at most :data:`MAX_SEGMENT_BYTES` bytes (a file-name limit).

Prefixes given to ``list(prefix)`` follow the same rules, except that they may be empty
and may end with ``/``.
"""

from __future__ import annotations

import functools
import re

from ..errors import InvalidKey, InvalidType

__all__ = ["MAX_KEY_BYTES", "MAX_SEGMENT_BYTES", "validate_key", "validate_prefix"]

MAX_KEY_BYTES = 1024
MAX_SEGMENT_BYTES = 255

_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\\]")


def _check_segments(text: str, what: str, original: str) -> None:
    for segment in text.split("/"):
        if segment == "":
            raise InvalidKey(f"{what} {original!r} has an empty segment ('//', or a leading/trailing '/'); "
                             "use single '/' between non-empty names")
        if segment in (".", ".."):
            raise InvalidKey(f"{what} {original!r} contains a {segment!r} segment; "
                             "relative path segments are not allowed in keys")
        if len(segment.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES:
            raise InvalidKey(f"{what} {original!r} has a segment longer than {MAX_SEGMENT_BYTES} bytes; "
                             "split it with '/' or hash it")


def _check_text(key: object, what: str) -> str:
    if not isinstance(key, str):
        raise InvalidType(f"{what} must be a str, got {type(key).__name__}")
    if _FORBIDDEN.search(key):
        raise InvalidKey(f"{what} {key!r} contains a NUL, control character or backslash; "
                         "use printable characters and '/' as the separator")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidKey(f"{what} {key!r} is not valid Unicode text (lone surrogate)") from exc
    if size > MAX_KEY_BYTES:
        raise InvalidKey(f"{what} is {size} bytes of UTF-8; the limit is {MAX_KEY_BYTES}")
    return key


def validate_key(key: object) -> str:
    """Return ``key`` if every tier can store it, else raise :class:`InvalidKey`/:class:`InvalidType`."""
    if type(key) is str:
        return _validated_key(key)  # memoised: hot keys are checked once
    if isinstance(key, str):  # a str subclass: check it uncached, return a plain str
        return _validated_key.__wrapped__(str(key))
    raise InvalidType(f"key must be a str, got {type(key).__name__}")


@functools.lru_cache(maxsize=4096)  # hot keys; WAL and KV keys are mostly seen once
def _validated_key(key: str) -> str:
    # A pure function of its argument, so memoising it is safe; only valid keys are
    # cached (an exception is never cached).
    text = _check_text(key, "key")
    if text == "":
        raise InvalidKey("key is empty; give a non-empty name such as 'docs/list/0001'")
    _check_segments(text, "key", text)
    return text


def validate_prefix(prefix: object) -> str:
    """Return ``prefix`` if it is a valid ``list()`` prefix (may be empty or end with '/')."""
    text = _check_text(prefix, "prefix")
    body = text[:-1] if text.endswith("/") else text
    if body:
        # The last segment of a prefix may be partial ("lists/00"), so only whole
        # segments are checked for emptiness and relative names.
        _check_segments(body, "prefix", text)
    elif text == "/":
        raise InvalidKey("prefix '/' is not allowed; use '' to list every key")
    return text
