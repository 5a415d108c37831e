"""Collections end to end: the public API, exactness, index recall, persistence, bad input."""

from __future__ import annotations

import numpy as np
import pytest

import tierstore
from tierstore import AlreadyExists, ConfigError, InvalidArgument, InvalidType, NotFound

from .conftest import exact, recall


@pytest.fixture
def db(tmp_path):
    with tierstore.connect(tmp_path / "db") as database:
        yield database


# ------------------------------------------------------------------ catalogue
def test_create_list_open_drop(db):
    db.create_collection("a", dim=4)
    db.create_collection("b", dim=8, metric="cosine", attributes={"year": "int"})
    assert db.list_collections() == ["a", "b"]
    assert db.collection("b").dim == 8 and db.collection("b").metric == "cosine"
    with pytest.raises(AlreadyExists):
        db.create_collection("a", dim=4)
    assert db.create_collection("a", dim=4, exist_ok=True).dim == 4
    with pytest.raises(ConfigError, match="exists with"):
        db.create_collection("a", dim=5, exist_ok=True)
    db.drop_collection("a")
    assert db.list_collections() == ["b"]
    with pytest.raises(NotFound):
        db.collection("a")
    with pytest.raises(NotFound):
        db.drop_collection("a")


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 200, "sp ace"])
def test_bad_names(db, name):
    with pytest.raises(InvalidArgument):
        db.create_collection(name, dim=4)


@pytest.mark.parametrize("kwargs, error", [
    ({"dim": 0}, InvalidArgument), ({"dim": "8"}, InvalidType), ({"dim": 8, "metric": "hamming"}, InvalidArgument),
    ({"dim": 8, "attributes": {"y": "date"}}, InvalidArgument), ({"dim": 8, "attributes": ["y"]}, InvalidType),
])
def test_bad_settings(db, kwargs, error):
    with pytest.raises(error):
        db.create_collection("c", **kwargs)
    assert db.list_collections() == []


# ----------------------------------------------------------------- exactness
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_search_without_index_is_exact(db, metric):
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((500, 16)).astype(np.float32)
    xq = rng.standard_normal((20, 16)).astype(np.float32)
    col = db.create_collection("c", dim=16, metric=metric)
    col.add(np.arange(1000, 1500), xb)
    res = col.search(xq, k=5)
    base, queries = xb, xq
    if metric == "cosine":
        base = xb / np.linalg.norm(xb, axis=1, keepdims=True)
        queries = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    scores, truth = exact(base, queries, 5, "l2" if metric == "l2" else "ip")
    assert np.array_equal(res.ids, truth + 1000)
    want = {"l2": scores, "ip": -scores, "cosine": 1 - scores}[metric]
    np.testing.assert_allclose(res.distances, want, rtol=1e-4, atol=1e-4)
    assert res.ids.dtype == np.int64 and res.distances.shape == (20, 5)


def test_single_query_and_k_larger_than_collection(db):
    col = db.create_collection("c", dim=3)
    col.add([7, 8], np.array([[0, 0, 0], [1, 0, 0]], np.float32))
    res = col.search(np.array([0.9, 0, 0]), k=4)
    assert res.ids.tolist() == [[8, 7, -1, -1]]
    assert np.isinf(res.distances[0, 2:]).all()
    np.testing.assert_allclose(res.distances[0, :2], [0.01, 0.81], rtol=1e-5)


def test_upsert_and_delete(db):
    col = db.create_collection("c", dim=2)
    col.add([1, 2, 3], np.array([[0, 0], [5, 5], [9, 9]], np.float32))
    col.add([2], np.array([[0.1, 0.1]], np.float32))  # replaces id 2
    assert col.count() == 3
    assert col.search(np.zeros(2), k=3).ids.tolist() == [[1, 2, 3]]
    assert col.delete([1, 42]) == 1
    assert col.count() == 2
    assert col.search(np.zeros(2), k=3).ids.tolist() == [[2, 3, -1]]
    assert col.delete([1]) == 0


# -------------------------------------------------------------------- inputs
@pytest.mark.parametrize("ids, vectors, error", [
    ([1, 2], np.zeros((2, 5), np.float32), InvalidArgument),          # wrong dim
    ([1, 2], np.zeros((3, 4), np.float32), InvalidArgument),          # count mismatch
    ([1.5, 2], np.zeros((2, 4), np.float32), InvalidType),            # non-integer ids
    (["a", "b"], np.zeros((2, 4), np.float32), InvalidType),
    ([-1, 2], np.zeros((2, 4), np.float32), InvalidArgument),         # -1 is the padding id
    ([1, 1], np.zeros((2, 4), np.float32), InvalidArgument),          # repeated id
    ([1, 2], np.array([[np.nan, 0, 0, 0], [0, 0, 0, 0]], np.float32), InvalidArgument),
    ([1, 2], np.array([[np.inf, 0, 0, 0], [0, 0, 0, 0]]), InvalidArgument),
    ([1, 2], np.array([["a"] * 4] * 2), InvalidType),
])
def test_bad_add_changes_nothing(db, ids, vectors, error):
    col = db.create_collection("c", dim=4)
    col.add([9], np.ones((1, 4), np.float32))
    with pytest.raises(error):
        col.add(ids, vectors)
    assert col.count() == 1 and col.stats()["wal_records"] == 1


@pytest.mark.parametrize("query, k, params, error", [
    (np.zeros(5), 3, {}, InvalidArgument),
    (np.zeros(4), 0, {}, InvalidArgument),
    (np.zeros(4), -2, {}, InvalidArgument),
    (np.zeros(4), 2.5, {}, InvalidType),
    (np.array([np.nan, 0, 0, 0]), 3, {}, InvalidArgument),
    (np.zeros(4), 3, {"nprobe": 0}, InvalidArgument),
    (np.zeros(4), 3, {"nprob": 4}, InvalidArgument),
    (np.zeros(4), 3, {"prune_ratio": 0.5}, InvalidArgument),
])
def test_bad_search(db, query, k, params, error):
    col = db.create_collection("c", dim=4)
    col.add([1], np.ones((1, 4), np.float32))
    with pytest.raises(error):
        col.search(query, k, **params)


def test_search_params_are_checked_on_every_call(db):
    """Checked parameter sets are memoised; a value equal to a good one but of a wrong type
    (True == 1 == 1.0 as dict keys) is still refused, on the tenant path too."""
    col = db.create_collection("c", dim=4, metric="cosine")
    col.tenant("t").add([1, 2], np.ones((2, 4), np.float32))
    q = np.ones(4, np.float32)
    assert col.search(q, 1, nprobe=1).ids[0, 0] == 1 and col.tenant("t").search(q, 1, nprobe=1).ids[0, 0] == 1
    for bad in (True, 1.0, "1"):
        with pytest.raises(InvalidType):
            col.search(q, 1, nprobe=bad)
        with pytest.raises(InvalidType):
            col.tenant("t").search(q, 1, nprobe=bad)


def test_zero_vector_under_cosine(db):
    col = db.create_collection("c", dim=3, metric="cosine")
    with pytest.raises(InvalidArgument, match="zero vector"):
        col.add([1], np.zeros((1, 3)))


def test_build_index_on_empty_collection(db):
    col = db.create_collection("c", dim=3)
    with pytest.raises(InvalidArgument, match="empty"):
        col.build_index()
    with pytest.raises(InvalidArgument):
        col.build_index(quantizer="pq9")


# ------------------------------------------------------------------ the index
# On these 32-d blobs 4-bit PQ (2 dimensions per code) and 1-bit RaBitQ (error ~ 1/sqrt(d))
# are coarse: they need a deeper exact rerank than in 384 dimensions.
@pytest.mark.parametrize("quantizer, rerank_factor, floor", [
    ("pq4fs", 8, 0.95), ("sq8", 4, 0.95), ("sq4", 4, 0.95), ("rabitq", 16, 0.93), ("osq", 4, 0.95)])
def test_index_recall(db, blobs, quantizer, rerank_factor, floor):
    xb, xq, truth = blobs
    col = db.create_collection("c", dim=32)
    col.add(np.arange(len(xb)), xb)
    info = col.build_index(quantizer=quantizer, target_list_size=64)
    assert info["lists"] > 100 and col.stats()["index"]["quantizer"] == quantizer
    res = col.search(xq, k=10, nprobe=16, rerank=rerank_factor)
    assert recall(res.ids, truth) >= floor
    assert (np.diff(res.distances, axis=1) >= 0).all()  # sorted, exact distances after rerank
    np.testing.assert_allclose(res.distances[:, 0], ((xb[res.ids[:, 0]] - xq) ** 2).sum(1), rtol=1e-4)
    for row in res.ids:  # replicas never show up twice
        assert len(set(row.tolist())) == len(row)


def test_manpages_recall(db, manpages):
    xb, xq, gt = manpages
    col = db.create_collection("man", dim=384, metric="cosine")
    col.add(np.arange(len(xb)), xb)
    col.build_index()
    assert recall(col.search(xq, k=10, nprobe=24).ids, gt) >= 0.95


def test_pruning_probes_fewer_lists(db, blobs):
    xb, xq, truth = blobs
    col = db.create_collection("c", dim=32)
    col.add(np.arange(len(xb)), xb)
    col.build_index(target_list_size=64)
    full = col.search(xq, k=10, nprobe=32)
    pruned = col.search(xq, k=10, nprobe=32, prune_ratio=1.5)
    assert pruned.stats["lists_probed"] < full.stats["lists_probed"]
    assert recall(pruned.ids, truth) >= recall(full.ids, truth) - 0.05


def test_rerank_zero_returns_code_order(db, blobs):
    xb, xq, truth = blobs
    col = db.create_collection("c", dim=32)
    col.add(np.arange(len(xb)), xb)
    col.build_index(target_list_size=64, quantizer="sq8")
    res = col.search(xq, k=10, nprobe=16, rerank=0)
    assert recall(res.ids, truth) >= 0.85
    for row in res.ids:
        assert len(set(row.tolist())) == len(row)


def test_build_progress_bar(db, capsys):
    col = db.create_collection("c", dim=8)
    col.add(np.arange(2_000), np.random.default_rng(0).standard_normal((2_000, 8)).astype(np.float32))
    col.build_index(progress=True, target_list_size=50)
    assert "index 2,000 vectors" in capsys.readouterr().err
    col.build_index(target_list_size=50)  # not a terminal: quiet by default
    assert capsys.readouterr().err == ""
