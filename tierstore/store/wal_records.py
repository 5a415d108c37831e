"""WAL records: the upserts and deletes a write-ahead log holds, and their stored form.

:class:`UpsertRecord` and :class:`DeleteRecord` validate and copy their input on
construction (read-only int64 ids, read-only float32 vectors, frozen JSON attributes),
so a record in hand is always one that can be written. :func:`encode_record` frames a
record as the blob stored at one LSN (:mod:`tierstore.store.blob`): header ``{"kind":
"wal-record", "format": 1, "lsn": n, "batch": [first, last], "op": "upsert" |
"delete", "count": rows, "dim": d or null, "writer": str}`` and sections ``ids``
(little-endian int64), ``vectors`` (little-endian float32, row-major; upserts) and
``attributes`` (a UTF-8 JSON list of objects; when given). :func:`decode_record`
verifies a stored record and returns read-only ``np.frombuffer`` views of the fetched
bytes (no copy); damage raises :class:`~tierstore.errors.CorruptData` naming the key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from ..errors import CorruptData, InvalidArgument, InvalidType, NotFound
from ._ids import as_id_array
from ._json import dumps_json, freeze_json
from ._layout import decode_numbered_blob
from .blob import encode_blob

__all__ = ["UpsertRecord", "DeleteRecord", "Record", "encode_record", "decode_record", "WAL_FORMAT"]

WAL_FORMAT = 1
_ALIGN = 64


def _as_array(value: object, what: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested lists, objects numpy cannot convert
        raise InvalidArgument(f"{what} cannot be read as an array ({exc}); pass a numpy array") from exc


def _check_ids(ids: object) -> np.ndarray:
    arr = _as_array(ids, "ids")
    if arr.ndim != 1:
        raise InvalidArgument(f"ids must be 1-D, got shape {arr.shape}; wrap a single id in a list")
    return as_id_array(arr, "ids", empty="a record needs at least one id", range_note=" (-1 pads search results)")


def _check_vectors(vectors: object, ids: np.ndarray) -> np.ndarray:
    arr = _as_array(vectors, "vectors")
    if arr.dtype.kind != "f":
        raise InvalidType(f"vectors must be floating point, got dtype {arr.dtype}; use .astype(np.float32)")
    if arr.ndim != 2 or arr.shape[0] != ids.size or arr.shape[1] < 1:
        raise InvalidArgument(f"vectors must have shape ({ids.size}, dim) for {ids.size} ids, got {arr.shape}; "
                              "reshape a single vector with v[None, :]")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, rejected below
        out = np.array(arr, dtype=np.float32)
    finite = np.isfinite(out).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise InvalidArgument(f"vectors contain NaN or infinity (first in row {row}, id {ids[row]}; in float32 "
                              "when converted); an index cannot use them: drop or repair those rows")
    out.flags.writeable = False
    return out


def _check_attributes(attributes: object, count: int) -> tuple[Mapping[str, Any], ...] | None:
    if attributes is None:
        return None
    if isinstance(attributes, (str, bytes, Mapping)) or not isinstance(attributes, Sequence):
        raise InvalidType(f"attributes must be a list of dicts (one per id) or None, got {type(attributes).__name__}")
    if len(attributes) != count:
        raise InvalidArgument(f"attributes has {len(attributes)} entries for {count} ids; give one dict per id")
    for index, item in enumerate(attributes):
        if not isinstance(item, Mapping):
            raise InvalidType(f"attributes[{index}] must be a dict, got {type(item).__name__}")
    return freeze_json(tuple(attributes), "attributes")


@dataclass(frozen=True, eq=False)
class UpsertRecord:
    """Insert or replace ``vectors[i]`` (and ``attributes[i]``) under ``ids[i]``.

    On construction ``ids`` become a read-only int64 array (integers from 0 to 2**63-1,
    no repeats), ``vectors`` a read-only float32 ``(len(ids), dim)`` array (any float
    dtype is converted; NaN or infinity is :class:`InvalidArgument`), and
    ``attributes`` ``None`` or a tuple of read-only mappings (JSON-like; lists come
    back as tuples). Wrong types raise :class:`InvalidType`.
    """

    ids: np.ndarray
    vectors: np.ndarray
    attributes: tuple[Mapping[str, Any], ...] | None = None

    def __post_init__(self) -> None:
        ids = _check_ids(self.ids)
        if np.unique(ids).size != ids.size:
            values, counts = np.unique(ids, return_counts=True)
            raise InvalidArgument(f"ids repeat within one upsert (e.g. {values[counts > 1][:5].tolist()}); "
                                  "keep one row per id")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "vectors", _check_vectors(self.vectors, ids))
        object.__setattr__(self, "attributes", _check_attributes(self.attributes, ids.size))

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.ids.size)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UpsertRecord):
            return NotImplemented
        return (np.array_equal(self.ids, other.ids) and self.vectors.shape == other.vectors.shape
                and self.vectors.tobytes() == other.vectors.tobytes() and self.attributes == other.attributes)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"UpsertRecord(rows={len(self)}, dim={self.dim}, attributes={self.attributes is not None})"


@dataclass(frozen=True, eq=False)
class DeleteRecord:
    """Delete ``ids`` (a read-only int64 array after construction; repeats are harmless)."""

    ids: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", _check_ids(self.ids))

    def __len__(self) -> int:
        return int(self.ids.size)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DeleteRecord):
            return NotImplemented
        return np.array_equal(self.ids, other.ids)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"DeleteRecord(rows={len(self)})"


Record = Union[UpsertRecord, DeleteRecord]


def _trusted(cls: type, **fields: Any) -> Any:
    """Build a record from decoded, already-validated arrays without copying them."""
    record = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(record, name, value)
    return record


def encode_record(record: Record, lsn: int, batch: tuple[int, int], writer: str) -> bytes:
    """Frame ``record`` as the blob stored at ``lsn`` (``batch`` = first and last LSN of its put)."""
    header: dict[str, Any] = {"kind": "wal-record", "format": WAL_FORMAT, "lsn": lsn, "batch": list(batch),
                              "count": len(record), "writer": writer}
    sections: dict[str, object] = {"ids": record.ids.astype("<i8", copy=False)}
    if isinstance(record, UpsertRecord):
        header.update(op="upsert", dim=record.dim)
        sections["vectors"] = record.vectors.astype("<f4", copy=False)
        if record.attributes is not None:
            sections["attributes"] = dumps_json(record.attributes)
    elif isinstance(record, DeleteRecord):
        header.update(op="delete", dim=None)
    else:
        raise InvalidType(f"a WAL record is an UpsertRecord or a DeleteRecord, got {type(record).__name__}")
    return encode_blob(header, sections=sections, align=_ALIGN)


def decode_record(data: object, key: str, lsn: int) -> Record:
    """Verify and decode the record stored at ``key``; :class:`CorruptData` names the key."""
    blob = decode_numbered_blob(data, key, kind="wal-record", fmt=WAL_FORMAT, number_field="lsn", number=lsn,
                                what="WAL record")
    head = blob.header
    try:
        count, op = head["count"], head["op"]
        ids = np.frombuffer(blob.section("ids"), dtype="<i8")
        if ids.size != count:
            raise ValueError(f"{ids.size} ids for {count} rows")
        if op == "delete":
            return _trusted(DeleteRecord, ids=ids)
        dim = head["dim"]
        vectors = np.frombuffer(blob.section("vectors"), dtype="<f4")
        if op != "upsert" or type(dim) is not int or vectors.size != count * dim:
            raise ValueError(f"op {op!r} with {vectors.size} values for {count} rows of dim {dim!r}")
        attributes = None
        if "attributes" in blob.sections:
            attributes = json.loads(str(blob.section("attributes"), "utf-8"))
            if not isinstance(attributes, list) or len(attributes) != count:
                raise ValueError("attributes are not a list with one entry per row")
            attributes = freeze_json(attributes)
        return _trusted(UpsertRecord, ids=ids, vectors=vectors.reshape(count, dim), attributes=attributes)
    except (KeyError, TypeError, ValueError, NotFound) as exc:
        raise CorruptData(f"WAL record {key!r} is malformed ({exc}); its checksum matched, so a different "
                          "program wrote it") from exc
