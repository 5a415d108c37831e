"""AsyncClient: the database, collections, tenants and KV stores with coroutine methods.

``async with tierstore.connect_async("./data") as client:`` gives the same calls as
:func:`tierstore.connect`, each a coroutine::

    col = await client.create_collection("docs", dim=384, metric="cosine")
    await col.add(ids, vectors)
    res = await col.search(xq, k=10, filter={"lang": "en"})
    kv = await client.kv_cache("org/model", "abc123", codec="int8")
    await kv.put(tokens, past_key_values); layers = await kv.get(tokens)

Every call runs in the client's thread pool (``max_workers``, default 8), so LMDB, boto3,
faiss and torch never block the event loop; many searches and KV loads can be in flight
at once (faiss and numpy release the GIL in their kernels; S3 reads run in the tier's own
bounded pool). Objects are thin wrappers: ``col.sync`` is the underlying
:class:`~tierstore.client.collection.Collection` for code that wants both.
"""

from __future__ import annotations

import asyncio
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import InvalidArgument, StoreClosed
from .database import Database

__all__ = ["AsyncClient", "AsyncCollection", "AsyncTenant", "AsyncKVCache", "connect_async"]


class _Async:
    """Wraps a sync object: each name in ``_methods`` becomes a coroutine run in the pool."""

    _methods: tuple[str, ...] = ()

    def __init__(self, target: Any, pool: ThreadPoolExecutor) -> None:
        self.sync = target
        self._pool = pool

    async def _run(self, fn, *args, **kwargs):
        try:
            future = asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))
        except RuntimeError as exc:  # the pool was shut down by close()
            raise StoreClosed(f"the async client is closed ({exc})") from None
        return await future

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in cls._methods:
            if name not in cls.__dict__:
                setattr(cls, name, _coroutine(name))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self.sync!r}>"


def _coroutine(name: str):
    async def method(self, *args: Any, **kwargs: Any) -> Any:
        return await self._run(getattr(self.sync, name), *args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"Coroutine form of the sync ``{name}`` (run in the client's thread pool)."
    return method


class AsyncTenant(_Async):
    """A tenant handle with coroutine methods (see :class:`~tierstore.client.tenants.TenantHandle`)."""

    _methods = ("add", "get", "search", "delete", "count")


class AsyncCollection(_Async):
    """A collection with coroutine methods (see :class:`~tierstore.client.collection.Collection`)."""

    _methods = ("add", "search", "get", "delete", "count", "stats", "flush", "build_index", "grant", "revoke",
                "drop_tenant", "tenants", "tenant_stats", "offload_tenants")

    def tenant(self, name: str) -> AsyncTenant:
        """A handle bound to tenant ``name`` (no I/O: not a coroutine)."""
        return AsyncTenant(self.sync.tenant(name), self._pool)


class AsyncKVCache(_Async):
    """A KV-cache store with coroutine methods (its own ``*_async`` twins)."""

    _methods = ("stats", "chunk_keys", "contains")

    async def put(self, token_ids: object, past_key_values: Any, **options: Any) -> int:
        return await self.sync.put_async(token_ids, past_key_values, **options)

    async def get(self, token_ids: object, **options: Any) -> Any:
        return await self.sync.get_async(token_ids, **options)

    async def get_layers(self, token_ids: object, layers, **options: Any) -> Any:
        return await self.sync.get_layers_async(token_ids, layers, **options)

    async def lookup_prefix(self, token_ids: object) -> int:
        return await self.sync.lookup_prefix_async(token_ids)

    async def delete(self, token_ids: object) -> int:
        return await self.sync.delete_async(token_ids)

    async def put_many(self, items, **options: Any) -> list[int]:
        return await self.sync.put_many_async(items, **options)

    async def get_many(self, token_id_lists, **options: Any) -> list[Any]:
        return await self.sync.get_many_async(token_id_lists, **options)


class AsyncClient(_Async):
    """:class:`~tierstore.client.database.Database` with coroutine methods; ``async with`` closes it."""

    _methods = ("list_collections", "drop_collection")

    def __init__(self, uri: str | os.PathLike, *, max_workers: int = 8, **options: Any) -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise InvalidArgument(f"max_workers must be a positive int, got {max_workers!r}")
        super().__init__(Database(uri, **options), ThreadPoolExecutor(max_workers, thread_name_prefix="tierstore-aio"))

    async def create_collection(self, name: str, dim: int, metric: str = "l2", **options: Any) -> AsyncCollection:
        col = await self._run(self.sync.create_collection, name, dim, metric, **options)
        return AsyncCollection(col, self._pool)

    async def collection(self, name: str) -> AsyncCollection:
        return AsyncCollection(await self._run(self.sync.collection, name), self._pool)

    async def kv_cache(self, model: Any, revision: str, codec: Any = "fp16", chunk_tokens: int = 256,
                       **options: Any) -> AsyncKVCache:
        store = await self._run(self.sync.kv_cache, model, revision, codec, chunk_tokens, **options)
        return AsyncKVCache(store, self._pool)

    async def close(self) -> None:
        """Close the database (checkpointing collections), then the pool. Idempotent."""
        await self._run(self.sync.close)
        self._pool.shutdown(wait=False)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


def connect_async(uri: str | os.PathLike, **options: Any) -> AsyncClient:
    """Open the database at ``uri`` for asyncio code; options as :func:`tierstore.connect` plus ``max_workers``."""
    return AsyncClient(uri, **options)
