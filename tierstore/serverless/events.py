"""The wire format between the coordinator and the workers: compact, JSON, schema-checked.

Arrays travel as base64 of their little-endian bytes (``float32`` scores, ``int64`` rows,
``int32`` query indices), never as JSON lists of numbers: 12 bytes of payload per
candidate instead of ~30. A search event (version 1)::

    {"v": 1, "op": "search",
     "bucket": str, "prefix": str,      # must equal the worker's configuration
     "index": str,                      # the index's resident-state key under the prefix
     "digest": str,                     # the posting directory's digest (plan agreement)
     "partitions": int,                 # P: the plan every node computes from the index
     "dim": int, "nq": int, "width": int,
     "queries": b64 f32[nq*dim], "lists": b64 i64[nq*width], "coarse": b64 f32[nq*width],
     "keep": int,                       # candidates returned per query (before ties)
     "selection": null | {"size": int, "rows": b64 zlib(i64)} | {"size": int, "bitmap": b64 zlib(u8)},
     "partial": bool, "retries": int, "level": int, "node": int,   # node: its place in the tree
     "scan": [{"partition": int, "queries": b64 i32}],        # this node's own work
     "children": [{"node": int, "take": b64 i32, "scan": [...], "children": [...]}]}   # its sub-trees

``take`` selects a child's queries among the parent's; a node builds each child's full
event from its own (:func:`child_event`). A response carries per query the best
``keep`` candidates as CSR (``counts``, ``distances``, ``rows``) and ``cut`` (see
:mod:`.candidates`), plus ``stats``; a handled failure carries ``error``.

Every field is checked by :func:`parse_event`; a bad one raises
:class:`~tierstore.errors.EventError` naming it. Nothing from an event is evaluated.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from typing import Any

import numpy as np

from ..errors import EventError, InvalidArgument, PayloadTooLarge
from ..tiers.keys import validate_key

__all__ = ["MAX_PAYLOAD", "encode_array", "decode_array", "dumps", "loads", "parse_event", "child_event",
           "encode_selection", "decode_selection", "SearchEvent"]

MAX_PAYLOAD = 6 * 1024 * 1024  # Lambda's synchronous request and response limit (bytes)
VERSION = 1
_MAX_QUERIES = 1 << 20
_MAX_DEPTH = 32


def encode_array(arr: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(arr, dtype=dtype).tobytes()).decode("ascii")


def decode_array(text: object, dtype: str, field: str, count: int | None = None) -> np.ndarray:
    """A base64 little-endian array; :class:`EventError` naming ``field`` when malformed."""
    if not isinstance(text, str):
        raise EventError(f"event field {field!r} must be a base64 string, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise EventError(f"event field {field!r} is not valid base64: {exc}") from exc
    size = np.dtype(dtype).itemsize
    if len(raw) % size:
        raise EventError(f"event field {field!r} has {len(raw)} bytes, not a whole number of {dtype} values")
    arr = np.frombuffer(raw, dtype=dtype)
    if count is not None and arr.size != count:
        raise EventError(f"event field {field!r} holds {arr.size} values where {count} are expected")
    return arr


def dumps(obj: dict, *, what: str = "payload") -> bytes:
    """Compact JSON bytes; :class:`PayloadTooLarge` above Lambda's 6 MB limit."""
    data = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_PAYLOAD:
        raise PayloadTooLarge(f"the {what} is {len(data):,} bytes, over Lambda's {MAX_PAYLOAD:,}-byte synchronous "
                              "limit; search fewer queries per call or use more partitions")
    return data


def loads(data: bytes | str, *, what: str = "payload") -> dict:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EventError(f"the {what} is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise EventError(f"the {what} must be a JSON object, got {type(obj).__name__}")
    return obj


def encode_selection(rows: np.ndarray, size: int) -> dict:
    """The rows a filtered scan may score: sorted row numbers or a bitmap, whichever is smaller, zlib'd."""
    rows = np.ascontiguousarray(rows, dtype="<i8")
    if rows.size * 64 < size:
        packed = rows.tobytes()
        return {"size": int(size), "rows": base64.b64encode(zlib.compress(packed, 1)).decode("ascii")}
    mask = np.zeros(size, dtype=bool)
    mask[rows] = True
    bitmap = np.packbits(mask, bitorder="little").tobytes()
    return {"size": int(size), "bitmap": base64.b64encode(zlib.compress(bitmap, 1)).decode("ascii")}


def decode_selection(spec: object, field: str = "selection"):
    """A :class:`~tierstore.index.selection.RowSelection` from :func:`encode_selection`'s dict (or None)."""
    from ..index.selection import RowSelection

    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise EventError(f"event field {field!r} must be null or an object")
    size = _int(spec, "size", f"{field}.size", 0, 1 << 40)
    kind = "rows" if "rows" in spec else "bitmap"
    if set(spec) != {"size", kind}:
        raise EventError(f"event field {field!r} must have exactly 'size' and one of 'rows'/'bitmap', "
                         f"got {sorted(spec)}")
    text = spec[kind]
    # Either form is at most a bitmap's bytes (encode_selection picks the smaller): stop
    # inflating past that, so a small event cannot expand into gigabytes (a zlib bomb).
    limit = (size + 7) // 8
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(base64.b64decode(str(text).encode("ascii"), validate=True), limit + 1)
    except (binascii.Error, zlib.error, ValueError, UnicodeEncodeError) as exc:
        raise EventError(f"event field '{field}.{kind}' is not zlib-compressed base64: {exc}") from exc
    if len(raw) > limit or inflater.unconsumed_tail:
        raise EventError(f"event field '{field}.{kind}' inflates past the {limit} bytes that {size} rows need")
    if kind == "rows":
        if len(raw) % 8:
            raise EventError(f"event field '{field}.rows' is not a whole number of int64 rows")
        rows = np.frombuffer(raw, dtype="<i8")
        if rows.size and (rows.min() < 0 or rows.max() >= size or (np.diff(rows) <= 0).any()):
            raise EventError(f"event field '{field}.rows' must be sorted distinct rows in [0, {size})")
        return RowSelection.from_rows(rows.astype(np.int64), size)
    if len(raw) != (size + 7) // 8:
        raise EventError(f"event field '{field}.bitmap' has {len(raw)} bytes for {size} rows")
    mask = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=size, bitorder="little").astype(bool)
    return RowSelection(mask)


# ----------------------------------------------------------------------------- schema
def _int(obj: dict, key: str, field: str, low: int, high: int) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise EventError(f"event field {field!r} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise EventError(f"event field {field!r} must be from {low} to {high}, got {value}")
    return value


def _str(obj: dict, key: str, field: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise EventError(f"event field {field!r} must be a string, got {type(value).__name__}")
    return value


def _scan(value: object, field: str, nq: int, partitions: int) -> list[tuple[int, np.ndarray]]:
    if not isinstance(value, list):
        raise EventError(f"event field {field!r} must be a list")
    out = []
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, dict) or set(item) != {"partition", "queries"}:
            raise EventError(f"event field {where!r} must be an object with 'partition' and 'queries'")
        part = _int(item, "partition", f"{where}.partition", 0, partitions - 1)
        queries = decode_array(item["queries"], "<i4", f"{where}.queries")
        if queries.size and (queries.min() < 0 or queries.max() >= nq):
            raise EventError(f"event field '{where}.queries' indexes queries outside [0, {nq})")
        out.append((part, queries))
    return out


def _children(value: object, field: str, nq: int, depth: int) -> list[dict]:
    if not isinstance(value, list):
        raise EventError(f"event field {field!r} must be a list")
    if depth > _MAX_DEPTH:
        raise EventError(f"event field {field!r} nests deeper than {_MAX_DEPTH} levels")
    for i, child in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(child, dict) or set(child) != {"node", "take", "scan", "children"}:
            raise EventError(f"event field {where!r} must be an object with 'node', 'take', 'scan' and 'children'")
        _int(child, "node", f"{where}.node", 0, 1 << 20)
        take = decode_array(child["take"], "<i4", f"{where}.take")
        if take.size and (take.min() < 0 or take.max() >= nq):
            raise EventError(f"event field '{where}.take' indexes queries outside [0, {nq})")
        if not isinstance(child["scan"], list):
            raise EventError(f"event field '{where}.scan' must be a list")
        _children(child["children"], f"{where}.children", take.size, depth + 1)
    return value


_FIELDS = {"v", "op", "bucket", "prefix", "index", "digest", "partitions", "dim", "nq", "width", "queries", "lists",
           "coarse", "keep", "selection", "partial", "retries", "level", "node", "scan", "children"}


class SearchEvent:
    """A validated search event: typed fields and decoded arrays (see the module docstring)."""

    def __init__(self, raw: dict, **fields: Any) -> None:
        self.raw = raw
        self.__dict__.update(fields)


def parse_event(event: object) -> SearchEvent:
    """Check every field of a search event; :class:`EventError` names the first bad one."""
    if not isinstance(event, dict):
        raise EventError(f"the event must be a JSON object, got {type(event).__name__}")
    missing = sorted(_FIELDS - set(event))
    extra = sorted(set(event) - _FIELDS)
    if missing:
        raise EventError(f"the event lacks field(s) {missing}")
    if extra:
        raise EventError(f"the event has unknown field(s) {extra}")
    if event["v"] != VERSION:
        raise EventError(f"event field 'v' must be {VERSION}, got {event['v']!r}")
    if event["op"] != "search":
        raise EventError(f"event field 'op' must be 'search', got {event['op']!r}")
    bucket, prefix = _str(event, "bucket", "bucket"), _str(event, "prefix", "prefix")
    index = _str(event, "index", "index")
    try:
        validate_key(index)
    except InvalidArgument as exc:  # InvalidKey: '..', leading '/', NUL, ...
        raise EventError(f"event field 'index' is not a valid key: {exc}") from exc
    if not index.startswith("collections/"):
        raise EventError(f"event field 'index' must name a key under 'collections/', got {index!r}")
    digest = _str(event, "digest", "digest")
    partitions = _int(event, "partitions", "partitions", 1, 1 << 20)
    dim = _int(event, "dim", "dim", 1, 65_536)
    nq = _int(event, "nq", "nq", 0, _MAX_QUERIES)
    width = _int(event, "width", "width", 1, 1 << 20)
    keep = _int(event, "keep", "keep", 1, 1 << 20)
    retries = _int(event, "retries", "retries", 0, 10)
    level = _int(event, "level", "level", 1, _MAX_DEPTH + 1)
    node = _int(event, "node", "node", 0, 1 << 20)
    if not isinstance(event["partial"], bool):
        raise EventError("event field 'partial' must be a bool")
    queries = decode_array(event["queries"], "<f4", "queries", nq * dim).reshape(nq, dim)
    if not np.isfinite(queries).all():
        raise EventError("event field 'queries' contains NaN or infinity")
    lists = decode_array(event["lists"], "<i8", "lists", nq * width).reshape(nq, width)
    coarse = decode_array(event["coarse"], "<f4", "coarse", nq * width).reshape(nq, width)
    if not np.isfinite(coarse).all():  # a probe's coarse scores always are; NaN would poison the merge
        raise EventError("event field 'coarse' contains NaN or infinity")
    selection = decode_selection(event["selection"])
    scan = _scan(event["scan"], "scan", nq, partitions)
    children = _children(event["children"], "children", nq, level)
    return SearchEvent(event, bucket=bucket, prefix=prefix, index=index, digest=digest, partitions=partitions,
                       dim=dim, nq=nq, width=width, queries=queries, lists=lists, coarse=coarse, keep=keep,
                       selection=selection, partial=event["partial"], retries=retries, level=level, node=node,
                       scan=scan,
                       children=children)


def child_event(parent: SearchEvent, child: dict) -> dict:
    """The full event of one of ``parent``'s sub-trees: its queries taken from the parent's."""
    take = decode_array(child["take"], "<i4", "children[].take")
    raw = parent.raw
    out = {key: raw[key] for key in ("v", "op", "bucket", "prefix", "index", "digest", "partitions", "dim", "width",
                                     "keep", "selection", "partial", "retries")}
    out.update(nq=int(take.size), level=parent.level + 1, node=int(child["node"]),
               queries=encode_array(parent.queries[take], "<f4"), lists=encode_array(parent.lists[take], "<i8"),
               coarse=encode_array(parent.coarse[take], "<f4"), scan=child["scan"], children=child["children"])
    return out

