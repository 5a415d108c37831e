"""What the LangChain and LlamaIndex stores share: string ids as row ids, and metadata schemas.

No third-party import here, so both integrations (each importing its own framework) use it.

* :func:`string_id_to_int`: a framework's string id becomes the collection's int64 id,
  the low 63 bits of xxh3-64 of its UTF-8 bytes (stable across processes).
* :func:`infer_schema`: the filter schema a first batch of metadata suggests: str ->
  keyword, int -> int, float (or ints and floats) -> float, bool -> bool, list of str ->
  keywords; fields starting with ``_``/``$``, of other types or of conflicting types are
  left out (they stay in the stored metadata, unfiltered).
* :func:`check_schema`: a declared ``metadata_schema``, checked.
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import xxhash

from ...errors import ConfigError, InvalidArgument, InvalidType, NotFound
from ..collection import ATTRIBUTE_TYPES, METRICS

__all__ = ["string_id_to_int", "int_ids", "infer_schema", "check_schema", "fits", "filterable_fields",
           "no_options", "check_store_args", "StoreLifecycle"]

_ID_MASK = (1 << 63) - 1
_INT64 = np.iinfo(np.int64)
_CONFLICT = "conflict"  # a field the first batch gives two incompatible types


def string_id_to_int(doc_id: str, what: str = "document ids") -> int:
    """The int64 row id of a string id: the low 63 bits of xxh3-64 of its UTF-8 bytes."""
    if not isinstance(doc_id, str):
        raise InvalidType(f"{what} must be str, got {type(doc_id).__name__} {doc_id!r:.60}")
    return xxhash.xxh3_64_intdigest(doc_id.encode("utf-8")) & _ID_MASK


def int_ids(ids: Sequence[str], what: str = "ids") -> np.ndarray:
    """:func:`string_id_to_int` of each id, as an int64 array."""
    if isinstance(ids, str):
        raise InvalidType(f"{what} must be a list of str, got the str {ids!r:.60}")
    return np.array([string_id_to_int(doc_id, what) for doc_id in ids], dtype=np.int64)


def _kind_of(value: object) -> str | None:
    """The attribute type a metadata value suggests; None when it suggests none."""
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int" if _INT64.min <= int(value) <= _INT64.max else None
    if isinstance(value, (float, np.floating)):
        return "float" if math.isfinite(value) else None
    if isinstance(value, str):
        return "keyword"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return "keywords"
    return None


def fits(kind: str, value: object) -> bool:
    """Whether ``value`` can go into a column of type ``kind``."""
    found = _kind_of(value)
    return (found == kind or (kind == "float" and found == "int")
            or (kind == "keywords" and isinstance(value, (list, tuple)) and not value))


def infer_schema(metadatas: Iterable[Mapping[str, Any]], reserved: Container[str] = ()) -> dict[str, str]:
    """The filter schema that a first batch of metadata suggests (see the module docstring)."""
    kinds: dict[str, str] = {}
    for metadata in metadatas:
        for name, value in metadata.items():
            if not isinstance(name, str) or not name or name[0] in "_$" or name in reserved:
                continue
            kind = _kind_of(value)
            seen = kinds.get(name)
            if kind is None or seen == kind or seen == _CONFLICT:
                continue
            if seen is None:
                kinds[name] = kind
            else:
                kinds[name] = "float" if {seen, kind} == {"int", "float"} else _CONFLICT
    return {name: kind for name, kind in kinds.items() if kind != _CONFLICT}


def check_schema(schema: Mapping[str, str], reserved: Container[str] = ()) -> dict[str, str]:
    """A declared ``metadata_schema`` (field -> attribute type), checked."""
    if not isinstance(schema, Mapping):
        raise InvalidType(f"metadata_schema must be a dict of field -> type, got {type(schema).__name__}")
    for name, kind in schema.items():
        if not isinstance(name, str) or not name or name[0] in "_$":
            raise InvalidArgument(f"metadata_schema field {name!r} must be a non-empty str not starting with "
                                  "'_' or '$' ('_' names are stored unfiltered)")
        if name in reserved:
            raise InvalidArgument(f"metadata_schema field {name!r} is a name tierstore keeps for its own "
                                  f"bookkeeping ({sorted(reserved)})")
        if kind not in ATTRIBUTE_TYPES:
            raise InvalidArgument(f"metadata_schema field {name!r} has type {kind!r}; use one of {ATTRIBUTE_TYPES}")
    return dict(schema)


def filterable_fields(metadata: Mapping[str, Any], schema: Mapping[str, str], strict: bool,
                      skip: Container[str] = ()) -> dict[str, Any]:
    """The metadata values that go into the schema's filter columns (``strict``: a declared
    schema, whose type errors surface at add; otherwise values that do not fit are left out)."""
    out = {}
    for name, kind in schema.items():
        value = metadata.get(name)
        if name not in skip and value is not None and (strict or fits(kind, value)):
            out[name] = value
    return out


class StoreLifecycle:
    """``collection``, ``close``, the context manager and ``repr`` of an integration's store
    (which keeps ``_db``, ``_owns_db``, ``_collection``, ``_metric`` and ``collection_name``)."""

    @property
    def collection(self):
        """The tierstore collection (``None`` until the first add creates it)."""
        return self._collection

    def _existing_collection(self):
        """The collection if it exists (its metric checked against the one asked for), else None."""
        try:
            col = self._db.collection(self.collection_name)
        except NotFound:
            return None
        if self._metric is not None and col.metric != self._metric:
            raise ConfigError(f"collection {self.collection_name!r} exists with metric {col.metric!r}, "
                              f"not {self._metric!r}")
        return col

    def close(self) -> None:
        """Close the database when this store opened it (checkpointing the collection). Idempotent."""
        if self._owns_db and self._db is not None:
            self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.collection_name!r} in {self._db!r}>"


def check_store_args(uri: object, database: object, connect_options: object, metric: object,
                     batch_size: object) -> None:
    """The constructor arguments both stores take, checked."""
    if (uri is None) == (database is None):
        raise InvalidArgument("give uri= (a directory or s3://bucket/prefix) or database= (an open "
                              "tierstore database), exactly one")
    if database is not None and connect_options:
        raise InvalidArgument("connect_options apply to uri=; database= is already open")
    if metric is not None and metric not in METRICS:
        raise InvalidArgument(f"metric must be one of {METRICS}, got {metric!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgument(f"batch_size must be a positive int, got {batch_size!r}")


def no_options(kwargs: Mapping[str, Any]) -> None:
    """Refuse keyword arguments a method does not take."""
    if kwargs:
        raise InvalidType(f"unexpected keyword argument(s) {sorted(kwargs)}")
