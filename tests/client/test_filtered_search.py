"""Filtered search through a collection: only matching live rows, min(k, matches) results, recall."""

from __future__ import annotations

import numpy as np
import pytest

import tierstore
from tierstore.errors import FilterError, InvalidType

SCHEMA = {"year": "int", "lang": "keyword", "tags": "keywords", "ok": "bool", "score": "float"}


def make_rows(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, 24)).astype(np.float32) * 3
    which = rng.integers(0, 40, n)
    x = (centres[which] + rng.standard_normal((n, 24))).astype(np.float32)
    attrs = []
    for i in range(n):
        row = {"year": int(2000 + (i * 7919) % 25), "lang": ["en", "de", "fr"][int(which[i]) % 3],  # lang follows clusters
               "tags": [f"t{i % 5}", f"c{which[i] % 4}"], "ok": bool(i % 2), "score": float(i % 100) / 10}
        if i % 50 == 0:
            del row["year"]  # a missing value
        attrs.append(row)
    return x, attrs


def matches(attr: dict, spec: dict) -> bool:
    """A direct reading of the few filters used here."""
    for key, want in spec.items():
        if key == "$or":
            if not any(matches(attr, sub) for sub in want):
                return False
            continue
        have = attr.get(key)
        if isinstance(want, dict):
            for op, value in want.items():
                if op == "$gte" and not (have is not None and have >= value):
                    return False
                if op == "$lt" and not (have is not None and have < value):
                    return False
                if op == "$in" and not (have is not None and (set(have) & set(value) if isinstance(have, list)
                                                              else have in value)):
                    return False
                if op == "$ne" and have == value:
                    return False
        elif isinstance(have, list):
            if want not in have:
                return False
        elif have != want:
            return False
    return True


def exact(x, xq, ok, k):
    rows = np.flatnonzero(ok)
    d = ((xq[:, None, :] - x[rows][None]) ** 2).sum(-1)
    order = np.argsort(d, axis=1)[:, :k]
    return rows[order]


FILTERS = [
    {"lang": "en"},                                             # ~1/3, correlated with clusters
    {"year": {"$gte": 2020}},                                   # ~20%, independent
    {"tags": {"$in": ["t1"]}, "ok": True},                      # ~10%
    {"year": 2003, "lang": "de"},                               # ~1.3%: exact plan
    {"$or": [{"year": 2001}, {"tags": "c3"}]},
    {"score": {"$gte": 9.5}, "lang": {"$ne": "fr"}},            # tiny
    {"year": 1990},                                             # nothing matches
]


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    x, attrs = make_rows(12_000)
    db = tierstore.connect(tmp_path_factory.mktemp("filtered"))
    col = db.create_collection("c", dim=24, attributes=SCHEMA)
    col.add(np.arange(len(x)), x, attrs)
    col.build_index()
    yield db, col, x, attrs
    db.close()


@pytest.mark.parametrize("spec", FILTERS, ids=[str(f) for f in FILTERS])
def test_only_matching_rows_and_min_k_results(collection, spec):
    _, col, x, attrs = collection
    xq = np.random.default_rng(1).standard_normal((40, 24)).astype(np.float32) * 3
    ok = np.array([matches(a, spec) for a in attrs])
    res = col.search(xq, k=10, filter=spec)
    want = min(10, int(ok.sum()))
    assert res.stats["matches"] == int(ok.sum())
    assert ((res.ids >= 0).sum(axis=1) == want).all()
    found = res.ids[res.ids >= 0]
    assert ok[found].all()  # nothing outside the filter
    if want:
        truth = exact(x, xq, ok, want)
        recall = np.mean([len(set(a[a >= 0]) & set(b)) / want for a, b in zip(res.ids, truth)])
        assert recall >= (0.999 if res.stats["plan"] == "exact" else 0.85), (spec, recall, res.stats)


def test_plans_and_explain(collection):
    _, col, x, _ = collection
    broad = col.search(x[0], k=5, filter={"lang": "en"}, explain=True)
    assert broad.stats["plan"] == "filtered_ivf" and broad.stats["lists_probed"] >= 1
    assert "lang = 'en'" in broad.stats["explain"]["filter"]
    tiny = col.search(x[0], k=5, filter={"year": 2003, "lang": "de"})
    assert tiny.stats["plan"] == "exact"
    assert col.search(x[0], k=5, filter={}).stats["matches"] == col.count()  # {} matches everything


@pytest.mark.parametrize("spec", [{"tags": {"$in": ["t1"]}, "ok": True}, {"year": {"$gte": 2020}}])
def test_compacted_lists_return_what_the_selector_scan_returned(collection, spec):
    """A repeated filter scans lists holding only its rows' codes: the same results, exactly."""
    _, col, _, attrs = collection
    xq = np.random.default_rng(2).standard_normal((30, 24)).astype(np.float32) * 3
    col._match_cache.clear()  # a fresh memo: its first search scans the whole lists
    first = col.search(xq, k=10, filter=spec)
    again = col.search(xq, k=10, filter=spec)
    assert first.stats["scoring"] == "codes" and again.stats["scoring"] == "compact_codes"
    np.testing.assert_array_equal(first.ids, again.ids)
    np.testing.assert_array_equal(first.distances, again.distances)
    singles = np.concatenate([col.search(q, k=10, filter=spec).ids for q in xq])
    np.testing.assert_array_equal(singles, first.ids)
    found = col._matches(spec)
    assert found.compact is not None and found.nbytes > found.rows.nbytes  # counted as memory
    ok = np.array([matches(a, spec) for a in attrs])
    assert ok[first.ids[first.ids >= 0]].all()


@pytest.mark.parametrize("quantizer", ["sq8", "rabitq", "pq4fs"])
def test_compacted_lists_of_every_faiss_code_format(tmp_path, quantizer):
    """Flat codes are selected row by row, fast-scan blocks repacked: the same results either way."""
    x, attrs = make_rows(8_000, seed=6)
    xq = np.random.default_rng(3).standard_normal((20, 24)).astype(np.float32) * 3
    spec = {"year": {"$gte": 2020}}  # ~20%: the filtered plan, compacted on the second search
    with tierstore.connect(tmp_path) as db:
        col = db.create_collection("c", dim=24, attributes=SCHEMA)
        col.add(np.arange(len(x)), x, attrs)
        col.build_index(quantizer=quantizer)
        first, again = (col.search(xq, k=10, filter=spec) for _ in range(2))
        assert (first.stats["scoring"], again.stats["scoring"]) == ("codes", "compact_codes")
        np.testing.assert_array_equal(first.ids, again.ids)
        np.testing.assert_array_equal(first.distances, again.distances)


def test_compacted_lists_follow_updates(tmp_path):
    """Rows added (then folded into the index) or deleted after compaction are seen / gone."""
    x, attrs = make_rows(11_000, seed=4)
    with tierstore.connect(tmp_path, flush_rows=1_000_000) as db:
        col = db.create_collection("c", dim=24, attributes=SCHEMA)
        col.add(np.arange(10_000), x[:10_000], attrs[:10_000])
        col.build_index()
        spec = {"tags": {"$in": ["t1"]}}
        assert col.search(x[:5], k=10, filter=spec).stats["scoring"] == "codes"
        assert col.search(x[:5], k=10, filter=spec).stats["scoring"] == "compact_codes"
        col.add(np.arange(10_000, 11_000), x[10_000:], attrs[10_000:])
        gone = np.arange(1, 10_000, 10)  # half of tag t1's indexed rows
        col.delete(gone)
        col.flush()  # fold the new rows into the lists: memoised rows and compacted lists go stale
        ok = np.array([matches(a, spec) for a in attrs])
        ok[gone] = False
        for _ in range(3):
            res = col.search(x[10_000:10_040], k=10, filter=spec)
            assert res.stats["plan"] == "filtered_ivf"
            found = res.ids[res.ids >= 0]
            assert ok[found].all() and ((res.ids >= 0).sum(axis=1) == 10).all()
            truth = exact(x, x[10_000:10_040], ok, 10)
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(res.ids, truth)])
            assert recall >= 0.85, (recall, res.stats)


def test_updates_deletes_and_reopen_keep_filters_right(tmp_path):
    x, attrs = make_rows(3_000, seed=2)
    with tierstore.connect(tmp_path) as db:
        col = db.create_collection("c", dim=24, attributes=SCHEMA)
        col.add(np.arange(3_000), x, attrs)
        col.build_index()
        spec = {"lang": "fr"}
        before = col.search(x[:5], k=20, filter=spec)
        victims = np.unique(before.ids[before.ids >= 0])[:10]
        col.delete(victims)
        changed = [dict(attrs[i], lang="fr") for i in range(100, 110)]
        col.add(np.arange(100, 110), x[100:110], changed)  # upserts into the delta, now matching
        col.add(np.arange(5_000, 5_003), x[:3], [{"lang": "fr"}] * 3)  # new rows, unflushed
        res = col.search(x[:3], k=5, filter=spec)
        assert not np.isin(res.ids, victims).any()
        assert set(range(5_000, 5_003)) <= set(res.ids.ravel().tolist())  # the same vectors, now matching
        ids100 = col.search(x[100:110], k=1, filter=spec).ids[:, 0]
        assert (ids100 == np.arange(100, 110)).all()
    with tierstore.connect(tmp_path) as db:  # reopened: attributes from the stored chunks and the WAL
        col = db.collection("c")
        again = col.search(x[:3], k=5, filter=spec)
        assert (again.ids == res.ids).all()


def test_collection_without_index_filters_exactly(tmp_path):
    x, attrs = make_rows(500, seed=3)
    with tierstore.connect(tmp_path) as db:
        col = db.create_collection("small", dim=24, attributes=SCHEMA)
        col.add(np.arange(500), x, attrs)
        spec = {"ok": False, "year": {"$lt": 2010}}
        ok = np.array([matches(a, spec) for a in attrs])
        res = col.search(x[:4], k=7, filter=spec)
        assert (res.ids == exact(x, x[:4], ok, 7)).all()


def test_bad_filters_and_attribute_values_are_typed_errors(collection, tmp_path):
    _, col, x, _ = collection
    for spec, words in [({"colour": "red"}, "colour"), ({"year": "2020"}, "year"), ({"year": {"$near": 3}}, "$near"),
                        ({"$and": []}, "$and"), ({"tags": {"$in": "t1"}}, "tags"), ("lang = en", "filter"),
                        ({"lang": {"$gt": "a"}}, "lang"), ({"$or": [{"year": True}]}, "$or[0].year")]:
        with pytest.raises(FilterError, match=words.replace("$", r"\$").replace("[", r"\[").replace("]", r"\]")):
            col.search(x[0], k=3, filter=spec)
    with tierstore.connect(tmp_path) as db:
        c2 = db.create_collection("typed", dim=24, attributes=SCHEMA)
        with pytest.raises(InvalidType, match="year"):
            c2.add([1, 2], x[:2], [{"year": 2020}, {"year": "2021"}])
        assert c2.count() == 0


def test_committed_columns_follow_a_rebuild(tmp_path):
    """Columns are stored at each checkpoint; a rebuild renumbers rows and must not reuse old ones."""
    x, attrs = make_rows(2_000, seed=4)
    spec = {"lang": "de", "ok": True}
    ok = np.array([matches(a, spec) for a in attrs])
    with tierstore.connect(tmp_path) as db:
        col = db.create_collection("c", dim=24, attributes=SCHEMA)
        col.add(np.arange(2_000), x, attrs)
        col.flush()
        col.build_index()  # rows renumbered list by list; no deletes, so the row count is unchanged
        first = col.search(x[:5], k=5, filter=spec)
    assert ok[first.ids[first.ids >= 0]].all()
    with tierstore.connect(tmp_path) as db:
        col = db.collection("c")
        assert col._columns_source is not None  # read from the committed blob, not the chunks' JSON
        again = col.search(x[:5], k=5, filter=spec)
        assert (again.ids == first.ids).all() and ok[again.ids[again.ids >= 0]].all()


def test_get_rows_by_id_and_unfiltered_extra_fields(tmp_path):
    x, attrs = make_rows(300, seed=5)
    with tierstore.connect(tmp_path) as db:
        col = db.create_collection("c", dim=24, attributes=SCHEMA)
        extra = [dict(a, _text=f"row {i}") for i, a in enumerate(attrs)]  # '_' names: stored, not filtered
        col.add(np.arange(300), x, extra)
        col.flush()
        col.add([1_000], x[:1], [{"lang": "de", "_text": "fresh"}])  # unflushed
        col.tenant("t").add([2_000], x[1:2], [{"_text": "tenant row"}])
        got = col.get([5, 1_000, 77_777, 2_000])
        assert got[0]["attributes"]["_text"] == "row 5" and np.allclose(got[0]["vector"], x[5])
        assert got[1]["attributes"] == {"lang": "de", "_text": "fresh"}
        assert got[2] is None
        assert got[3]["attributes"] == {"_text": "tenant row"}  # memberships stay hidden
        with pytest.raises(FilterError, match="_text"):
            col.search(x[0], k=3, filter={"_text": "row 5"})
        with pytest.raises(tierstore.errors.InvalidArgument, match="schema"):
            col.add([3_000], x[:1], [{"colour": "red"}])


def test_damaged_row_attributes_are_caught(tmp_path):
    from tierstore.store.blob import read_header

    x, attrs = make_rows(200, seed=6)
    with tierstore.connect(tmp_path) as db:
        col = db.create_collection("c", dim=24, attributes=SCHEMA)
        col.add(np.arange(200), x, [dict(a, _text=f"row {i}") for i, a in enumerate(attrs)])
        col.build_index()  # with an index, a tiered open leaves the vectors in the tier
        key = col.vectors.keys[0]
    with tierstore.connect(tmp_path) as db:
        blob = bytearray(db.tier.get(key))
        section = read_header(bytes(blob)).section("attr_rows")
        where = bytes(blob).index(b"row 100", section.offset) + 4  # inside row 100's JSON (not a separator)
        blob[where] = ord("7")
        db.tier.put(key, bytes(blob))
    with tierstore.connect(tmp_path) as db:  # a resident open checks every chunk whole
        with pytest.raises(tierstore.errors.CorruptData):
            db.collection("c")
    with tierstore.connect(tmp_path, memory_cache=1 << 20) as db:  # tiered: rows read by range
        col = db.collection("c")
        with pytest.raises(tierstore.errors.CorruptData, match="attributes of row"):
            col.get(np.arange(200))
