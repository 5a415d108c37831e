"""JSON-like values as the store layer keeps them: validated, frozen, thawed, encoded.

Manifest states and WAL attributes are JSON objects held as deep read-only copies:
:func:`freeze_json` validates a value and freezes it (mappings become
``MappingProxyType``, lists become tuples, numpy scalars plain numbers),
:func:`thaw_json` gives back a mutable copy to edit, and :func:`dumps_json` encodes a
frozen value as the compact, sorted UTF-8 JSON that is written to storage. Only
:func:`json.loads` ever parses what comes back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from ..errors import InvalidArgument, InvalidType

__all__ = ["freeze_json", "thaw_json", "dumps_json"]


class _BadValue(Exception):
    def __init__(self, error: type, problem: str) -> None:
        self.error, self.problem, self.path = error, problem, []


def _freeze(value: Any) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _BadValue(InvalidArgument, f"{value!r} is not a finite number (JSON has no NaN or infinity)")
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _BadValue(InvalidType, f"has a {type(key).__name__} key {key!r}; JSON object keys are str")
            try:
                out[key] = _freeze(item)
            except _BadValue as bad:
                bad.path.append(f"[{key!r}]")
                raise
        return MappingProxyType(out)
    if isinstance(value, (list, tuple)):
        items = []
        for index, item in enumerate(value):
            try:
                items.append(_freeze(item))
            except _BadValue as bad:
                bad.path.append(f"[{index}]")
                raise
        return tuple(items)
    if isinstance(value, (np.bool_, np.integer, np.floating)):
        return _freeze(value.item())
    raise _BadValue(InvalidType, f"is a {type(value).__name__}; use dict (str keys), list, str, int, float, "
                                 "bool or None")


def freeze_json(value: Any, what: str = "value") -> Any:
    """Validate a JSON-like value and return a deep read-only copy of it.

    dicts (any ``Mapping`` with ``str`` keys) become :class:`types.MappingProxyType`,
    lists and tuples become tuples, numpy scalars become Python numbers. NaN and
    infinity raise :class:`InvalidArgument`; other types :class:`InvalidType`; the
    message names the offending path (``state['lists'][3]``).
    """
    try:
        return _freeze(value)
    except _BadValue as bad:
        raise bad.error(f"{what}{''.join(reversed(bad.path))} {bad.problem}") from None
    except RecursionError:
        raise InvalidArgument(f"{what} is nested too deeply (or refers to itself)") from None


def thaw_json(value: Any) -> Any:
    """Return a plain, mutable deep copy (dicts and lists) of a value from :func:`freeze_json`."""
    if isinstance(value, Mapping):
        return {key: thaw_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw_json(item) for item in value]
    return value


def _plain_mapping(value: object) -> dict:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def dumps_json(frozen: Any) -> bytes:
    """Encode a value from :func:`freeze_json` as compact UTF-8 JSON with sorted keys."""
    text = json.dumps(frozen, default=_plain_mapping, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"the value contains text that is not valid UTF-8 (a lone surrogate?): {exc}") from exc
