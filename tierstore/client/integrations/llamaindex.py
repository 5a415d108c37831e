"""LlamaIndex vector store over a tierstore collection: :class:`TierstoreVectorStore`.

::

    from llama_index.core import StorageContext, VectorStoreIndex
    from tierstore.client.integrations.llamaindex import TierstoreVectorStore

    store = TierstoreVectorStore(uri="./data", collection_name="docs")
    index = VectorStoreIndex.from_documents(
        documents, storage_context=StorageContext.from_defaults(vector_store=store), embed_model=embed_model)
    index.as_retriever(similarity_top_k=4, filters=MetadataFilters(filters=[
        MetadataFilter(key="page", value=10, operator=FilterOperator.LT)])).retrieve("query")

    store.add(nodes)                                  # nodes carry their embeddings
    store.query(VectorStoreQuery(query_embedding=v, similarity_top_k=4, filters=filters))
    store.get_nodes(node_ids); store.delete_nodes(node_ids); store.delete(ref_doc_id)
    store.clear(); store.close()

Async twins (``async_add``, ``aquery``, ``adelete``, ``adelete_nodes``, ``aget_nodes``,
``aclear``) run the storage calls in a worker thread.

**Rows.** A node is one row of the collection (created on the first add, when the nodes'
embeddings give the dimension; ``metric`` ``"cosine"`` unless told). Node ids become
int64 ids through a 63-bit xxh3 hash of their UTF-8 bytes (as in the LangChain store);
adding a node id again replaces it, and reads check the stored id. The row's attributes
keep the whole node (``_li_node``: LlamaIndex's ``node_to_metadata_dict`` serialisation,
text, metadata and relationships included, embedding left out) and its id (``_li_id``),
stored but not filterable, plus two filterable keywords that tierstore maintains,
``li_ref_doc_id`` (the source document, for :meth:`~TierstoreVectorStore.delete`) and
``li_node_id``, and a copy of every node metadata field in the schema.

**Filters.** ``MetadataFilters`` become tierstore filters (``docs/filters.md``):
``EQ NE GT GTE LT LTE IN NIN`` map to ``$eq $ne $gt $gte $lt $lte $in $nin``; on a
``keywords`` field (a list of str) ``CONTAINS`` is ``$eq`` (holds the tag), ``ANY`` is
``$in`` and ``ALL`` an ``$and`` of ``$eq``; conditions ``AND`` / ``OR`` nest. ``NOT``,
``TEXT_MATCH``, ``TEXT_MATCH_INSENSITIVE`` and ``IS_EMPTY`` raise ``FilterError``. Keys
``doc_id``, ``ref_doc_id`` and ``document_id`` (LlamaIndex's names for the source document)
filter ``li_ref_doc_id`` unless the schema has a field of that name. A query's ``doc_ids``
and ``node_ids`` restrict it to those documents / nodes (an empty list restricts nothing:
``VectorStoreIndex`` passes ``node_ids=[]`` for stores that keep the text). The filterable fields are fixed
when the collection is created, as in the LangChain store: ``metadata_schema={"page": "int",
...}`` declares them (types ``int float keyword keywords bool``), otherwise the first batch
decides (str -> keyword, int -> int, float -> float, bool -> bool, list of str ->
keywords; ``_`` names, other values and conflicts stay unfiltered). A filter on a field
outside the schema raises ``FilterError``.

**Similarities** (higher is better): ``cos`` for ``"cosine"``, the inner product for
``"ip"``, ``1 / (1 + squared L2)`` for ``"l2"``. Only ``VectorStoreQueryMode.DEFAULT``
is supported. ``query(..., **search_params)`` passes tierstore's search parameters
(``nprobe``, ``rerank``, ``prune_ratio``).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..._optional import require
from ...errors import ConfigError, FilterError, InvalidArgument, InvalidType
from .._names import check_name
from ..collection import Collection
from ..database import Database, connect
from ._common import (StoreLifecycle, check_schema, check_store_args, filterable_fields, infer_schema, int_ids,
                      no_options, string_id_to_int)

require("llama_index.core", "llamaindex", "tierstore's LlamaIndex integration")

from llama_index.core.bridge.pydantic import PrivateAttr  # noqa: E402
from llama_index.core.schema import BaseNode  # noqa: E402
from llama_index.core.vector_stores.types import (BasePydanticVectorStore, FilterCondition,  # noqa: E402
                                                  FilterOperator, MetadataFilter, MetadataFilters,
                                                  VectorStoreQuery, VectorStoreQueryMode,
                                                  VectorStoreQueryResult)
from llama_index.core.vector_stores.utils import metadata_dict_to_node, node_to_metadata_dict  # noqa: E402

__all__ = ["TierstoreVectorStore", "infer_schema", "string_id_to_int", "to_tierstore_filter"]

NODE, ID = "_li_node", "_li_id"
REF_DOC, NODE_ID = "li_ref_doc_id", "li_node_id"
_RESERVED = {REF_DOC: "keyword", NODE_ID: "keyword"}
_DOC_KEYS = ("doc_id", "ref_doc_id", "document_id")
_SIMPLE_OPS = {FilterOperator.EQ: "$eq", FilterOperator.NE: "$ne", FilterOperator.GT: "$gt",
               FilterOperator.GTE: "$gte", FilterOperator.LT: "$lt", FilterOperator.LTE: "$lte",
               FilterOperator.IN: "$in", FilterOperator.NIN: "$nin", FilterOperator.CONTAINS: "$eq",
               FilterOperator.ANY: "$in"}


# ------------------------------------------------------------------ filters
def to_tierstore_filter(filters: MetadataFilters | None, schema: Mapping[str, str] | None = None) -> dict | None:
    """A tierstore filter dict for LlamaIndex ``filters`` (``None``: no filter); see the module docstring.

    ``schema`` (the collection's attributes) decides whether ``doc_id`` / ``ref_doc_id`` /
    ``document_id`` name a metadata field or the node's source document.
    """
    if filters is None:
        return None
    if not isinstance(filters, MetadataFilters):
        raise InvalidType(f"filters must be llama_index MetadataFilters, got {type(filters).__name__}")
    return _group(filters, schema or {}, "filters")


def _group(filters: MetadataFilters, schema: Mapping[str, str], path: str) -> dict | None:
    condition = filters.condition or FilterCondition.AND
    if condition not in (FilterCondition.AND, FilterCondition.OR):
        raise FilterError(f"{path}: condition {_name(condition)} is not supported by tierstore (use AND / OR)")
    parts = []
    for i, item in enumerate(filters.filters):
        sub = f"{path}[{i}]"
        part = _group(item, schema, sub) if isinstance(item, MetadataFilters) else _leaf(item, schema, sub)
        if part is not None:
            parts.append(part)
    if not parts:
        return None  # an empty group: no constraint
    if len(parts) == 1:
        return parts[0]
    return {"$and" if condition == FilterCondition.AND else "$or": parts}


def _leaf(item: MetadataFilter, schema: Mapping[str, str], path: str) -> dict:
    if not isinstance(item, MetadataFilter):
        raise InvalidType(f"{path}: expected a MetadataFilter or MetadataFilters, got {type(item).__name__}")
    key = item.key
    if key in _DOC_KEYS and key not in schema:
        key = REF_DOC
    op, value = item.operator, item.value
    if op in _SIMPLE_OPS:
        return {key: {_SIMPLE_OPS[op]: value}}
    if op == FilterOperator.ALL:
        values = value if isinstance(value, list) else [value]
        if not values:
            raise FilterError(f"{path}: operator ALL needs a non-empty list")
        return {"$and": [{key: {"$eq": v}} for v in values]}
    raise FilterError(f"{path}: operator {_name(op)} on {item.key!r} is not supported by tierstore (supported: "
                      "EQ NE GT GTE LT LTE IN NIN, and CONTAINS ANY ALL on list fields)")


def _name(member: Any) -> str:
    return getattr(member, "name", str(member))


# -------------------------------------------------------------------- store
class TierstoreVectorStore(StoreLifecycle, BasePydanticVectorStore):
    """A LlamaIndex vector store kept in a tierstore collection; see the module docstring.

    Give ``uri`` (a directory or ``s3://bucket/prefix``; ``connect_options`` go to
    :func:`tierstore.connect`) or ``database`` (an open
    :class:`~tierstore.client.database.Database`, which :meth:`close` leaves open).
    ``metric`` is ``"cosine"`` (default), ``"l2"`` or ``"ip"``.
    """

    stores_text: bool = True
    flat_metadata: bool = False
    collection_name: str = "llamaindex"
    batch_size: int = 1_000

    _metric: str | None = PrivateAttr(default=None)
    _declared: dict | None = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default=None)
    _owns_db: bool = PrivateAttr(default=True)
    _db: Any = PrivateAttr(default=None)
    _collection: Any = PrivateAttr(default=None)

    def __init__(self, uri: str | os.PathLike | None = None, collection_name: str = "llamaindex", *,
                 metric: str | None = None, metadata_schema: Mapping[str, str] | None = None,
                 database: Database | None = None, connect_options: Mapping[str, Any] | None = None,
                 batch_size: int = 1_000) -> None:
        check_store_args(uri, database, connect_options, metric, batch_size)
        declared = None if metadata_schema is None else check_schema(metadata_schema, _RESERVED)
        super().__init__(collection_name=check_name(collection_name), batch_size=batch_size)
        self._metric = metric
        self._declared = declared
        self._lock = threading.Lock()
        self._owns_db = database is None
        self._db = connect(uri, **dict(connect_options or {})) if database is None else database
        try:
            self._collection = self._open_existing()
        except BaseException:
            self.close()
            raise

    @classmethod
    def class_name(cls) -> str:
        return "TierstoreVectorStore"

    def _open_existing(self) -> Collection | None:
        col = self._existing_collection()
        if col is None:
            return None
        stored = col.settings["attributes"]
        if any(stored.get(name) != kind for name, kind in _RESERVED.items()):
            raise ConfigError(f"collection {self.collection_name!r} was not made by the LlamaIndex store "
                              f"(its schema {stored} lacks {_RESERVED})")
        if self._declared is not None and stored != {**self._declared, **_RESERVED}:
            user = {k: v for k, v in stored.items() if k not in _RESERVED}
            raise ConfigError(f"collection {self.collection_name!r} exists with metadata schema {user}, "
                              f"not {self._declared}")
        return col

    # ----------------------------------------------------------------- handles
    @property
    def client(self) -> Database:
        """The tierstore database."""
        return self._db

    def _schema(self) -> dict[str, str]:
        col = self._collection
        return dict(col.settings["attributes"]) if col is not None else {}

    # ------------------------------------------------------------------ writes
    def _collection_for(self, dim: int, metadatas: list[dict]) -> Collection:
        with self._lock:
            if self._collection is None:
                schema = self._declared if self._declared is not None else infer_schema(metadatas, _RESERVED)
                self._collection = self._db.create_collection(self.collection_name, dim, self._metric or "cosine",
                                                              attributes={**schema, **_RESERVED}, exist_ok=True)
            return self._collection

    def _write(self, nodes: Sequence[BaseNode]) -> None:
        vectors = []
        for node in nodes:
            if node.embedding is None:
                raise InvalidArgument(f"node {node.node_id!r} has no embedding; embed nodes before adding them "
                                      "(VectorStoreIndex does this with its embed_model)")
            vectors.append(node.embedding)
        arr = np.asarray(vectors, dtype=np.float32)
        if arr.ndim != 2:
            raise InvalidArgument(f"node embeddings must all have one length, got shape {arr.shape}")
        metadatas = [dict(node.metadata or {}) for node in nodes]
        col = self._collection_for(arr.shape[1], metadatas)
        schema, strict = col.settings["attributes"], self._declared is not None
        last = {node.node_id: i for i, node in enumerate(nodes)}
        keep = sorted(last.values())
        rows = []
        for i in keep:
            node = nodes[i]
            stored = node_to_metadata_dict(node, remove_text=False, flat_metadata=self.flat_metadata)
            row: dict[str, Any] = {NODE: {"_node_content": stored["_node_content"],
                                          "_node_type": stored["_node_type"]},
                                   ID: node.node_id, NODE_ID: node.node_id}
            if node.ref_doc_id is not None:
                row[REF_DOC] = node.ref_doc_id
            row.update(filterable_fields(metadatas[i], schema, strict, _RESERVED))
            rows.append(row)
        col.add(np.array([string_id_to_int(nodes[i].node_id, "node ids") for i in keep], dtype=np.int64), arr[keep], rows)

    def add(self, nodes: Sequence[BaseNode], **add_kwargs: Any) -> list[str]:
        """Upsert ``nodes`` (with their embeddings); returns their node ids."""
        no_options(add_kwargs)
        nodes = list(nodes)
        for node in nodes:
            if not isinstance(node, BaseNode):
                raise InvalidType(f"nodes must be llama_index nodes, got {type(node).__name__}")
        for start in range(0, len(nodes), self.batch_size):
            self._write(nodes[start:start + self.batch_size])
        return [node.node_id for node in nodes]

    async def async_add(self, nodes: Sequence[BaseNode], **add_kwargs: Any) -> list[str]:
        return await asyncio.to_thread(self.add, nodes, **add_kwargs)

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node of the source document ``ref_doc_id``."""
        no_options(delete_kwargs)
        if not isinstance(ref_doc_id, str):
            raise InvalidType(f"ref_doc_id must be a str, got {type(ref_doc_id).__name__}")
        self._delete_matching({REF_DOC: {"$eq": ref_doc_id}})

    async def adelete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        await asyncio.to_thread(self.delete, ref_doc_id, **delete_kwargs)

    def delete_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None,
                     **delete_kwargs: Any) -> None:
        """Delete nodes by id and/or by filter (both: the nodes among ``node_ids`` that match)."""
        no_options(delete_kwargs)
        if node_ids is None and filters is None:
            raise InvalidArgument("give node_ids= and/or filters=; clear() deletes every node")
        col = self._collection
        if col is None or (node_ids is not None and len(node_ids) == 0):
            return
        if filters is None:
            ids = int_ids(node_ids)
            if ids.size:
                col.delete(ids)
            return
        self._delete_matching(self._where(filters, node_ids=node_ids))

    async def adelete_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None,
                            **delete_kwargs: Any) -> None:
        await asyncio.to_thread(self.delete_nodes, node_ids, filters, **delete_kwargs)

    def clear(self) -> None:
        """Delete every node (drops the collection; the next add creates it again)."""
        with self._lock:
            if self._collection is not None:
                self._db.drop_collection(self.collection_name)
                self._collection = None

    async def aclear(self) -> None:
        await asyncio.to_thread(self.clear)

    def _matching_ids(self, where: dict | None) -> np.ndarray:
        """The ids of every row matching ``where`` (a filtered search returns min(k, matches) rows)."""
        col = self._collection
        if col is None:
            return np.empty(0, np.int64)
        count = col.count()
        if count == 0:
            return np.empty(0, np.int64)
        res = col.search(np.ones(col.dim, np.float32), count, filter=where if where is not None else {})
        ids = res.ids[0]
        return ids[ids >= 0]

    def _delete_matching(self, where: dict) -> None:
        col = self._collection
        if col is None:
            return
        ids = self._matching_ids(where)
        if ids.size:
            col.delete(ids)

    # ------------------------------------------------------------------- reads
    def _where(self, filters: MetadataFilters | None, *, node_ids: Sequence[str] | None = None,
               doc_ids: Sequence[str] | None = None) -> dict | None:
        parts = []
        translated = to_tierstore_filter(filters, self._schema())
        if translated is not None:
            parts.append(translated)
        for field, values in ((NODE_ID, node_ids), (REF_DOC, doc_ids)):
            if values:  # None or empty: no restriction (VectorStoreIndex passes [] when it keeps no node list)
                if isinstance(values, str):
                    raise InvalidType(f"expected a list of str, got the str {values!r:.60}")
                parts.append({field: {"$in": list(values)}})
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else {"$and": parts}

    def get_nodes(self, node_ids: list[str] | None = None,
                  filters: MetadataFilters | None = None) -> list[BaseNode]:
        """Stored nodes by id (in that order, missing ones left out) and/or filter (no args: every node)."""
        col = self._collection
        if col is None or (node_ids is not None and len(node_ids) == 0):
            return []
        if filters is None and node_ids is not None:
            wanted = list(dict.fromkeys(node_ids))
            if not wanted:
                return []
            rows = col.get(int_ids(wanted), include_vectors=False)
            return [_node(row) for node_id, row in zip(wanted, rows)
                    if row is not None and (row["attributes"] or {}).get(ID) == node_id]
        ids = self._matching_ids(self._where(filters, node_ids=node_ids))
        if not ids.size:
            return []
        return [_node(row) for row in col.get(ids, include_vectors=False) if row is not None]

    async def aget_nodes(self, node_ids: list[str] | None = None,
                         filters: MetadataFilters | None = None) -> list[BaseNode]:
        return await asyncio.to_thread(self.get_nodes, node_ids, filters)

    def query(self, query: VectorStoreQuery, **search_params: Any) -> VectorStoreQueryResult:
        """The ``similarity_top_k`` nearest nodes matching the query's filters, nearest first."""
        if query.mode != VectorStoreQueryMode.DEFAULT:
            raise InvalidArgument(f"query mode {query.mode!s} is not supported; tierstore runs DEFAULT "
                                  "(dense) queries")
        if query.query_embedding is None:
            raise InvalidArgument("the query has no query_embedding")
        col = self._collection
        if col is None:
            return VectorStoreQueryResult(nodes=[], similarities=[], ids=[])
        where = self._where(query.filters, node_ids=query.node_ids, doc_ids=query.doc_ids)
        res = col.search(np.asarray(query.query_embedding, dtype=np.float32), query.similarity_top_k,
                         filter=where, **search_params)
        found = res.ids[0] >= 0
        rows = col.get(res.ids[0][found], include_vectors=False)
        nodes, similarities, ids = [], [], []
        for row, distance in zip(rows, res.distances[0][found].tolist()):
            if row is None:  # deleted between the search and the read
                continue
            node = _node(row)
            nodes.append(node)
            similarities.append(_similarity(col.metric, float(distance)))
            ids.append(node.node_id)
        return VectorStoreQueryResult(nodes=nodes, similarities=similarities, ids=ids)

    async def aquery(self, query: VectorStoreQuery, **search_params: Any) -> VectorStoreQueryResult:
        return await asyncio.to_thread(self.query, query, **search_params)


def _node(row: Mapping[str, Any]) -> BaseNode:
    attributes = row["attributes"] or {}
    return metadata_dict_to_node(dict(attributes[NODE]))


def _similarity(metric: str, distance: float) -> float:
    if metric == "cosine":
        return 1.0 - distance
    if metric == "ip":
        return -distance
    return 1.0 / (1.0 + max(distance, 0.0))  # squared L2
