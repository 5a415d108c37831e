"""Collection names: what a user may call a collection (they become key segments)."""

from __future__ import annotations

import re

from ..errors import InvalidArgument, InvalidType

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")


def check_name(name: object, what: str = "collection name") -> str:
    if not isinstance(name, str):
        raise InvalidType(f"{what} must be a str, got {type(name).__name__}")
    if not _NAME.fullmatch(name):
        raise InvalidArgument(f"{what} {name!r} is not allowed: use 1-128 letters, digits, '_', '-' or '.', "
                              "starting with a letter, digit or '_'")
    return name
