"""The database: a tier holding collections, opened with :func:`tierstore.connect`.

``connect("./data")`` keeps everything in one LMDB environment under that directory
(posting segments, vector chunks, manifests and WAL records are all blobs by key).
``connect("s3://bucket/prefix", endpoint_url=...)`` keeps them in S3; give
``cache_dir=`` to put a local file tier in front of it (read-through, write-through).

``memory_cache`` decides what a collection keeps in memory: ``None`` (default) loads
its posting lists and full-precision vectors (fastest search); a byte count keeps only
the centroids, the posting directory and at most that many bytes of recently probed
lists, and reads reranking vectors from the tier per query (the tiered mode: memory
far below the size of the vectors).

``s3_options`` tune the S3 tier: ``connect_timeout``, ``read_timeout`` (seconds per
attempt), ``max_attempts`` (botocore retries, with backoff, on 5xx, SlowDown, resets and
timeouts), ``retry_mode``, ``max_concurrency``, ``multipart_threshold``, ``part_size``,
``region_name``, ``conditional_writes``. A call's worst case is about
``max_attempts x (connect_timeout + read_timeout)`` plus backoff.

``gpu_cache=<bytes>`` keeps recently loaded KV chunks in GPU memory (``gpu_device``,
default CUDA when available) for the database's KV stores: a chunk loaded again to that
device is one device-to-device copy (:mod:`tierstore.store.kvcache.device_cache`).

``scan_device="cuda"`` (torch) keeps the held posting lists decoded in GPU memory and
scans them there (:mod:`tierstore.index.quant.torch_scanner`); quantizers ``sq8``,
``sq4`` and ``pq4fs``.
"""

from __future__ import annotations

import inspect
import os
import threading
from typing import TYPE_CHECKING, Any

from ..errors import (AlreadyExists, ConfigError, InvalidArgument, InvalidType, NotFound, StoreClosed,
                      TierUnavailable)
from ..tiers.base import BaseTier
from ._names import check_name
from ._writer_lock import WriterLock
from .collection import Collection, check_settings

if TYPE_CHECKING:
    from ..store.kvcache.store import KVCacheStore

__all__ = ["Database", "Client", "connect"]


_S3_OPTIONS = ("connect_timeout", "read_timeout", "max_attempts", "retry_mode", "max_concurrency",
               "multipart_threshold", "part_size", "region_name", "conditional_writes")


def _open_tier(uri: str, *, endpoint_url: str | None, cache_dir: str | None, map_size: int,
               s3_options: dict | None) -> tuple[BaseTier, int]:
    if s3_options is not None and not uri.startswith("s3://"):
        raise ConfigError(f"s3_options apply to s3:// URIs, not {uri!r}")
    if uri.startswith("s3://"):
        from ..tiers.s3 import S3Tier

        bucket, _, prefix = uri[5:].partition("/")
        if not bucket:
            raise ConfigError(f"an S3 URI needs a bucket: s3://bucket/prefix, got {uri!r}")
        options = {"max_concurrency": 64, **(s3_options or {})}
        unknown = set(options) - set(_S3_OPTIONS)
        if unknown:
            raise ConfigError(f"unknown s3_options {sorted(unknown)}; use {list(_S3_OPTIONS)}")
        tier: BaseTier = S3Tier(bucket, prefix.strip("/"), endpoint_url=endpoint_url, **options)
        if cache_dir is not None:
            from ..tiers.file import FileTier
            from ..tiers.hierarchy import TieredStore

            tier = TieredStore([FileTier(cache_dir), tier], write_policy="write-through")
        return tier, 256 * 1024
    if "://" in uri:
        raise ConfigError(f"unsupported URI {uri!r}: give a local directory path or s3://bucket/prefix")
    from ..tiers.lmdb import LmdbTier

    if not uri:
        raise InvalidArgument("the database path is empty; give a directory path or s3://bucket/prefix")
    try:
        os.makedirs(uri, exist_ok=True)
    except ValueError as exc:  # a NUL, or a character the file system encoding cannot hold
        raise InvalidArgument(f"{uri!r} cannot be a directory path here: {exc}") from exc
    except OSError as exc:  # a name too long, a file in the way, no permission
        raise TierUnavailable(f"cannot create the database directory {uri!r}: {exc}; "
                              "give a directory path that can be created") from exc
    return LmdbTier(os.path.join(uri, "tierstore.lmdb"), map_size=map_size), 16 * 1024


class Database:
    """Collections in one storage location. Use as a context manager or call :meth:`close`."""

    def __init__(self, uri: str | os.PathLike, *, endpoint_url: str | None = None, cache_dir: str | None = None,
                 memory_cache: int | None = None, flush_rows: int = 50_000, auto_index_rows: int = 20_000,
                 map_size: int = 1 << 30, tier: BaseTier | None = None, scan_device: str | None = None,
                 s3_options: dict[str, Any] | None = None, gpu_cache: int | None = None,
                 gpu_device: Any = None) -> None:
        if memory_cache is not None and (isinstance(memory_cache, bool) or not isinstance(memory_cache, int)
                                         or memory_cache < 0):
            raise InvalidArgument(f"memory_cache must be None or a byte count >= 0, got {memory_cache!r}")
        for label, value in (("flush_rows", flush_rows), ("auto_index_rows", auto_index_rows)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{label} must be a positive int, got {value!r}")
        self.uri = os.fspath(uri) if tier is None else str(uri)
        if tier is None:
            if not isinstance(self.uri, str):
                raise InvalidType(f"uri must be a path or an s3:// URI, got {uri!r}")
            tier, self.coalesce_gap = _open_tier(self.uri, endpoint_url=endpoint_url, cache_dir=cache_dir,
                                                 map_size=map_size, s3_options=s3_options)
            self._owns_tier = True
            local = not self.uri.startswith("s3://")
            self._locks_dir = os.path.join(self.uri, "locks") if local else None
        else:
            self.coalesce_gap = 0
            self._owns_tier = False
            self._locks_dir = None
        self.tier = tier
        self.memory_cache = memory_cache
        self.gpu_cache, self.gpu_device = gpu_cache, gpu_device
        self.scan_device = scan_device
        self.flush_rows = flush_rows
        self.auto_index_rows = auto_index_rows
        self._collections: dict[str, Collection] = {}
        self._kv_stores: list = []
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"<Database {self.uri!r}>"

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"database {self.uri!r} is closed")

    def writer_lock(self, name: str) -> WriterLock | None:
        """The file lock that makes one handle the writer of collection ``name`` (local directories only).

        On S3 there is none: a second writer is detected by the create-only WAL and
        manifest puts instead (see docs/architecture.md, "One writer per collection").
        """
        if self._locks_dir is None:
            return None
        return WriterLock(os.path.join(self._locks_dir, f"{name}.lock"), f"collection {name!r} in {self.uri!r}")

    def _new(self, name: str) -> Collection:
        return Collection(self, name, memory_cache=self.memory_cache, flush_rows=self.flush_rows,
                          auto_index_rows=self.auto_index_rows)

    def create_collection(self, name: str, dim: int, metric: str = "l2", *, attributes: dict[str, str] | None = None,
                          exist_ok: bool = False) -> Collection:
        """Create a collection of ``dim``-dimensional vectors compared by ``metric``.

        ``metric``: ``"l2"`` (squared Euclidean), ``"ip"`` (inner product) or ``"cosine"``
        (vectors are normalised on the way in). ``attributes`` declares the metadata
        schema (name -> ``"int"``, ``"float"``, ``"keyword"``, ``"keywords"``, ``"bool"``).
        An existing name raises :class:`AlreadyExists`, unless ``exist_ok`` and the
        settings match (different settings: :class:`ConfigError`).
        """
        name = check_name(name)
        settings = check_settings(dim, metric, attributes)
        with self._lock:
            self._check_open()
            col = self._new(name)
            try:
                col._create(settings)
            except AlreadyExists:
                if not exist_ok:
                    raise AlreadyExists(f"collection {name!r} already exists; open it with db.collection({name!r}) "
                                        "or pass exist_ok=True") from None
                col = self._collection(name)
                if col.settings != settings:
                    raise ConfigError(f"collection {name!r} exists with {col.settings}, not {settings}; "
                                      "use another name or drop it first") from None
                return col
            self._collections[name] = col
            return col

    def collection(self, name: str) -> Collection:
        """Open an existing collection; :class:`NotFound` when there is none by that name."""
        name = check_name(name)
        with self._lock:
            self._check_open()
            return self._collection(name)

    def _collection(self, name: str) -> Collection:
        col = self._collections.get(name)
        if col is None or col._closed:
            col = self._new(name)
            col._open()
            self._collections[name] = col
        return col

    def list_collections(self) -> list[str]:
        """Names of the collections, sorted."""
        self._check_open()
        names = set()
        for key in self.tier.list("collections/"):
            parts = key.split("/")
            if len(parts) >= 3 and parts[2] == "manifest":
                names.add(parts[1])
        return sorted(names)

    def drop_collection(self, name: str) -> None:
        """Delete a collection and all its data; :class:`NotFound` when absent."""
        name = check_name(name)
        with self._lock:
            self._check_open()
            prefix = f"collections/{name}/"
            keys = self.tier.list(prefix)
            manifests = [k for k in keys if k.startswith(prefix + "manifest/")]
            if not manifests:
                raise NotFound(f"collection {name!r} does not exist")
            col = self._collections.pop(name, None)
            if col is not None:
                col._closed = True
                if col._writer_lock is not None:  # a collection of that name may be created again
                    col._writer_lock.release()
            for key in manifests:  # first: the collection disappears before its data does
                self.tier.delete(key)
            for key in keys:
                if key not in manifests:
                    self.tier.delete(key)

    def kv_cache(self, model: Any, revision: str, codec: Any = "fp16", chunk_tokens: int = 256,
                 **options: Any) -> "KVCacheStore":
        """A chunk KV-cache store of ``model`` at ``revision`` in this database's tier.

        ``model``: a model id, or a transformers model (its config gives the layout and
        RoPE). ``codec``: ``"fp16"``, ``"bf16"``, ``"int8"``, ``"int4"``, ``"int2"``,
        ``"mixed"`` (or a codec object). Options: ``mode`` (``"prefix"`` / ``"content"``),
        ``codec_options``, ``dtype``, ``layers``, ``kv_heads``, ``head_dim``,
        ``memory_cache`` (bytes held in memory, cost-aware eviction), ``gpu_cache`` (bytes held on the GPU), ``rope``. See
        :class:`tierstore.store.kvcache.KVCacheStore`. Closed with the database.
        """
        from ..store.kvcache.store import KVCacheStore

        with self._lock:
            self._check_open()
            if self.gpu_cache is not None:
                options.setdefault("gpu_cache", self.gpu_cache)
                options.setdefault("gpu_device", self.gpu_device)
            store = KVCacheStore(self.tier, model=model, revision=revision, codec=codec, chunk_tokens=chunk_tokens,
                                 **options)
            self._kv_stores.append(store)
            return store

    def close(self) -> None:
        """Checkpoint and close every open collection and KV store, then the tier. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                for store in self._kv_stores:
                    store.close()
                for col in self._collections.values():
                    col.close()
            finally:
                self._closed = True
                if self._owns_tier:
                    self.tier.close()

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


Client = Database  # the name the client API uses; one class


def connect(uri: str | os.PathLike, **options: Any) -> Database:
    """Open the database at ``uri`` (a directory, or ``s3://bucket/prefix``); see :class:`Database`."""
    unknown = set(options) - _CONNECT_OPTIONS
    if unknown:
        raise ConfigError(f"unknown connect option(s) {sorted(unknown)}; use {sorted(_CONNECT_OPTIONS)}")
    return Database(uri, **options)


_CONNECT_OPTIONS = frozenset(inspect.signature(Database.__init__).parameters) - {"self", "uri"}
