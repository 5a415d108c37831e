"""Tenants: handles see only their rows; sharing, revoking, dropping; durable; typed errors."""

from __future__ import annotations

import numpy as np
import pytest

import tierstore
from tierstore.errors import AlreadyExists, FilterError, InvalidArgument, InvalidType, NotFound


@pytest.fixture
def setup(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3_000, 16)).astype(np.float32)
    db = tierstore.connect(tmp_path)
    col = db.create_collection("c", dim=16, attributes={"kind": "keyword"})
    col.tenant("big").add(np.arange(2_000), x[:2_000], [{"kind": "odd" if i % 2 else "even"} for i in range(2_000)])
    col.tenant("small").add(np.arange(2_000, 2_100), x[2_000:2_100])
    col.add(np.arange(2_100, 3_000), x[2_100:])  # rows of no tenant
    col.build_index()
    yield db, col, x, tmp_path
    db.close()


def test_handles_see_only_their_rows(setup):
    _, col, x, _ = setup
    big, small = col.tenant("big"), col.tenant("small")
    assert big.count() == 2_000 and small.count() == 100 and col.tenants() == ["big", "small"]
    res = small.search(x[:20], k=10)  # queries near big's vectors
    assert res.stats["plan"] == "exact" and ((res.ids >= 2_000) & (res.ids < 2_100)).all()
    res = big.search(x[2_000:2_020], k=10)  # 2,000 rows: scanned exactly at k=10 (up to 32 x 80 candidates)
    assert res.stats["plan"] == "exact" and ((res.ids >= 0) & (res.ids < 2_000)).all()
    res = big.search(x[2_000:2_020], k=3)  # 24 candidates: the widened filtered IVF
    assert res.stats["plan"] == "filtered_ivf" and ((res.ids >= 0) & (res.ids < 2_000)).all()
    res = big.search(x[:20], k=10, filter={"kind": "odd"})
    assert (res.ids % 2 == 1).all() and (res.ids < 2_000).all()
    assert col.search(x[2_500], k=1).ids[0, 0] == 2_500  # the collection itself sees every row
    res = big.search(x[2_000:2_040], k=10)
    exact = np.argsort(((x[:2_000][None] - x[2_000:2_040][:, None]) ** 2).sum(-1), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(res.ids, exact)])
    assert recall >= 0.9, recall


def test_sharing_revoking_deleting_and_dropping(setup):
    _, col, x, _ = setup
    big, small = col.tenant("big"), col.tenant("small")
    assert col.grant([5, 6, 7], "small") == 3 and small.count() == 103
    assert set(small.search(x[5:8], k=1).ids.ravel().tolist()) == {5, 6, 7}
    assert big.search(x[5:8], k=1).ids.ravel().tolist() == [5, 6, 7]  # still big's too
    assert small.delete([5]) == 1  # shared: small loses it, big keeps it
    assert small.count() == 102 and big.count() == 2_000
    assert 5 not in small.search(x[5], k=5).ids
    assert col.revoke([6], "small") == 1 and small.count() == 101
    assert col.revoke([2_001], "small") == 1 and small.count() == 100 and col.count() == 2_999  # its last holder
    assert big.delete([0, 1]) == 2 and big.count() == 1_998 and col.count() == 2_997  # big's own rows go
    assert col.drop_tenant("small") == 100
    assert col.tenants() == ["big"] and big.count() == 1_998  # 7 stayed with big
    assert col.tenant("small").search(x[:2], k=3).ids.tolist() == [[-1] * 3] * 2  # unknown: empty
    with pytest.raises(NotFound):
        col.drop_tenant("small")
    with pytest.raises(NotFound):
        col.revoke([7], "nobody")
    with pytest.raises(NotFound):
        col.grant([99_999], "big")


def test_ids_are_global_and_handles_cannot_reach_other_rows(setup):
    _, col, x, _ = setup
    big, small = col.tenant("big"), col.tenant("small")
    with pytest.raises(AlreadyExists, match="already used"):
        small.add([10], x[:1])  # big's id
    with pytest.raises(AlreadyExists):
        small.add([2_500], x[:1])  # a row of no tenant
    small.add([2_050], x[:1] * 2)  # its own row: replaced
    assert small.search(x[0] * 2, k=1).ids[0, 0] == 2_050
    assert small.delete([10, 11, 2_500]) == 0 and big.count() == 2_000 and col.count() == 3_000
    for spec in ({"__tenants": "big"}, {"$or": [{"__tenants": "big"}, {"kind": "odd"}]}):
        with pytest.raises(FilterError, match="__tenants"):
            small.search(x[0], k=5, filter=spec)
    res = small.search(x[:50], k=10, filter={"$or": [{"kind": "odd"}, {"kind": {"$ne": "odd"}}]})
    assert ((res.ids >= 2_000) & (res.ids < 2_100)).all()
    with pytest.raises(InvalidArgument, match="__tenants"):
        col.add([5_000], x[:1], [{"__tenants": ["big"]}])  # the hidden column is not writable by hand


def test_memberships_survive_a_reopen_and_offload(setup):
    db, col, x, path = setup
    col.grant([1], "small")
    small = col.tenant("small")
    before = small.search(x[:10], k=5).ids
    assert col.offload_tenants(keep=0) >= 1
    assert (small.search(x[:10], k=5).ids == before).all()  # comes back on its first query
    stats = col.tenant_stats()
    assert stats["tenants"] == 2 and stats["memberships"] >= 2_101 and stats["tenant_index_bytes"] > 0
    db.close()
    with tierstore.connect(path) as again:
        col2 = again.collection("c")
        assert col2.tenant("small").count() == 101 and col2.tenants() == ["big", "small"]
        assert (col2.tenant("small").search(x[:10], k=5).ids == before).all()


def test_bad_tenant_names(setup):
    _, col, _, _ = setup
    for name, error in ((None, InvalidType), ("", InvalidArgument), ("a\nb", InvalidArgument), ("x" * 300,
                                                                                                 InvalidArgument)):
        with pytest.raises(error):
            col.tenant(name)
    with pytest.raises(InvalidArgument):
        col.offload_tenants(keep=-1)
    with pytest.raises(InvalidArgument, match="tenant"):
        tierstore.Database.create_collection(col.db, "bad", dim=4, attributes={"__tenants": "keywords"})


def test_the_tenant_index_follows_writes_without_a_rebuild(setup):
    """Adds, grants and revokes extend the tenant inverted index; every handle sees them at once."""
    _, col, x, _ = setup
    assert col.tenant("small").count() == 100
    postings = col._tenant_postings
    col.tenant("small").add([5_000, 5_001], x[:2] + 0.01)
    col.tenant("fresh").add([5_002], x[2:3])
    col.grant([2_500], "fresh")
    assert col.tenant("small").count() == 102 and col.tenant("fresh").count() == 2
    assert col._tenant_postings is postings  # extended, not rebuilt
    assert col.tenant("small").search(x[0] + 0.01, k=1).ids[0, 0] == 5_000
    assert set(col.tenant("fresh").search(x[:3], k=2).ids.ravel().tolist()) == {5_002, 2_500}
    col.revoke([2_500], "fresh")
    assert col.tenant("fresh").count() == 1 and "fresh" in col.tenants()
    col.build_index()  # renumbers every row: a new generation, a new index
    assert col.tenant("small").count() == 102 and col.tenant("fresh").count() == 1
    assert col._tenant_postings is not postings  # rebuilt over the new row numbers
    assert col.tenant_stats()["memberships"] == 2_000 + 102 + 1


def test_build_lays_each_tenant_out_together(setup):
    """After a build a tenant's rows are one run (list by list inside it): its exact scan streams."""
    _, col, _, _ = setup
    for name, size in (("big", 2_000), ("small", 100)):
        rows = col._tenant_rows(name)
        assert rows.size == size and rows[-1] - rows[0] == size - 1, (name, rows[:5], rows[-5:])
        assert (np.diff(col.rows.row_list[rows]) >= 0).all()  # list by list within the tenant


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_single_query_probe_equals_the_batch_probe(tmp_path, metric):
    """probe_filtered's one-query path (numpy) picks the same lists, with the same scores, as the batch path (faiss)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3_000, 16)).astype(np.float32)
    db = tierstore.connect(tmp_path)
    col = db.create_collection("c", dim=16, metric=metric)
    col.add(np.arange(3_000), x)
    col.build_index()
    index = col.index
    xq = x[rng.choice(3_000, 32, replace=False)]
    if metric == "cosine":
        xq = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    for share in (0.5, 0.05, 0.005):  # broad, widened, very sparse matches
        matches = (rng.random(index.directory.nlist) < share) * rng.integers(1, 40, index.directory.nlist)
        matches = matches.astype(np.int32)
        matches[~index.active] = 0
        for nprobe, target in ((4, 50), (8, 400)):
            batch_scores, batch_lists = index.probe_filtered(xq, nprobe, matches, target)
            for i in range(xq.shape[0]):
                scores, lists = index.probe_filtered(xq[i:i + 1], nprobe, matches, target)
                width = lists.shape[1]
                assert (batch_lists[i, width:] == -1).all()
                np.testing.assert_array_equal(lists[0], batch_lists[i, :width])
                np.testing.assert_allclose(scores[0], batch_scores[i, :width], rtol=1e-4, atol=1e-4)
    db.close()


def test_a_large_tenant_gets_its_own_ivf(tmp_path, monkeypatch):
    """A tenant above the exact limit is searched through its own small IVF from its second
    search: same isolation, rows added since found, rows deleted or revoked since never
    returned, dropped by an offload and rebuilt, and kept to its memory budget."""
    from tierstore.client import tenants as tenants_module
    # 16 dimensions: ids outweigh codes, so an IVF is large next to the shared lists (0.2x at 384)
    monkeypatch.setattr(tenants_module, "LOCAL_IVF_BUDGET", 1.0)
    monkeypatch.setattr(tenants_module, "LOCAL_IVF_BACKGROUND", False)  # built inside the second search
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((20, 16)).astype(np.float32) * 3
    x = (centres[rng.integers(0, 20, 4_000)] + rng.standard_normal((4_000, 16))).astype(np.float32)
    db = tierstore.connect(tmp_path, flush_rows=1_000_000)
    col = db.create_collection("c", dim=16)
    huge, other = col.tenant("huge"), col.tenant("other")
    huge.add(np.arange(3_000), x[:3_000])
    other.add(np.arange(3_000, 4_000), x[3_000:])
    col.build_index()
    xq = x[rng.choice(4_000, 40, replace=False)] + 0.1
    assert huge.search(xq, k=10).stats["plan"] == "filtered_ivf"
    res = huge.search(xq, k=10)
    assert res.stats["plan"] == "tenant_ivf" and ((res.ids >= 0) & (res.ids < 3_000)).all()
    exact = np.argsort(((x[:3_000][None] - xq[:, None]) ** 2).sum(-1), axis=1)[:, :10]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(res.ids, exact)]) >= 0.9
    stats = col.tenant_stats()
    assert stats["tenant_ivfs"] == 1 and 0 < stats["tenant_ivf_bytes"] < 3_000 * 16 * 4  # less than its vectors

    fresh = (x[:5] + 0.01).astype(np.float32)
    huge.add(np.arange(5_000, 5_005), fresh)  # rows the IVF does not hold: searched beside it
    res = huge.search(fresh, k=1)
    assert res.stats["plan"] == "tenant_ivf" and res.ids[:, 0].tolist() == list(range(5_000, 5_005))
    assert huge.delete(np.arange(100, 140)) == 40  # rows it holds, now dead
    res = huge.search(x[100:140], k=10)
    assert res.stats["plan"] == "tenant_ivf" and not np.isin(res.ids, np.arange(100, 140)).any()
    assert col.grant(np.arange(3_000, 3_010), "huge") == 10  # another tenant's rows shared
    assert huge.search(x[3_000:3_010], k=1).ids[:, 0].tolist() == list(range(3_000, 3_010))
    assert col.revoke(np.arange(3_000, 3_010), "huge") == 10
    res = huge.search(x[3_000:3_010], k=10)
    assert res.stats["plan"] == "tenant_ivf" and ((res.ids < 3_000) | (res.ids >= 5_000)).all()
    assert ((other.search(xq, k=10).ids >= 3_000) & (other.search(xq, k=10).ids < 4_000)).all()

    assert col.offload_tenants(keep=0) >= 1 and col.tenant_stats()["tenant_ivfs"] == 0
    before = huge.search(xq, k=10)
    assert before.stats["plan"] == "tenant_ivf" and col.tenant_stats()["tenant_ivfs"] == 1  # back, first search
    db.close()

    db = tierstore.connect(tmp_path, flush_rows=1_000_000)  # a reader: finds the writer's IVF in the tier
    col = db.collection("c")
    huge = col.tenant("huge")
    stored = [key for key in col.tier.list("collections/c/") if "/tenant-ivf/" in key]
    assert len(stored) == 1
    with monkeypatch.context() as patch:  # no training this time: it comes from the durable tier
        patch.setattr(tenants_module.LocalIVF, "build", lambda *a, **kw: pytest.fail("trained again"))
        assert huge.search(xq, k=10).stats["plan"] == "filtered_ivf"  # unknown to this handle: second search
        again = huge.search(xq, k=10)
    assert again.stats["plan"] == "tenant_ivf" and (again.ids == before.ids).all()
    col.offload_tenants(keep=0)
    assert col.tenant_stats()["tenant_ivfs"] == 0
    db.close()

    db = tierstore.connect(tmp_path, flush_rows=1_000_000)
    col = db.collection("c")
    huge = col.tenant("huge")
    col.tier.put(stored[0], b"not an index")  # damaged: ignored and rebuilt (then kept again by the writer)
    huge.add([9_999], x[:1])  # this handle becomes the writer
    for _ in range(2):
        res = huge.search(xq, k=10)
    assert res.stats["plan"] == "tenant_ivf" and ((res.ids < 3_000) | (res.ids >= 5_000)).all()
    assert tenants_module.LocalIVF.from_bytes(col.tier.get(stored[0]))[1]["tenant"] == "huge"
    assert col.drop_tenant("huge") > 2_900 and col.tenant_stats()["tenant_ivfs"] == 0
    assert not [key for key in col.tier.list("collections/c/") if "/tenant-ivf/" in key]  # its stored IVF too

    other = col.tenant("other")
    other.add(np.arange(6_000, 8_000), x[:2_000] + 0.05)
    col.flush()  # into the index: 3,000 indexed rows
    assert [other.search(xq, k=10).stats["plan"] for _ in range(2)] == ["filtered_ivf", "tenant_ivf"]
    col.build_index()  # a new generation: the old one's stored IVFs go with it
    assert not [key for key in col.tier.list("collections/c/") if "/tenant-ivf/" in key]
    monkeypatch.setattr(tenants_module, "LOCAL_IVF_BUDGET", 0.0)  # no room: the shared lists serve it
    for _ in range(3):
        assert other.search(xq, k=10).stats["plan"] == "filtered_ivf"
    db.close()

    monkeypatch.setattr(tenants_module, "LOCAL_IVF_BUDGET", 1.0)
    db = tierstore.connect(tmp_path, flush_rows=1_000_000)
    col = db.collection("c")
    col.build_index()  # only a build, no write: still the writer, so it keeps its tenant IVFs in the tier
    assert [col.tenant("other").search(xq, k=10).stats["plan"] for _ in range(2)] == ["filtered_ivf", "tenant_ivf"]
    assert len([key for key in col.tier.list("collections/c/") if "/tenant-ivf/" in key]) == 1
    db.close()


def test_a_tiered_collection_serves_large_tenants_from_their_own_ivf(tmp_path, monkeypatch):
    """With the vectors in the tier (memory_cache set) an exact scan would read every row of the
    tenant on every query: above 8 x the candidates a tenant searches its own IVF, whose codes
    are in memory and whose rerank reads only the candidates."""
    from tierstore.client import tenants as tenants_module
    monkeypatch.setattr(tenants_module, "LOCAL_IVF_BUDGET", 1.0)  # 16 dimensions (see above)
    monkeypatch.setattr(tenants_module, "LOCAL_IVF_BACKGROUND", False)
    rng = np.random.default_rng(6)
    centres = rng.standard_normal((20, 16)).astype(np.float32) * 3
    x = (centres[rng.integers(0, 20, 3_000)] + rng.standard_normal((3_000, 16))).astype(np.float32)
    with tierstore.connect(tmp_path) as db:
        col = db.create_collection("c", dim=16)
        col.tenant("big").add(np.arange(1_000), x[:1_000])
        col.tenant("rest").add(np.arange(1_000, 3_000), x[1_000:])
        col.build_index()
    with tierstore.connect(tmp_path, memory_cache=64 << 10) as db:
        col = db.collection("c")
        assert col.vectors.resident is None  # tiered: vectors read from LMDB by range
        big = col.tenant("big")
        xq = x[rng.choice(1_000, 30, replace=False)] + 0.1
        plans = [big.search(xq, k=10).stats["plan"] for _ in range(2)]
        res = big.search(xq, k=10)
        assert plans == ["filtered_ivf", "tenant_ivf"] and res.stats["plan"] == "tenant_ivf"
        assert ((res.ids >= 0) & (res.ids < 1_000)).all()
        exact = np.argsort(((x[:1_000][None] - xq[:, None]) ** 2).sum(-1), axis=1)[:, :10]
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(res.ids, exact)]) >= 0.9
        assert big.search(xq, k=10, filter=None).ids.tolist() == res.ids.tolist()
        small = big.search(xq[:3], k=1)  # 8 candidates: 64 rows or fewer would be scanned exactly
        assert small.stats["plan"] == "tenant_ivf" and (small.ids < 1_000).all()


def test_tenant_ivfs_train_in_the_background(tmp_path, monkeypatch):
    """By default the second search only starts the training: the shared lists answer until it
    is done, and the first search after it uses the IVF. Closing waits for a running build."""
    from tierstore.client import tenants as tenants_module
    monkeypatch.setattr(tenants_module, "LOCAL_IVF_BUDGET", 1.0)  # 16 dimensions (see above)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4_000, 16)).astype(np.float32)
    db = tierstore.connect(tmp_path)
    col = db.create_collection("c", dim=16)
    col.tenant("huge").add(np.arange(3_000), x[:3_000])
    col.tenant("other").add(np.arange(3_000, 4_000), x[3_000:])
    col.build_index()
    huge, xq = col.tenant("huge"), x[:20] + 0.05
    first, second = huge.search(xq, k=10), huge.search(xq, k=10)  # the second one starts the build
    assert first.stats["plan"] == second.stats["plan"] == "filtered_ivf"
    _, _, future = col._tenant_ivf_pending["huge"]
    assert future.result(timeout=60) is not None
    res = huge.search(xq, k=10)
    assert res.stats["plan"] == "tenant_ivf" and ((res.ids >= 0) & (res.ids < 3_000)).all()
    assert res.ids[:, 0].tolist() == list(range(20))  # each query's own vector, nearest
    stats = col.tenant_stats()
    assert stats["tenant_ivfs"] == 1 and stats["tenant_ivf_builds"] == 1
    assert [key for key in col.tier.list("collections/c/") if "/tenant-ivf/" in key]  # the writer kept it
    col.offload_tenants(keep=0)
    huge.search(xq, k=10)
    col.tenant("other").add([9_000], x[:1])  # rows change: its row set is made again, the IVF stays
    assert huge.search(xq, k=10).stats["plan"] == "tenant_ivf"
    monkeypatch.setattr(tenants_module.LocalIVF, "build", classmethod(lambda *a, **kw: __import__("time").sleep(0.3)))
    col.drop_tenant("huge")
    col.tenant("huge").add(np.arange(10_000, 13_000), x[:3_000] + 1.0)
    col.build_index()
    big = col.tenant("huge")
    big.search(xq, k=10)
    big.search(xq, k=10)  # starts a (slow) build
    assert "huge" in col._tenant_ivf_pending
    db.close()  # waits for it, then is closed
    assert col._tenant_ivf_pool is None and not col._tenant_ivf_pending
