"""tierstore: storage-tiered vector search and LLM KV-cache storage.

One hierarchy of storage tiers (GPU memory, CPU memory, local SSD, S3-compatible object
storage) holds ANN posting lists, multi-tenant indices and chunk KV caches. See the
README and ``docs/`` for the architecture.
"""

from __future__ import annotations

from . import errors
from .errors import (AlreadyExists, CapacityError, CommitConflict, ConfigError, CorruptData, FilterError,
                     InvalidArgument, InvalidKey, InvalidType, NotFound, StoreClosed, TierstoreError, TierTimeout,
                     TierUnavailable, WriterConflict)

__version__ = "0.1.0"
__all__ = ["errors", "__version__", "connect", "connect_async", "Client", "AsyncClient", "Database", "Collection",
           "SearchResult", *errors.__all__]


def __getattr__(name: str):
    # The client pulls in faiss; load it on first use so `import tierstore` stays light.
    if name in ("connect", "Database", "Client"):
        from .client import database
        return getattr(database, name)
    if name in ("connect_async", "AsyncClient"):
        from .client import aio
        return getattr(aio, name)
    if name == "Collection":
        from .client.collection import Collection
        return Collection
    if name == "SearchResult":
        from .client.results import SearchResult
        return SearchResult
    raise AttributeError(f"module 'tierstore' has no attribute {name!r}")
