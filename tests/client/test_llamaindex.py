"""TierstoreVectorStore (LlamaIndex): round trips, filters against brute force, deletes, VectorStoreIndex, reopening."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest
import xxhash

pytest.importorskip("llama_index.core")

from llama_index.core import Document, StorageContext, VectorStoreIndex  # noqa: E402
from llama_index.core.base.embeddings.base import BaseEmbedding  # noqa: E402
from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode  # noqa: E402
from llama_index.core.vector_stores.types import (FilterCondition, FilterOperator, MetadataFilter,  # noqa: E402
                                                  MetadataFilters, VectorStoreQuery, VectorStoreQueryMode)

from tierstore.client.integrations.llamaindex import (REF_DOC, TierstoreVectorStore,  # noqa: E402
                                                      string_id_to_int, to_tierstore_filter)
from tierstore.client.database import Database  # noqa: E402
from tierstore.errors import ConfigError, FilterError, InvalidArgument  # noqa: E402

DIM = 16


def corpus(n: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    nodes = [TextNode(id_=f"node-{i}", text=f"text of node {i}", embedding=x[i].tolist(),
                      metadata={"section": f"s{i % 5}", "page": i, "score": float(i % 10) / 10,
                                "tags": [f"t{i % 3}", f"u{i % 4}"]},
                      relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=f"doc-{i % 6}")})
             for i in range(n)]
    return x, nodes


def cosine_order(x: np.ndarray, q: np.ndarray, mask: np.ndarray) -> list[int]:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn @ (q / np.linalg.norm(q))
    order = np.argsort(-sims, kind="stable")
    return [int(i) for i in order if mask[i]]


@pytest.fixture()
def store(tmp_path):
    s = TierstoreVectorStore(uri=tmp_path, collection_name="li")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture()
def filled(store):
    x, nodes = corpus()
    assert store.add(nodes) == [n.node_id for n in nodes]
    return store, x, nodes


def ids_of(result) -> list[int]:
    return [int(i.split("-")[1]) for i in result.ids]


# ---------------------------------------------------------------- round trip
def test_round_trip_query_get_delete(filled):
    store, x, nodes = filled
    assert store.collection.count() == len(nodes)
    assert isinstance(store.client, Database)
    q = x[7] + 0.01
    res = store.query(VectorStoreQuery(query_embedding=q.tolist(), similarity_top_k=5))
    assert ids_of(res) == cosine_order(x, q, np.ones(len(x), bool))[:5]
    assert res.similarities == sorted(res.similarities, reverse=True)
    assert res.similarities[0] == pytest.approx(float(x[7] @ q / np.linalg.norm(x[7]) / np.linalg.norm(q)), abs=1e-4)
    top = res.nodes[0]
    assert top.node_id == "node-7" and top.get_content() == "text of node 7"
    assert top.metadata == nodes[7].metadata and top.ref_doc_id == "doc-1"

    got = store.get_nodes(["node-3", "missing", "node-1", "node-3"])
    assert [n.node_id for n in got] == ["node-3", "node-1"]
    assert got[0].text == "text of node 3" and got[0].metadata["tags"] == ["t0", "u3"]

    store.delete_nodes(["node-3", "node-1"])
    assert store.collection.count() == len(nodes) - 2
    assert store.get_nodes(["node-3", "node-1"]) == []
    res = store.query(VectorStoreQuery(query_embedding=x[3].tolist(), similarity_top_k=len(nodes)))
    assert "node-3" not in res.ids and len(res.ids) == len(nodes) - 2


def test_upsert_replaces_and_last_in_batch_wins(store):
    x, nodes = corpus(5)
    store.add(nodes)
    again = TextNode(id_="node-2", text="replaced", embedding=x[4].tolist(), metadata={"page": 99})
    dup = TextNode(id_="node-2", text="replaced twice", embedding=x[4].tolist(), metadata={"page": 100})
    store.add([again, dup])
    assert store.collection.count() == 5
    (node,) = store.get_nodes(["node-2"])
    assert node.text == "replaced twice" and node.metadata == {"page": 100}
    assert string_id_to_int("node-2") == xxhash.xxh3_64_intdigest(b"node-2") & (2**63 - 1)


def test_node_without_embedding_is_refused(store):
    with pytest.raises(InvalidArgument, match="no embedding"):
        store.add([TextNode(id_="a", text="no vector")])


def test_empty_store_answers_empty(store):
    res = store.query(VectorStoreQuery(query_embedding=[1.0] * DIM, similarity_top_k=3))
    assert res.nodes == [] and res.ids == [] and res.similarities == []
    assert store.get_nodes(["a"]) == []
    store.delete("doc-0")
    store.delete_nodes(["a"])
    store.clear()


# -------------------------------------------------------------------- filters
LEAVES = [
    (MetadataFilter(key="section", value="s2"), lambda m: m["section"] == "s2"),
    (MetadataFilter(key="section", value="s2", operator=FilterOperator.NE), lambda m: m["section"] != "s2"),
    (MetadataFilter(key="page", value=20, operator=FilterOperator.GT), lambda m: m["page"] > 20),
    (MetadataFilter(key="page", value=20, operator=FilterOperator.GTE), lambda m: m["page"] >= 20),
    (MetadataFilter(key="page", value=20, operator=FilterOperator.LT), lambda m: m["page"] < 20),
    (MetadataFilter(key="page", value=20, operator=FilterOperator.LTE), lambda m: m["page"] <= 20),
    (MetadataFilter(key="score", value=0.45, operator=FilterOperator.LT), lambda m: m["score"] < 0.45),
    (MetadataFilter(key="score", value=0.5, operator=FilterOperator.EQ), lambda m: m["score"] == 0.5),
    (MetadataFilter(key="section", value=["s1", "s3"], operator=FilterOperator.IN),
     lambda m: m["section"] in ("s1", "s3")),
    (MetadataFilter(key="section", value=["s1", "s3"], operator=FilterOperator.NIN),
     lambda m: m["section"] not in ("s1", "s3")),
    (MetadataFilter(key="page", value=[1, 2, 3, 50], operator=FilterOperator.IN), lambda m: m["page"] in (1, 2, 3, 50)),
    (MetadataFilter(key="page", value=[1, 2, 3, 50], operator=FilterOperator.NIN),
     lambda m: m["page"] not in (1, 2, 3, 50)),
    (MetadataFilter(key="tags", value="t1", operator=FilterOperator.CONTAINS), lambda m: "t1" in m["tags"]),
    (MetadataFilter(key="tags", value=["t1", "u0"], operator=FilterOperator.ANY),
     lambda m: bool({"t1", "u0"} & set(m["tags"]))),
    (MetadataFilter(key="tags", value=["t1", "u0"], operator=FilterOperator.ALL),
     lambda m: {"t1", "u0"} <= set(m["tags"])),
    (MetadataFilter(key="tags", value="t2"), lambda m: "t2" in m["tags"]),
]


def check_filter(store, x, nodes, filters, predicate, k=None):
    mask = np.array([predicate(n.metadata) for n in nodes])
    q = x[11] - x[4]
    k = k or len(nodes)
    res = store.query(VectorStoreQuery(query_embedding=q.tolist(), similarity_top_k=k, filters=filters))
    assert ids_of(res) == cosine_order(x, q, mask)[:k]
    got = store.get_nodes(filters=filters)
    assert sorted(n.node_id for n in got) == sorted(f"node-{i}" for i in np.flatnonzero(mask))


@pytest.mark.parametrize("leaf,predicate", LEAVES, ids=[f"{f.key}-{f.operator.name}" for f, _ in LEAVES])
def test_each_operator_against_brute_force(filled, leaf, predicate):
    store, x, nodes = filled
    check_filter(store, x, nodes, MetadataFilters(filters=[leaf]), predicate)
    check_filter(store, x, nodes, MetadataFilters(filters=[leaf]), predicate, k=4)


def test_and_or_nesting(filled):
    store, x, nodes = filled
    inner = MetadataFilters(filters=[MetadataFilter(key="section", value="s1"),
                                     MetadataFilter(key="tags", value="u2", operator=FilterOperator.CONTAINS)],
                            condition=FilterCondition.OR)
    nested = MetadataFilters(filters=[MetadataFilter(key="page", value=10, operator=FilterOperator.GTE), inner,
                                      MetadataFilters(filters=[MetadataFilter(key="score", value=0.9,
                                                                              operator=FilterOperator.LT)])],
                             condition=FilterCondition.AND)
    check_filter(store, x, nodes, nested,
                 lambda m: m["page"] >= 10 and (m["section"] == "s1" or "u2" in m["tags"]) and m["score"] < 0.9)
    either = MetadataFilters(filters=[MetadataFilters(filters=[MetadataFilter(key="page", value=5,
                                                                              operator=FilterOperator.LT),
                                                               MetadataFilter(key="section", value="s0")]),
                                      MetadataFilter(key="page", value=[40, 41, 42], operator=FilterOperator.IN)],
                             condition=FilterCondition.OR)
    check_filter(store, x, nodes, either, lambda m: (m["page"] < 5 and m["section"] == "s0") or m["page"] in (40, 41, 42))
    assert to_tierstore_filter(either) == {"$or": [{"$and": [{"page": {"$lt": 5}}, {"section": {"$eq": "s0"}}]},
                                                   {"page": {"$in": [40, 41, 42]}}]}
    assert to_tierstore_filter(MetadataFilters(filters=[])) is None


@pytest.mark.parametrize("bad", [
    MetadataFilters(filters=[MetadataFilter(key="section", value="s", operator=FilterOperator.TEXT_MATCH)]),
    MetadataFilters(filters=[MetadataFilter(key="section", value=None, operator=FilterOperator.IS_EMPTY)]),
    MetadataFilters(filters=[MetadataFilter(key="section", value="s1")], condition=FilterCondition.NOT),
    MetadataFilters(filters=[MetadataFilter(key="unknown", value="s1")]),
])
def test_unsupported_filters_raise(filled, bad):
    store, x, _ = filled
    with pytest.raises(FilterError):
        store.query(VectorStoreQuery(query_embedding=x[0].tolist(), similarity_top_k=3, filters=bad))


def test_doc_ids_node_ids_and_doc_id_key(filled):
    store, x, nodes = filled
    q = x[0].tolist()
    res = store.query(VectorStoreQuery(query_embedding=q, similarity_top_k=100, doc_ids=["doc-2", "doc-5"]))
    assert sorted(ids_of(res)) == [i for i in range(len(nodes)) if i % 6 in (2, 5)]
    res = store.query(VectorStoreQuery(query_embedding=q, similarity_top_k=100, node_ids=["node-4", "node-9", "nope"]))
    assert sorted(ids_of(res)) == [4, 9]
    by_key = MetadataFilters(filters=[MetadataFilter(key="doc_id", value="doc-3")])
    res = store.query(VectorStoreQuery(query_embedding=q, similarity_top_k=100, filters=by_key))
    assert sorted(ids_of(res)) == [i for i in range(len(nodes)) if i % 6 == 3]
    with pytest.raises(InvalidArgument, match="mode"):
        store.query(VectorStoreQuery(query_embedding=q, similarity_top_k=3, mode=VectorStoreQueryMode.MMR))


# -------------------------------------------------------------------- deletes
def test_delete_ref_doc_removes_exactly_its_nodes(filled):
    store, x, nodes = filled
    store.delete("doc-4")
    left = {n.node_id for n in store.get_nodes()}
    assert left == {n.node_id for n in nodes if n.ref_doc_id != "doc-4"}
    assert store.collection.count() == len(left)
    store.delete("doc-4")  # nothing left to delete
    store.delete("no-such-doc")
    assert store.collection.count() == len(left)


def test_delete_nodes_by_filter_and_clear(filled):
    store, x, nodes = filled
    store.delete_nodes(filters=MetadataFilters(filters=[MetadataFilter(key="page", value=10,
                                                                       operator=FilterOperator.LT)]))
    assert sorted(int(n.node_id.split("-")[1]) for n in store.get_nodes()) == list(range(10, len(nodes)))
    # both: only the listed nodes that match
    store.delete_nodes(["node-10", "node-11", "node-12"],
                       filters=MetadataFilters(filters=[MetadataFilter(key="section", value="s1")]))
    assert {n.node_id for n in store.get_nodes(["node-10", "node-11", "node-12"])} == {"node-10", "node-12"}
    with pytest.raises(InvalidArgument):
        store.delete_nodes()
    store.clear()
    assert store.collection is None and store.get_nodes() == []
    store.add(nodes[:3])
    assert store.collection.count() == 3


# ------------------------------------------------------------ schema / reopen
def test_declared_schema_and_reopen(tmp_path):
    x, nodes = corpus(20)
    schema = {"section": "keyword", "page": "int"}
    with TierstoreVectorStore(uri=tmp_path, collection_name="r", metadata_schema=schema) as store:
        store.add(nodes)
        assert store.collection.settings["attributes"] == {**schema, REF_DOC: "keyword", "li_node_id": "keyword"}
        with pytest.raises(FilterError, match="score"):
            store.query(VectorStoreQuery(query_embedding=x[0].tolist(), similarity_top_k=3,
                                         filters=MetadataFilters(filters=[MetadataFilter(key="score", value=0.1)])))
    with TierstoreVectorStore(uri=tmp_path, collection_name="r") as store:
        assert store.collection.count() == 20
        flt = MetadataFilters(filters=[MetadataFilter(key="page", value=5, operator=FilterOperator.LT)])
        res = store.query(VectorStoreQuery(query_embedding=x[3].tolist(), similarity_top_k=3, filters=flt))
        assert res.ids[0] == "node-3" and all(int(i.split("-")[1]) < 5 for i in res.ids)
        assert store.get_nodes(["node-7"])[0].text == "text of node 7"
        store.delete("doc-0")
        assert store.collection.count() == 20 - len([n for n in nodes if n.ref_doc_id == "doc-0"])
    with pytest.raises(ConfigError, match="metadata schema"):
        TierstoreVectorStore(uri=tmp_path, collection_name="r", metadata_schema={"page": "int"})
    with pytest.raises(ConfigError, match="metric"):
        TierstoreVectorStore(uri=tmp_path, collection_name="r", metric="l2")
    with pytest.raises(InvalidArgument, match="li_ref_doc_id"):
        TierstoreVectorStore(uri=tmp_path, collection_name="r2", metadata_schema={REF_DOC: "keyword"})


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_other_metrics_rank_by_similarity(tmp_path, metric):
    x, nodes = corpus(30)
    with TierstoreVectorStore(uri=tmp_path, collection_name="m", metric=metric) as store:
        store.add(nodes)
        q = x[5]
        res = store.query(VectorStoreQuery(query_embedding=q.tolist(), similarity_top_k=5))
        score = -((x - q) ** 2).sum(1) if metric == "l2" else x @ q
        assert ids_of(res) == [int(i) for i in np.argsort(-score, kind="stable")[:5]]
        assert res.similarities == sorted(res.similarities, reverse=True)
        if metric == "ip":
            assert res.similarities[0] == pytest.approx(float(score.max()), rel=1e-4)


def test_async_methods(filled):
    store, x, nodes = filled

    async def go():
        extra = TextNode(id_="extra", text="extra", embedding=(x[0] * 2).tolist(),
                         relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id="doc-x")},
                         metadata={"section": "s9", "page": 1000, "score": 0.0, "tags": ["t0"]})
        assert await store.async_add([extra]) == ["extra"]
        res = await store.aquery(VectorStoreQuery(query_embedding=x[0].tolist(), similarity_top_k=2))
        assert set(res.ids) == {"node-0", "extra"}
        assert [n.node_id for n in await store.aget_nodes(["extra"])] == ["extra"]
        await store.adelete("doc-x")
        await store.adelete_nodes(["node-0"])
        res = await store.aquery(VectorStoreQuery(query_embedding=x[0].tolist(), similarity_top_k=1))
        assert res.ids[0] not in ("extra", "node-0")
        await store.aclear()
        assert store.collection is None

    asyncio.run(go())


# ------------------------------------------------------------ VectorStoreIndex
class HashEmbedding(BaseEmbedding):
    """Bag of words: each word a fixed pseudo-random vector (seeded by its hash), summed."""

    dim: int = 32

    def _vec(self, text: str) -> list[float]:
        total = np.zeros(self.dim)
        for word in re.findall(r"[a-z]+", text.lower()):
            total += np.random.default_rng(xxhash.xxh64_intdigest(word.encode())).standard_normal(self.dim)
        return (total if total.any() else np.ones(self.dim)).tolist()

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vec(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._vec(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vec(text)


def test_vector_store_index(tmp_path):
    docs = [Document(text="apples and pears grow on trees", doc_id="fruit", metadata={"kind": "food", "year": 2020}),
            Document(text="rockets fly to the moon and mars", doc_id="space", metadata={"kind": "science", "year": 2022}),
            Document(text="violins and cellos play music", doc_id="music", metadata={"kind": "art", "year": 2021}),
            Document(text="bread and cheese for lunch", doc_id="lunch", metadata={"kind": "food", "year": 2023})]
    embed = HashEmbedding()
    store = TierstoreVectorStore(uri=tmp_path, collection_name="index")
    try:
        index = VectorStoreIndex.from_documents(docs, storage_context=StorageContext.from_defaults(vector_store=store),
                                                embed_model=embed)
        assert store.collection.count() == 4
        hits = index.as_retriever(similarity_top_k=1).retrieve("rockets moon")
        assert hits[0].node.ref_doc_id == "space" and "rockets" in hits[0].node.get_content()
        assert hits[0].score == pytest.approx(max(h.score for h in index.as_retriever(similarity_top_k=4)
                                                  .retrieve("rockets moon")))
        food = MetadataFilters(filters=[MetadataFilter(key="kind", value="food"),
                                        MetadataFilter(key="year", value=2021, operator=FilterOperator.GT)])
        hits = index.as_retriever(similarity_top_k=4, filters=food).retrieve("apples")
        assert [h.node.ref_doc_id for h in hits] == ["lunch"]
        index.delete_ref_doc("space")
        assert store.collection.count() == 3
        hits = index.as_retriever(similarity_top_k=4).retrieve("rockets moon")
        assert "space" not in {h.node.ref_doc_id for h in hits} and len(hits) == 3
        index.insert(Document(text="comets orbit the sun", doc_id="comet", metadata={"kind": "science", "year": 2024}))
        hits = index.as_retriever(similarity_top_k=1).retrieve("comets sun")
        assert hits[0].node.ref_doc_id == "comet"
    finally:
        store.close()
    # reopened, the index is rebuilt from the store alone
    with TierstoreVectorStore(uri=tmp_path, collection_name="index") as again:
        index = VectorStoreIndex.from_vector_store(again, embed_model=embed)
        hits = index.as_retriever(similarity_top_k=1).retrieve("violins music")
        assert hits[0].node.ref_doc_id == "music" and hits[0].node.metadata == {"kind": "art", "year": 2021}


def test_empty_id_lists(filled):
    store, x, nodes = filled
    res = store.query(VectorStoreQuery(query_embedding=x[0].tolist(), similarity_top_k=3, node_ids=[], doc_ids=[]))
    assert len(res.ids) == 3  # an empty list restricts nothing (VectorStoreIndex passes node_ids=[])
    assert store.get_nodes([]) == []
    assert store.get_nodes([], filters=MetadataFilters(filters=[MetadataFilter(key="section", value="s1")])) == []
    store.delete_nodes([])
    assert store.collection.count() == len(nodes)
