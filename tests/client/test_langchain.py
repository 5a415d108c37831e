"""TierstoreVectorStore: LangChain's standard vector-store suite, then filters, MMR, scores and reopening."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")

from langchain_core.documents import Document  # noqa: E402
from langchain_core.embeddings import Embeddings  # noqa: E402
from langchain_tests.integration_tests import VectorStoreIntegrationTests  # noqa: E402

from tierstore.client.integrations.langchain import (TierstoreVectorStore, infer_schema,  # noqa: E402
                                                     string_id_to_int)
from tierstore.errors import ConfigError, FilterError, InvalidType  # noqa: E402


class TestTierstoreStandard(VectorStoreIntegrationTests):
    """LangChain's own suite, sync and async, get_by_ids included (nothing opted out)."""

    @pytest.fixture()
    def vectorstore(self, tmp_path):
        store = TierstoreVectorStore(embedding=self.get_embeddings(), uri=tmp_path, collection_name="standard")
        try:
            yield store
        finally:
            store.close()


class TableEmbeddings(Embeddings):
    """Texts ``"doc-<i>"`` embed to row ``i`` of a table; anything else must be a key of ``extra``."""

    def __init__(self, table: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> None:
        self.table, self.extra = table, extra or {}

    def _one(self, text: str) -> list[float]:
        if text in self.extra:
            return np.asarray(self.extra[text], np.float32).tolist()
        return self.table[int(text.split("-")[1])].tolist()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self._one(t) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return self._one(text)


class AsyncOnlyEmbeddings(TableEmbeddings):
    """Refuses sync calls: the async store methods must use the embeddings' async methods."""

    def embed_documents(self, texts):
        raise AssertionError("sync embed_documents called from async code")

    def embed_query(self, text):
        raise AssertionError("sync embed_query called from async code")

    async def aembed_documents(self, texts):
        await asyncio.sleep(0)
        return TableEmbeddings.embed_documents(self, texts)

    async def aembed_query(self, text):
        await asyncio.sleep(0)
        return TableEmbeddings.embed_query(self, text)


def corpus(n: int, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    metas = [{"section": f"s{i % 7}", "page": i, "score": float(i % 10) / 10, "tags": [f"t{i % 3}", f"u{i % 5}"],
              "draft": i % 2 == 0, "nested": {"a": [i, None]}} for i in range(n)]
    return x, [f"doc-{i}" for i in range(n)], metas


def exact_cosine(x: np.ndarray, q: np.ndarray, mask: np.ndarray, k: int) -> list[int]:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = np.where(mask, xn @ (q / np.linalg.norm(q)), -np.inf)
    order = np.argsort(-sims, kind="stable")
    return [int(i) for i in order[:min(k, int(mask.sum()))]]


def test_filters_match_exact_filtered_topk_across_checkpoints(tmp_path):
    x, texts, metas = corpus(3_000)
    emb = TableEmbeddings(x)
    # flush_rows: most rows are checkpointed into vector chunks, the rest stay in the WAL delta
    store = TierstoreVectorStore(emb, tmp_path, "docs", connect_options={"flush_rows": 1_000}, batch_size=700)
    try:
        ids = store.add_texts(texts, metas, ids=[f"id-{i}" for i in range(3_000)])
        assert store.collection.settings["attributes"] == {
            "section": "keyword", "page": "int", "score": "float", "tags": "keywords", "draft": "bool"}
        store.collection.build_index()
        pages = np.arange(3_000)
        cases = [({"section": "s3"}, pages % 7 == 3),
                 ({"page": {"$gte": 100, "$lt": 160}, "draft": False},
                  (pages >= 100) & (pages < 160) & (pages % 2 == 1)),
                 ({"$or": [{"tags": "t1"}, {"score": {"$gt": 0.85}}]}, (pages % 3 == 1) | (pages % 10 == 9)),
                 ({"tags": {"$in": ["u4"]}, "section": {"$ne": "s0"}}, (pages % 5 == 4) & (pages % 7 != 0))]
        for spec, mask in cases:
            recalls = []
            for q in range(0, 3_000, 100):
                docs = store.similarity_search(texts[q], k=10, filter=spec)
                got = [int(d.id.split("-")[1]) for d in docs]
                want = exact_cosine(x, x[q], mask, 10)
                assert len(got) == len(want) and mask[got].all(), spec  # min(k, matches), all matching
                assert all(d.metadata == metas[i] and d.page_content == texts[i] for d, i in zip(docs, got))
                if mask.sum() <= 1_024:  # the planner compares every match exactly: the exact top-k
                    assert got == want, spec
                recalls.append(len(set(got) & set(want)) / len(want))
            assert np.mean(recalls) >= 0.95, (spec, np.mean(recalls))  # filtered IVF on the broad filter: 0.99
        with pytest.raises(FilterError, match="nested"):
            store.similarity_search(texts[0], k=3, filter={"nested": {"a": 1}})  # stored, not filterable
        got = store.get_by_ids([ids[2_999], "nope", ids[0], ids[0]])
        assert [d.id for d in got] == [ids[2_999], ids[0]]
        assert got[1] == Document(id="id-0", page_content="doc-0", metadata=metas[0])
    finally:
        store.close()


def test_inferred_schema_is_lenient_and_declared_schema_is_strict(tmp_path):
    assert infer_schema([{"a": 1, "b": "x", "_c": 1, "d": None, "e": [1]}, {"a": 2.5, "b": 3, "f": True}]) == {
        "a": "float", "f": "bool"}  # int+float -> float; str+int conflict dropped; '_', None, list of int skipped
    x, texts, _ = corpus(4, dim=4)
    with TierstoreVectorStore(TableEmbeddings(x), tmp_path / "a", "c") as store:
        store.add_texts(texts[:2], [{"page": 1}, {"page": 2}])
        store.add_texts(texts[2:], [{"page": "iv", "new": "n"}, {"page": 7}])  # kept, not filterable
        assert store.get_by_ids(["x"]) == []
        with pytest.raises(InvalidType, match="list of str"):
            store.delete("doc-0")  # not 5 one-letter ids
        hits = store.similarity_search(texts[2], k=4, filter={"page": {"$gte": 0}})
        assert sorted(d.page_content for d in hits) == ["doc-0", "doc-1", "doc-3"]
        assert {d.page_content: d.metadata for d in store.similarity_search(texts[2], k=4)}["doc-2"] == {
            "page": "iv", "new": "n"}
    with TierstoreVectorStore(TableEmbeddings(x), tmp_path / "b", "c", metadata_schema={"page": "int"}) as store:
        with pytest.raises(InvalidType, match="page"):
            store.add_texts(texts[:1], [{"page": "iv"}])
        assert store.similarity_search(texts[0], k=1) == []  # nothing was written
    with pytest.raises(ValueError, match="'_'"):
        TierstoreVectorStore(TableEmbeddings(x), tmp_path / "c", metadata_schema={"_text": "keyword"})


def test_scores_mmr_and_duplicate_ids(tmp_path):
    base = np.eye(4, dtype=np.float32)
    extra = {"a": base[0], "a2": base[0] + 0.05 * base[1], "b": base[1], "c": -base[0], "q": base[0] + 0.2 * base[1]}
    emb = TableEmbeddings(base, extra)
    with TierstoreVectorStore(emb, tmp_path, "m") as store:
        # one batch names "a" twice: the later document wins, no duplicate row
        assert store.add_texts(["a2", "a", "b", "c", "a"], [{"v": 0}, {"v": 1}, {}, {}, {"v": 2}],
                               ids=["a2", "a", "b", "c", "a"]) == ["a2", "a", "b", "c", "a"]
        assert store.collection.count() == 4 and store.get_by_ids(["a"])[0].metadata == {"v": 2}
        scored = store.similarity_search_with_score("q", k=4)
        assert [d.id for d, _ in scored] == ["a2", "a", "b", "c"]
        q = extra["q"] / np.linalg.norm(extra["q"])
        for doc, distance in scored:
            v = extra[doc.id] / np.linalg.norm(extra[doc.id])
            assert distance == pytest.approx(1 - float(q @ v), abs=1e-5)
        relevance = store.similarity_search_with_relevance_scores("q", k=4)
        assert [round(s, 4) for _, s in relevance] == [round((2 - d) / 2, 4) for _, d in scored]
        assert relevance[-1][1] == pytest.approx((1 - float(q[0])) / 2, abs=1e-5)  # "c" = -e0: (1 + cos) / 2
        assert [d.id for d in store.similarity_search("q", k=2)] == ["a2", "a"]
        assert [d.id for d in store.max_marginal_relevance_search("q", k=2, fetch_k=4, lambda_mult=0.5)] == ["a2", "b"]
        assert [d.id for d in store.max_marginal_relevance_search("q", k=2, fetch_k=4, lambda_mult=1.0)] == ["a2", "a"]
        assert store.similarity_search("q", k=2, nprobe=4)  # search parameters pass through
        store.delete()  # no ids: every document
        assert store.collection is None and store.similarity_search("q", k=1) == []
        store.add_texts(["b"])
        assert [d.page_content for d in store.similarity_search("q", k=5)] == ["b"]


def test_reopen_keeps_documents_metric_and_schema(tmp_path):
    x, texts, metas = corpus(50, dim=8)
    store = TierstoreVectorStore.from_texts(texts, TableEmbeddings(x), metas, uri=tmp_path, collection_name="r",
                                            metric="l2", metadata_schema={"section": "keyword"})
    ids = [d.id for d in store.similarity_search(texts[7], k=50)]
    store.close()
    with TierstoreVectorStore(TableEmbeddings(x), tmp_path, "r") as again:
        assert again.collection.metric == "l2" and again.collection.settings["attributes"] == {"section": "keyword"}
        assert [d.id for d in again.similarity_search(texts[7], k=50)] == ids
        [(doc, distance)] = again.similarity_search_with_score(texts[7], k=1, filter={"section": "s0"})
        j = int(doc.page_content.split("-")[1])
        assert j % 7 == 0 and distance == pytest.approx(float(((x[j] - x[7]) ** 2).sum()), rel=1e-4)
    with pytest.raises(ConfigError, match="metric"):
        TierstoreVectorStore(TableEmbeddings(x), tmp_path, "r", metric="cosine")
    with pytest.raises(ConfigError, match="schema"):
        TierstoreVectorStore(TableEmbeddings(x), tmp_path, "r", metadata_schema={"page": "int"})


def test_async_methods_use_async_embeddings_and_run_concurrently(tmp_path):
    x, texts, metas = corpus(400, dim=8, seed=3)
    emb = AsyncOnlyEmbeddings(x)

    async def main():
        store = await TierstoreVectorStore.afrom_texts(texts[:200], emb, metas[:200], uri=tmp_path, collection_name="a")
        try:
            await asyncio.gather(store.aadd_texts(texts[200:300], metas[200:300], batch_size=30),
                                 store.aadd_documents([Document(page_content=t, metadata=m, id=f"k{i}")
                                                       for i, (t, m) in enumerate(zip(texts[300:], metas[300:]))]))
            assert store.collection.count() == 400
            found = await asyncio.gather(*(store.asimilarity_search(texts[i], k=3, filter={"draft": True})
                                           for i in range(0, 400, 8)))
            assert [docs[0].page_content for docs in found] == [texts[i] for i in range(0, 400, 8)]
            mmr = await store.amax_marginal_relevance_search(texts[9], k=3, fetch_k=10)
            assert mmr[0].page_content == texts[9] and len({d.id for d in mmr}) == 3
            scored = await store.asimilarity_search_with_relevance_scores(texts[9], k=5)
            assert scored[0][0].page_content == texts[9] and all(0 <= s <= 1 for _, s in scored)
            assert await store.adelete(["k0", "k1"]) and await store.aget_by_ids(["k0", "k2"]) == [
                Document(id="k2", page_content=texts[302], metadata=metas[302])]
        finally:
            await asyncio.to_thread(store.close)

    asyncio.run(main())


def test_ids_and_import_isolation():
    assert string_id_to_int("1") == string_id_to_int("1") != string_id_to_int("2")
    assert 0 <= string_id_to_int("x" * 1_000) < 2**63
    with pytest.raises(InvalidType):
        string_id_to_int(1)
    # langchain_core is imported by the integration only, never by tierstore's core
    code = ("import sys, tierstore, tierstore.client.database, tierstore.client.aio, tierstore.client.integrations; "
            "assert 'langchain_core' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
