"""LangChain ``VectorStore`` over a tierstore collection: :class:`TierstoreVectorStore`.

::

    from tierstore.client.integrations.langchain import TierstoreVectorStore

    store = TierstoreVectorStore(embedding=embeddings, uri="./data", collection_name="docs")
    ids = store.add_documents(docs)                  # or add_texts(texts, metadatas, ids=[...])
    store.similarity_search("query", k=4, filter={"source": "manual", "page": {"$lt": 10}})
    store.similarity_search_with_score("query")      # (doc, distance), nearest first
    store.max_marginal_relevance_search("query", k=4, fetch_k=20)
    store.get_by_ids(ids[:2]); store.delete(ids[:1]); store.close()

Every method has an async twin (``aadd_documents``, ``asimilarity_search``, ...): the
embeddings' own async methods embed, and the storage calls run in a worker thread, so
LMDB, S3 and faiss never block the event loop.

**Rows.** A document is one row of the collection (created on the first add, when the
embeddings give the dimension; ``metric`` ``"cosine"`` unless told). LangChain's string
ids (a uuid4 when a document has none) become tierstore's int64 ids through a 63-bit
xxh3 hash of their UTF-8 bytes; adding an id again replaces its document. Two ids of a
collection share a hash with probability about n²/2⁶⁴ (5e-8 at a million documents), in
which case the later replaces the earlier; ``get_by_ids`` checks the stored id. The row's
attributes keep the text (``_lc_text``), the string id (``_lc_id``) and the whole
metadata (``_lc_metadata``; JSON-like: str keys, dicts, lists, str, numbers, bools, None),
stored but not filterable, plus a copy of every metadata field in the schema.

**Filters** are tierstore's filter language (``docs/filters.md``: ``{"page": {"$gte": 3}}``,
``$in``, ``$or``, ...) over the metadata fields in the collection's schema, which is fixed
when the collection is created:

- ``metadata_schema={"source": "keyword", "page": "int", "tags": "keywords"}`` declares it
  (types ``int float keyword keywords bool``); a value of another type is an error at add.
- Without it, the first batch added decides: str -> keyword, int -> int, float -> float
  (int and float mixed -> float), bool -> bool, a list of str -> keywords; fields whose
  names start with ``_``, other values, conflicting types and fields first seen later are
  kept in the metadata but are not filterable, and so is a later value that does not fit
  its field's type (a filter on that field does not match it).
- ``metadata_schema={}``: no field is filterable.

A filter naming a field outside the schema raises ``FilterError`` (it lists the schema).
An existing collection is reopened with its metric and schema; an explicit
``metadata_schema`` or ``metric`` that differs from it is a ``ConfigError``.

**Scores.** ``similarity_search_with_score`` returns the collection's distance, smaller is
better: ``1 - cos`` (``"cosine"``), squared L2 (``"l2"``), minus the inner product
(``"ip"``). Relevance scores (``similarity_search_with_relevance_scores``) are
``(1 + cos) / 2`` for cosine (always in [0, 1]), ``1 - L2 / sqrt(2)`` for l2 and
LangChain's inner-product mapping for ip (both in [0, 1] for unit vectors only).
Searches take tierstore's search parameters as keywords (``nprobe``, ``rerank``,
``prune_ratio``).
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..._optional import require
from ...errors import ConfigError, InvalidArgument, InvalidType
from .._names import check_name
from ..collection import Collection
from ..database import Database, connect
from ._common import (StoreLifecycle, check_schema, check_store_args, filterable_fields, infer_schema, int_ids,
                      no_options, string_id_to_int)

require("langchain_core", "langchain", "tierstore's LangChain integration")

from langchain_core.documents import Document  # noqa: E402
from langchain_core.embeddings import Embeddings  # noqa: E402
from langchain_core.vectorstores import VectorStore  # noqa: E402
from langchain_core.vectorstores.utils import maximal_marginal_relevance  # noqa: E402

__all__ = ["TierstoreVectorStore", "infer_schema", "string_id_to_int"]

TEXT, ID, METADATA = "_lc_text", "_lc_id", "_lc_metadata"


def _prepare(texts: Iterable[str], metadatas: Sequence[Mapping[str, Any]] | None,
             ids: Sequence[str | None] | None) -> tuple[list[str], list[dict], list[str]]:
    """Texts, metadata dicts and string ids (uuid4 where none is given), checked for length."""
    texts = list(texts)
    metas = [{} for _ in texts] if metadatas is None else [dict(m or {}) for m in metadatas]
    if len(metas) != len(texts):
        raise InvalidArgument(f"{len(metas)} metadatas for {len(texts)} texts; give one per text")
    if ids is None:
        ids = [None] * len(texts)
    ids = [str(uuid.uuid4()) if doc_id is None else doc_id for doc_id in ids]
    if len(ids) != len(texts):
        raise InvalidArgument(f"{len(ids)} ids for {len(texts)} texts; give one per text")
    for text in texts:
        if not isinstance(text, str):
            raise InvalidType(f"texts must be str, got {type(text).__name__}")
    return texts, metas, ids


class TierstoreVectorStore(StoreLifecycle, VectorStore):
    """A LangChain vector store kept in a tierstore collection; see the module docstring.

    Give ``uri`` (a directory or ``s3://bucket/prefix``; ``connect_options`` go to
    :func:`tierstore.connect`, e.g. ``endpoint_url``, ``memory_cache``) or ``database``
    (an open :class:`~tierstore.client.database.Database`, which :meth:`close` leaves
    open). ``metric`` is ``"cosine"`` (default), ``"l2"`` or ``"ip"``.
    """

    def __init__(self, embedding: Embeddings, uri: str | os.PathLike | None = None,
                 collection_name: str = "langchain", *, metric: str | None = None,
                 metadata_schema: Mapping[str, str] | None = None, database: Database | None = None,
                 connect_options: Mapping[str, Any] | None = None, batch_size: int = 1_000) -> None:
        check_store_args(uri, database, connect_options, metric, batch_size)
        self._embedding = embedding
        self.collection_name = check_name(collection_name)
        self._metric = metric
        self._declared = None if metadata_schema is None else check_schema(metadata_schema)
        self._batch_size = batch_size
        self._lock = threading.Lock()
        self._owns_db = database is None
        self._db = connect(uri, **dict(connect_options or {})) if database is None else database
        try:
            self._collection: Collection | None = self._open_existing()
        except BaseException:
            self.close()
            raise

    def _open_existing(self) -> Collection | None:
        col = self._existing_collection()
        if col is None:
            return None
        if self._declared is not None and col.settings["attributes"] != self._declared:
            raise ConfigError(f"collection {self.collection_name!r} exists with metadata schema "
                              f"{col.settings['attributes']}, not {self._declared}")
        return col

    # ----------------------------------------------------------------- handles
    @property
    def embeddings(self) -> Embeddings:
        return self._embedding

    # ------------------------------------------------------------------ writes
    def _collection_for(self, dim: int, metadatas: list[dict]) -> Collection:
        with self._lock:
            if self._collection is None:
                schema = self._declared if self._declared is not None else infer_schema(metadatas)
                self._collection = self._db.create_collection(self.collection_name, dim, self._metric or "cosine",
                                                              attributes=schema, exist_ok=True)
            return self._collection

    def _write(self, texts: list[str], metadatas: list[dict], ids: list[str], vectors: Any) -> None:
        """Upsert one embedded batch (an id repeated in the batch: its last document wins)."""
        arr = np.asarray(vectors, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[0] != len(texts):
            raise InvalidArgument(f"the embeddings returned shape {arr.shape} for {len(texts)} texts")
        col = self._collection_for(arr.shape[1], metadatas)
        schema, strict = col.settings["attributes"], self._declared is not None
        last = {doc_id: i for i, doc_id in enumerate(ids)}
        keep = sorted(last.values())
        rows = []
        for i in keep:
            row = {TEXT: texts[i], ID: ids[i], METADATA: metadatas[i]}
            row.update(filterable_fields(metadatas[i], schema, strict))
            rows.append(row)
        col.add(np.array([string_id_to_int(ids[i]) for i in keep], dtype=np.int64), arr[keep], rows)

    def _batches(self, count: int, batch_size: int | None) -> list[slice]:
        size = self._batch_size if batch_size is None else batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidArgument(f"batch_size must be a positive int, got {size!r}")
        return [slice(start, start + size) for start in range(0, count, size)]

    def add_texts(self, texts: Iterable[str], metadatas: list[dict] | None = None, *,
                  ids: list[str | None] | None = None, batch_size: int | None = None, **kwargs: Any) -> list[str]:
        """Embed and upsert ``texts``; returns their ids (given, or new uuid4 strings)."""
        no_options(kwargs)
        texts, metadatas, ids = _prepare(texts, metadatas, ids)
        for part in self._batches(len(texts), batch_size):
            self._write(texts[part], metadatas[part], ids[part], self._embedding.embed_documents(texts[part]))
        return ids

    async def aadd_texts(self, texts: Iterable[str], metadatas: list[dict] | None = None, *,
                         ids: list[str | None] | None = None, batch_size: int | None = None,
                         **kwargs: Any) -> list[str]:
        no_options(kwargs)
        texts, metadatas, ids = _prepare(texts, metadatas, ids)
        for part in self._batches(len(texts), batch_size):
            vectors = await self._embedding.aembed_documents(texts[part])
            await asyncio.to_thread(self._write, texts[part], metadatas[part], ids[part], vectors)
        return ids

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool:
        """Delete documents by id (absent ids are ignored); ``ids=None`` deletes every document."""
        no_options(kwargs)
        with self._lock:
            col = self._collection
            if col is None:
                return True
            if ids is None:
                self._db.drop_collection(self.collection_name)
                self._collection = None
                return True
        wanted = int_ids(ids)
        if wanted.size:
            col.delete(wanted)
        return True

    async def adelete(self, ids: list[str] | None = None, **kwargs: Any) -> bool:
        return await asyncio.to_thread(self.delete, ids, **kwargs)

    # ------------------------------------------------------------------- reads
    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """The stored documents of ``ids`` (missing ones left out; a repeated id once), in that order."""
        if isinstance(ids, str):
            raise InvalidType(f"ids must be a list of str, got the str {ids!r:.60}")
        col = self._collection
        wanted = list(dict.fromkeys(ids))
        if col is None or not wanted:
            return []
        rows = col.get(int_ids(wanted), include_vectors=False)
        return [_document(row) for doc_id, row in zip(wanted, rows)
                if row is not None and (row["attributes"] or {}).get(ID) == doc_id]

    async def aget_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        return await asyncio.to_thread(self.get_by_ids, ids)

    def _search(self, vector: Sequence[float], k: int, filter: Mapping | None, params: dict,
                with_vectors: bool = False) -> list[tuple[dict, float]]:
        """Rows (``col.get`` dicts) and distances of the ``k`` nearest matching documents."""
        col = self._collection
        if col is None:
            return []
        res = col.search(np.asarray(vector, dtype=np.float32), k, filter=filter, **params)
        found = res.ids[0] >= 0
        rows = col.get(res.ids[0][found], include_vectors=with_vectors)
        # a row deleted between the search and the read is left out
        return [(row, float(d)) for row, d in zip(rows, res.distances[0][found].tolist()) if row is not None]

    def similarity_search_with_score(self, query: str, k: int = 4, *, filter: Mapping | None = None,
                                     **search_params: Any) -> list[tuple[Document, float]]:
        """The ``k`` nearest documents and their distances (smaller is better), nearest first."""
        return self.similarity_search_by_vector_with_score(self._embedding.embed_query(query), k, filter=filter,
                                                           **search_params)

    async def asimilarity_search_with_score(self, query: str, k: int = 4, *, filter: Mapping | None = None,
                                            **search_params: Any) -> list[tuple[Document, float]]:
        vector = await self._embedding.aembed_query(query)
        return await asyncio.to_thread(self.similarity_search_by_vector_with_score, vector, k, filter=filter,
                                       **search_params)

    def similarity_search_by_vector_with_score(self, embedding: Sequence[float], k: int = 4, *,
                                               filter: Mapping | None = None,
                                               **search_params: Any) -> list[tuple[Document, float]]:
        return [(_document(row), d) for row, d in self._search(embedding, k, filter, search_params)]

    def similarity_search(self, query: str, k: int = 4, *, filter: Mapping | None = None,
                          **search_params: Any) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score(query, k, filter=filter, **search_params)]

    async def asimilarity_search(self, query: str, k: int = 4, *, filter: Mapping | None = None,
                                 **search_params: Any) -> list[Document]:
        found = await self.asimilarity_search_with_score(query, k, filter=filter, **search_params)
        return [doc for doc, _ in found]

    def similarity_search_by_vector(self, embedding: list[float], k: int = 4, *, filter: Mapping | None = None,
                                    **search_params: Any) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_by_vector_with_score(embedding, k, filter=filter,
                                                                              **search_params)]

    async def asimilarity_search_by_vector(self, embedding: list[float], k: int = 4, *,
                                           filter: Mapping | None = None, **search_params: Any) -> list[Document]:
        return await asyncio.to_thread(self.similarity_search_by_vector, embedding, k, filter=filter,
                                       **search_params)

    def max_marginal_relevance_search_by_vector(self, embedding: list[float], k: int = 4, fetch_k: int = 20,
                                                lambda_mult: float = 0.5, *, filter: Mapping | None = None,
                                                **search_params: Any) -> list[Document]:
        """``k`` documents chosen by MMR among the ``fetch_k`` nearest (``lambda_mult`` 1: nearest, 0: diverse)."""
        found = self._search(embedding, max(k, fetch_k), filter, search_params, with_vectors=True)
        if not found:
            return []
        vectors = np.stack([row["vector"] for row, _ in found])
        picked = maximal_marginal_relevance(np.asarray(embedding, dtype=np.float32), vectors,
                                            lambda_mult=lambda_mult, k=k)
        return [_document(found[i][0]) for i in picked]

    def max_marginal_relevance_search(self, query: str, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5,
                                      *, filter: Mapping | None = None, **search_params: Any) -> list[Document]:
        return self.max_marginal_relevance_search_by_vector(self._embedding.embed_query(query), k, fetch_k,
                                                            lambda_mult, filter=filter, **search_params)

    async def amax_marginal_relevance_search(self, query: str, k: int = 4, fetch_k: int = 20,
                                             lambda_mult: float = 0.5, *, filter: Mapping | None = None,
                                             **search_params: Any) -> list[Document]:
        vector = await self._embedding.aembed_query(query)
        return await asyncio.to_thread(self.max_marginal_relevance_search_by_vector, vector, k, fetch_k,
                                       lambda_mult, filter=filter, **search_params)

    async def amax_marginal_relevance_search_by_vector(self, embedding: list[float], k: int = 4, fetch_k: int = 20,
                                                       lambda_mult: float = 0.5, *, filter: Mapping | None = None,
                                                       **search_params: Any) -> list[Document]:
        return await asyncio.to_thread(self.max_marginal_relevance_search_by_vector, embedding, k, fetch_k,
                                       lambda_mult, filter=filter, **search_params)

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        col = self._collection
        metric = col.metric if col is not None else (self._metric or "cosine")
        if metric == "cosine":
            return _cosine_relevance
        if metric == "l2":
            return _l2_relevance
        return self._max_inner_product_relevance_score_fn

    # ---------------------------------------------------------------- builders
    @classmethod
    def from_texts(cls, texts: list[str], embedding: Embeddings, metadatas: list[dict] | None = None, *,
                   ids: list[str | None] | None = None, uri: str | os.PathLike | None = None,
                   collection_name: str = "langchain", **kwargs: Any) -> TierstoreVectorStore:
        """A store at ``uri`` (or ``database=``) holding ``texts``; ``kwargs`` as the constructor's."""
        store = cls(embedding, uri, collection_name, **kwargs)
        try:
            store.add_texts(texts, metadatas, ids=ids)
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    async def afrom_texts(cls, texts: list[str], embedding: Embeddings, metadatas: list[dict] | None = None, *,
                          ids: list[str | None] | None = None, uri: str | os.PathLike | None = None,
                          collection_name: str = "langchain", **kwargs: Any) -> TierstoreVectorStore:
        store = await asyncio.to_thread(cls, embedding, uri, collection_name, **kwargs)
        try:
            await store.aadd_texts(texts, metadatas, ids=ids)
        except BaseException:
            await asyncio.to_thread(store.close)
            raise
        return store


def _document(row: Mapping[str, Any]) -> Document:
    attributes = row["attributes"] or {}
    return Document(id=attributes.get(ID, str(row["id"])), page_content=attributes.get(TEXT, ""),
                    metadata=dict(attributes.get(METADATA) or {}))


def _cosine_relevance(distance: float) -> float:
    return min(1.0, max(0.0, 1.0 - distance / 2.0))  # (1 + cos) / 2; clamped against rounding


def _l2_relevance(distance: float) -> float:
    return 1.0 - math.sqrt(max(distance, 0.0)) / math.sqrt(2.0)  # the distance is squared L2
