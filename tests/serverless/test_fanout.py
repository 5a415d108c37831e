"""The tree's result equals col.search (identical ids) across shapes, parameters, filters and updates."""

from __future__ import annotations

import numpy as np
import pytest

from tierstore.serverless import FanoutExecutor, InProcessInvoker

from .conftest import make_collection


def assert_same(a, b, *, code_distances: bool = False) -> None:
    np.testing.assert_array_equal(a.ids, b.ids)
    if code_distances:  # rerank=0 returns code distances: faiss's one-call search rounds them differently
        np.testing.assert_allclose(a.distances, b.distances, rtol=1e-5)
    else:
        np.testing.assert_array_equal(a.distances, b.distances)


@pytest.mark.parametrize("partitions,branching", [(1, 2), (3, 2), (8, 2), (8, 8), (17, 3), (32, 4), (500, 8)])
def test_identical_ids_across_tree_shapes(s3col, queries, inprocess, partitions, branching):
    executor = FanoutExecutor(inprocess, partitions=partitions, branching=branching)
    res = s3col.col.search(queries, 10, executor=executor)
    assert_same(res, s3col.col.search(queries, 10))
    info = res.stats["serverless"]
    assert info["fanout"] and info["partitions"] == min(partitions, s3col.col.index.nlist)
    assert res.stats["partial"] is False
    # the tie fallback recomputes only queries whose code-score ties straddle the cut
    assert info["tie_fallbacks"] <= 0.1 * len(queries)


@pytest.mark.parametrize("params", [{"nprobe": 1}, {"nprobe": 4, "rerank": 2}, {"nprobe": 32, "rerank": 8},
                                    {"nprobe": 16, "prune_ratio": 1.5}, {"nprobe": 8, "rerank": 0}])
def test_identical_ids_across_search_parameters(s3col, queries, inprocess, params):
    executor = FanoutExecutor(inprocess, partitions=12, branching=3)
    for k in (1, 10, 25):
        assert_same(s3col.col.search(queries, k, executor=executor, **params), s3col.col.search(queries, k, **params),
             code_distances=params.get("rerank") == 0)


def test_single_query_and_k_beyond_the_collection(s3col, queries, inprocess):
    executor = FanoutExecutor(inprocess, partitions=6, branching=2)
    assert_same(s3col.col.search(queries[0], 5, executor=executor), s3col.col.search(queries[0], 5))
    big = s3col.col.search(queries[:3], 5000, executor=executor, nprobe=200)
    assert_same(big, s3col.col.search(queries[:3], 5000, nprobe=200))
    assert (big.ids[:, -1] == -1).all()


FILTERS = [  # (filter, runs as filtered IVF at k=10): 4,000 rows, the exact plan takes up to 1,024 matches
    ({"lang": {"$in": ["en", "de"]}}, True),
    ({"year": {"$gte": 2005}, "tags": {"$in": ["t1", "g3"]}}, True),
    ({"$or": [{"lang": "de"}, {"year": {"$lt": 2010}}]}, True),
    ({"tags": "g2"}, False),                                    # selective: the exact plan, run locally
    ({"year": 1990}, False),                                    # no match
]


@pytest.mark.parametrize("spec,fans_out", FILTERS)
def test_filtered_search_is_identical(s3col, queries, inprocess, spec, fans_out):
    executor = FanoutExecutor(inprocess, partitions=10, branching=4)
    for k, params in ((10, {}), (20, {"nprobe": 4}), (10, {"nprobe": 2, "rerank": 1})):
        res = s3col.col.search(queries, k, filter=spec, executor=executor, **params)
        ref = s3col.col.search(queries, k, filter=spec, **params)
        assert_same(res, ref)
        matches = ref.stats["matches"]
        assert ((res.ids >= 0).sum(axis=1) == min(k, matches)).all()  # min(k, matches) results
        assert res.stats["plan"] == ref.stats["plan"]
        assert res.stats["serverless"]["fanout"] == (ref.stats["plan"] == "filtered_ivf")
        if k == 10 and not params:
            assert (ref.stats["plan"] == "filtered_ivf") == fans_out


def test_warm_workers_do_no_s3_get(s3col, queries):
    invoker = InProcessInvoker(s3col.config())
    executor = FanoutExecutor(invoker, partitions=8, branching=2)
    first = s3col.col.search(queries, 10, executor=executor)
    info = first.stats["serverless"]
    assert info["cold"] == 1 and info["s3_gets"] >= info["invocations"]  # the index state + each partition
    second = s3col.col.search(queries[::-1], 10, executor=executor)
    info = second.stats["serverless"]
    assert info["cold"] == 0 and info["warm"] == info["invocations"] > 0
    assert info["s3_gets"] == 0 and info["s3_bytes"] == 0
    assert_same(second, s3col.col.search(queries[::-1], 10))


def test_disk_cache_survives_a_new_container(s3col, queries, tmp_path):
    config = s3col.config(cache_dir=str(tmp_path))
    executor = FanoutExecutor(InProcessInvoker(config), partitions=4, branching=2)
    assert s3col.col.search(queries, 10, executor=executor).stats["serverless"]["s3_gets"] > 0
    fresh = FanoutExecutor(InProcessInvoker(config), partitions=4, branching=2)  # a restarted container
    res = fresh.search(s3col.col, queries, 10)
    assert res.stats["serverless"]["s3_gets"] == 0
    assert_same(res, s3col.col.search(queries, 10))


def test_stats_describe_the_tree(s3col, queries, inprocess):
    res = s3col.col.search(queries, 10, executor=FanoutExecutor(inprocess, partitions=13, branching=2))
    info = res.stats["serverless"]
    assert info["depth"] == 3 and info["workers"] == 13
    assert [level["level"] for level in info["levels"]] == list(range(1, len(info["levels"]) + 1))
    assert sum(level["nodes"] for level in info["levels"]) == info["invocations"]


@pytest.mark.parametrize("metric,quantizer", [("cosine", "pq4fs"), ("ip", "sq8")])
def test_other_metrics_and_codes(moto_server, queries, metric, quantizer):
    made = make_collection(moto_server, metric=metric, n=2000, quantizer=quantizer)
    try:
        executor = FanoutExecutor(InProcessInvoker(made.config()), partitions=7, branching=2)
        assert_same(made.col.search(queries, 10, executor=executor), made.col.search(queries, 10))
        spec = {"lang": {"$in": ["en", "de"]}}
        assert_same(made.col.search(queries, 10, filter=spec, executor=executor),
             made.col.search(queries, 10, filter=spec))
    finally:
        made.db.close()


def test_collection_without_index_runs_locally(moto_server, queries):
    import tierstore

    from ..conftest import BUCKET

    db = tierstore.connect(f"s3://{BUCKET}/sv/noindex", endpoint_url=moto_server.endpoint_url)
    col = db.create_collection("flat", dim=queries.shape[1])
    col.add(ids=np.arange(50), vectors=queries[:50] * 2)
    try:
        res = col.search(queries, 3, executor=FanoutExecutor(InProcessInvoker(
            __import__("tierstore.serverless", fromlist=["WorkerConfig"]).WorkerConfig(
                bucket=BUCKET, prefix="sv/noindex", endpoint_url=moto_server.endpoint_url)), partitions=4))
        assert_same(res, col.search(queries, 3))
        assert res.stats["serverless"] == {"fanout": False}
    finally:
        db.close()
