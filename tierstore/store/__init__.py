"""The store layer: what the bytes in a tier mean.

* :mod:`~tierstore.store.blob`: the checksummed framing of every value written here.
* :mod:`~tierstore.store.manifest`: :class:`ManifestLog`, a collection's state as
  immutable, create-only versioned :class:`Manifest` commits.
* :mod:`~tierstore.store.wal`: :class:`WriteAheadLog` of :class:`UpsertRecord` and
  :class:`DeleteRecord` (defined in :mod:`~tierstore.store.wal_records`), crash-safe
  appends, replay and truncation.

Importing this package loads neither torch nor boto3: those come only with the tiers
that need them.
"""

from __future__ import annotations

from .blob import (
    FORMAT_VERSION, MAGIC, PREFIX_SIZE, TRAILER_SIZE, Blob, BlobHeader, Section, decode_blob, encode_blob,
    fetch_header, fetch_section, header_size, read_header, verify_section,
)
from .manifest import Manifest, ManifestLog
from .wal import WriteAheadLog
from .wal_records import DeleteRecord, Record, UpsertRecord

__all__ = [
    "ManifestLog", "Manifest",
    "WriteAheadLog", "UpsertRecord", "DeleteRecord", "Record",
    "MAGIC", "FORMAT_VERSION", "PREFIX_SIZE", "TRAILER_SIZE",
    "Blob", "BlobHeader", "Section",
    "encode_blob", "decode_blob", "header_size", "read_header", "verify_section",
    "fetch_header", "fetch_section",
]
