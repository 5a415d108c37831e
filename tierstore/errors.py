"""The tierstore exception hierarchy.

Every error tierstore raises on purpose is a :class:`TierstoreError`. Leaves that
correspond to a builtin also subclass it, so ``except KeyError`` or ``except
ValueError`` keep working for callers who do not know tierstore::

    TierstoreError
    ├── InvalidArgument (ValueError)     bad input: values, shapes, options, ranges
    │   ├── InvalidKey                   a key that no tier may store (``../x``, NUL, ...)
    │   ├── ConfigError                  a tier or store configured inconsistently
    │   ├── FilterError                  a metadata filter that does not parse against the schema
    │   └── EventError                   a serverless worker event that breaks its schema
    ├── InvalidType (TypeError)          an argument of the wrong type (``None`` value, ...)
    ├── NotFound (KeyError)              the key / collection / object does not exist
    ├── AlreadyExists                    ``mode="create"`` found the key already present
    │   ├── CommitConflict               another writer committed this manifest version first
    │   └── WriterConflict               another writer is appending to this write-ahead log
    ├── CapacityError                    a value does not fit the tier's byte budget
    │   ├── PayloadTooLarge              a Lambda request/response over the 6 MB synchronous limit
    │   └── PackageTooLarge              a Lambda zip over the 250 MB unzipped limit
    ├── CorruptData                      a checksum or framing check failed: never data
    ├── StoreClosed                      the tier or store was closed
    └── TierUnavailable                  the backend failed (I/O, network, LMDB, S3, GPU)
        ├── TierTimeout                  ... by running past a configured deadline
        └── WorkerError                  a serverless search worker failed after its retries

Backend exceptions (``lmdb.Error``, ``botocore`` errors, ``OSError``, torch's
``RuntimeError``) are translated where tierstore calls the backend and chained with
``raise ... from exc``, so the original is always in ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "TierstoreError",
    "InvalidArgument",
    "InvalidKey",
    "ConfigError",
    "FilterError",
    "InvalidType",
    "NotFound",
    "AlreadyExists",
    "CommitConflict",
    "WriterConflict",
    "CapacityError",
    "CorruptData",
    "StoreClosed",
    "TierUnavailable",
    "TierTimeout",
    "EventError",
    "PayloadTooLarge",
    "PackageTooLarge",
    "WorkerError",
]


class TierstoreError(Exception):
    """Base class of every error tierstore raises on purpose."""


class InvalidArgument(TierstoreError, ValueError):
    """An argument has an acceptable type but an unusable value."""


class InvalidKey(InvalidArgument):
    """A key breaks the key rules (see :func:`tierstore.tiers.validate_key`)."""


class ConfigError(InvalidArgument):
    """A tier, store or index was configured inconsistently."""


class FilterError(InvalidArgument):
    """A metadata filter is malformed or does not fit the collection's attribute schema.

    Raised by :func:`tierstore.index.filters.parse_filter`; the message names the
    offending part by its path in the filter (``$and[1].year.$gte``).
    """


class InvalidType(TierstoreError, TypeError):
    """An argument has the wrong type."""


class NotFound(TierstoreError, KeyError):
    """The key (or named object) does not exist."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep messages readable
        return str(self.args[0]) if self.args else ""


class AlreadyExists(TierstoreError):
    """A create-only write found the key already present."""


class CommitConflict(AlreadyExists):
    """Another writer committed this manifest version first; reload with ``latest()`` and retry.

    Raised by :meth:`tierstore.store.ManifestLog.commit`; nothing of the losing commit
    remains, so reapplying the change to the new latest version and committing again
    is always safe.
    """


class WriterConflict(AlreadyExists):
    """Another writer is appending to this log.

    Raised by :meth:`tierstore.store.WriteAheadLog.append` when an LSN it was about to
    write was taken; that log object then refuses further appends (reopen it once the
    other writer has stopped).
    """


class CapacityError(TierstoreError):
    """A value does not fit in a tier's byte budget (even after eviction)."""


class CorruptData(TierstoreError):
    """Stored bytes failed a checksum or framing check; they are never returned as data."""


class StoreClosed(TierstoreError):
    """An operation was attempted on a closed tier or store."""


class TierUnavailable(TierstoreError):
    """The backend of a tier failed: disk, LMDB, network, S3 or GPU."""


class TierTimeout(TierUnavailable):
    """A backend call ran past its configured deadline."""


class EventError(InvalidArgument):
    """A serverless worker event does not match its schema (:mod:`tierstore.serverless.events`).

    The message names the field (``scan[2].queries``) and what it must be; the worker
    never evaluates strings from an event.
    """


class PayloadTooLarge(CapacityError):
    """A Lambda request or response exceeds the 6 MB synchronous-invocation limit.

    Raised instead of sending (or returning) a truncated payload: search fewer queries
    per call, or use more partitions so that each worker returns fewer candidates.
    """


class PackageTooLarge(CapacityError):
    """A Lambda deployment package exceeds the 250 MB unzipped limit."""


class WorkerError(TierUnavailable):
    """A serverless search worker failed (or timed out) after its retries.

    ``partitions`` lists the partitions whose results are missing, ``cause_type`` the
    remote error type. Pass ``allow_partial=True`` to the executor to get partial
    results flagged in ``res.stats["partial"]`` instead.
    """

    def __init__(self, message: str, *, partitions: tuple[int, ...] = (), cause_type: str | None = None) -> None:
        super().__init__(message)
        self.partitions = tuple(partitions)
        self.cause_type = cause_type
