"""Fuzzed input: hypothesis-driven calls over the public API, with odd and broken arguments.

Every call either succeeds with a result of the promised shape, or raises a tierstore
error (:class:`~tierstore.errors.TierstoreError`; several leaves also subclass the
builtin ``ValueError`` / ``TypeError`` / ``KeyError``). Never another exception, a crash
or a hang; and a rejected call leaves the store as it was (``col.count()``, a search
result and ``db.list_collections()`` unchanged). Covered: ``connect`` and
``create_collection`` (names, dims, metrics, attribute schemas), ``add`` (shapes, dtypes,
NaN/inf, odd ids, attribute values), ``search`` (shapes, ``k``, parameters, malformed
filters), ``get``, ``delete``, tenant handles, the KV-cache store, the Lambda handler
(malformed events) and corrupted blobs and manifests in a real LMDB store.

CI runs a quick pass; ``TIERSTORE_RELIABILITY=full`` runs ten times the examples. Each
test prints one summary line (``fuzz <test>: N examples, ...``; see them with ``-s`` or
``-rP``).
"""

from __future__ import annotations

import base64
import collections
import json
import os
import shutil
import time
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tierstore
from tierstore.errors import CorruptData, EventError, TierstoreError
from tierstore.store.blob import decode_blob
from tierstore.tiers import LmdbTier

from ..conftest import BUCKET, RecordingInvoker
from ._report import REPORT

FULL = os.environ.get("TIERSTORE_RELIABILITY") == "full"
SCALE = 10 if FULL else 1
CALL_BOUND_S = 20.0  # any single call slower than this counts as a hang
DIM = 8
N_BASE = 600
SCHEMA = {"year": "int", "score": "float", "lang": "keyword", "tags": "keywords", "ok": "bool"}


def fuzz_settings(examples: int):
    return settings(max_examples=examples * SCALE, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


class Tally:
    """Examples run and how each ended (a result, or the name of the typed error)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.outcomes: collections.Counter = collections.Counter()

    def call(self, fn, *args, **kwargs):
        """``(result, None)`` or ``(None, typed error)``; any other exception propagates and fails."""
        started = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
        except TierstoreError as exc:
            self.outcomes[type(exc).__name__] += 1
            return None, exc
        finally:
            took = time.perf_counter() - started
            assert took < CALL_BOUND_S, f"{getattr(fn, '__name__', fn)} took {took:.1f} s"
        self.outcomes["ok"] += 1
        return out, None

    def report(self, minimum: int) -> None:
        total = sum(self.outcomes.values())
        detail = ", ".join(f"{k} {v}" for k, v in self.outcomes.most_common())
        print(f"\nfuzz {self.name}: {total} calls ({detail})")
        REPORT["fuzzed calls"] += total
        REPORT["fuzzed calls rejected with a typed error"] += total - self.outcomes["ok"]
        assert total >= minimum * SCALE, f"only {total} fuzzed calls ran"


# ----------------------------------------------------------------------------- strategies
ODD_NAMES = ["../x", "..", ".", "a/b", "/abs", "x\x00y", "", "a" * 128, "a" * 129, "a" * 300, "ok-name.v1", "_",
             "-lead", ".hidden", "名前", "a\\b", "a b", " ", "\n", "collections", "manifest", "x/../y", "%2e%2e",
             "COM1", "a:b", "\u202e", "\ud800"]
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(2 ** 70), 2 ** 70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
json_like = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=12)
odd_values = st.one_of(json_like, st.binary(max_size=8), st.just(object()), st.just({1, 2}),
                       st.just(np.array([1, 2])), st.just(np.float32("nan")), st.just(1 + 2j), st.just(b"\x00"))
names = st.one_of(st.sampled_from(ODD_NAMES), st.text(max_size=20), st.text(min_size=100, max_size=200),
                  st.none(), st.integers(), st.binary(max_size=6))

DTYPES = ["float32", "float64", "float16", "int8", "int32", "int64", "uint8", "uint64", "bool", "complex64",
          "object", "U3", "longdouble"]


@st.composite
def arrays(draw, rows=None, cols=None):
    """A numpy array of an odd dtype and shape, sometimes with NaN / inf / huge values."""
    dtype = draw(st.sampled_from(DTYPES))
    ndim = draw(st.sampled_from([0, 1, 2, 2, 2, 3]))
    shape = []
    for axis in range(ndim):
        if axis == ndim - 1 and cols is not None and draw(st.booleans()):
            shape.append(cols)
        elif axis == 0 and rows is not None and draw(st.booleans()):
            shape.append(rows)
        else:
            shape.append(draw(st.integers(0, 10)))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    values = rng.standard_normal(shape) * draw(st.sampled_from([1.0, 1e3, 1e40, 1e300]))
    if values.size and draw(st.booleans()):
        values.flat[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 0.0]))
    with np.errstate(all="ignore"):
        if dtype == "object":
            return values.astype(object)
        if dtype == "U3":
            return values.astype("U3")
        return values.astype(dtype)


@st.composite
def vectors_arg(draw, n: int):
    """Vectors for ``n`` ids: mostly well-formed float/int arrays, often broken."""
    kind = draw(st.sampled_from(["good", "good", "array", "list", "ragged", "scalar", "none", "str"]))
    if kind == "good":
        dtype = draw(st.sampled_from(["float32", "float64", "float16", "int32", "uint8", "longdouble"]))
        rng = np.random.default_rng(draw(st.integers(0, 1000)))
        arr = (rng.standard_normal((n, DIM)) * 4).astype(dtype)
        if draw(st.integers(0, 3)) == 0:
            bad = draw(st.sampled_from([np.nan, np.inf, 0]))
            with np.errstate(invalid="ignore"):
                arr = arr.astype(np.float64) if arr.dtype.kind in "iu" and bad != 0 else arr
            arr.flat[draw(st.integers(0, arr.size - 1))] = bad
        return arr
    if kind == "array":
        return draw(arrays(rows=n, cols=DIM))
    if kind == "list":
        return draw(st.lists(st.lists(json_scalars, min_size=DIM, max_size=DIM), min_size=0, max_size=3))
    if kind == "ragged":
        return [[0.5] * DIM, [0.5] * (DIM - 1)]
    if kind == "scalar":
        return draw(json_scalars)
    if kind == "none":
        return None
    return "x" * DIM


FRESH = st.integers(10 ** 6, 2 ** 63 - 1)  # ids the baseline collection does not hold


@st.composite
def ids_arg(draw):
    kind = draw(st.sampled_from(["fresh", "fresh", "fresh_np", "negative", "huge", "dup", "float", "str", "bool",
                                 "empty", "2d", "ragged", "none", "scalar", "object", "complex", "mixed"]))
    if kind == "fresh":
        return draw(st.lists(FRESH, min_size=1, max_size=4, unique=True))
    if kind == "fresh_np":
        values = draw(st.lists(FRESH, min_size=1, max_size=4, unique=True))
        return np.array(values, dtype=draw(st.sampled_from(["int64", "uint64"])))
    if kind == "negative":
        return [draw(st.integers(-(2 ** 63), -1))]
    if kind == "huge":
        return [draw(st.sampled_from([2 ** 63, 2 ** 64 - 1, 2 ** 64, 10 ** 30]))]
    if kind == "dup":
        value = draw(FRESH)
        return [value, value]
    if kind == "float":
        return [draw(st.floats())]
    if kind == "str":
        return draw(st.sampled_from(["abc", ["1"], [b"1"]]))
    if kind == "bool":
        return [True]
    if kind == "empty":
        return draw(st.sampled_from([[], np.array([], dtype=np.int64), ()]))
    if kind == "2d":
        return [[draw(FRESH)]]
    if kind == "ragged":
        return [[draw(FRESH)], [1, 2]]
    if kind == "none":
        return None
    if kind == "scalar":
        return draw(st.one_of(st.sampled_from([True, 1.5, "7"]), FRESH))
    if kind == "object":
        return np.array([draw(FRESH)], dtype=object)
    if kind == "complex":
        return np.array([1 + 1j])
    return [draw(FRESH), "x"]


def attribute_value(kind: str):
    good = {"int": st.integers(-(2 ** 63), 2 ** 63 - 1), "float": st.floats(-1e6, 1e6),
            "keyword": st.text(max_size=6), "keywords": st.lists(st.text(max_size=4), max_size=3),
            "bool": st.booleans()}[kind]
    return st.one_of(good, good, odd_values)


attribute_dicts = st.dictionaries(
    st.one_of(st.sampled_from(list(SCHEMA) + ["_note", "unknown", "__tenants", "$and", ""]), st.text(max_size=4)),
    st.one_of(*[attribute_value(kind) for kind in SCHEMA.values()]), max_size=4)


@st.composite
def attributes_arg(draw, n: int):
    kind = draw(st.sampled_from(["none", "dicts", "dicts", "wrong_len", "not_list", "items"]))
    if kind == "none":
        return None
    if kind == "dicts":
        return [draw(attribute_dicts) for _ in range(n)]
    if kind == "wrong_len":
        return [draw(attribute_dicts) for _ in range(n + 1)]
    if kind == "not_list":
        return draw(st.one_of(attribute_dicts, st.text(max_size=3), st.integers()))
    return [draw(odd_values) for _ in range(n)]


OPERATORS = ["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$and", "$or", "$not", "$nor",
             "$all", "$regex", "$where", "$size", "$contains", "$elemMatch", "gte", "$"]
filter_keys = st.one_of(st.sampled_from(list(SCHEMA) + OPERATORS + ["__tenants", "_note", "missing"]),
                        st.text(max_size=5))
filter_values = st.recursive(
    st.one_of(json_scalars, st.sampled_from(["en", "de", 2010, 2.5, True])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(filter_keys, inner, max_size=3)),
    max_leaves=10)
SCHEMA_VALUES = {"year": st.integers(1995, 2025), "score": st.floats(-5, 100),
                 "lang": st.sampled_from(["en", "de", "zz"]),
                 "tags": st.sampled_from(["t0", "t1", "zz"]), "ok": st.booleans()}
condition = st.sampled_from(sorted(SCHEMA)).flatmap(lambda name: st.fixed_dictionaries({name: st.one_of(
    SCHEMA_VALUES[name], json_scalars,
    st.dictionaries(st.sampled_from(["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists"]),
                    st.one_of(SCHEMA_VALUES[name], st.lists(SCHEMA_VALUES[name], max_size=3), json_scalars),
                    min_size=1, max_size=2))}))
near_valid_filters = st.recursive(condition, lambda inner: st.one_of(
    st.fixed_dictionaries({"$and": st.lists(inner, max_size=3)}),
    st.fixed_dictionaries({"$or": st.lists(inner, max_size=3)}),
    st.builds(lambda a, b: {**a, **b}, inner, inner)), max_leaves=4)
filters = st.one_of(near_valid_filters, near_valid_filters, st.dictionaries(filter_keys, filter_values, max_size=3),
                    filter_values,
                    st.sampled_from([{1: 2}, {"year": {"$in": {1}}}, {"year": (1, 2)}, {"$and": ({"year": 1},)},
                                     {"lang": {"$in": np.array(["en"])}}, {"year": np.int64(3)},
                                     {"year": {"$gte": np.float64("nan")}}, {"tags": {"$in": [[1]]}}]))


# ----------------------------------------------------------------------------- fixtures
def clustered(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, DIM)) * 4
    return (centres[rng.integers(0, 12, n)] + rng.standard_normal((n, DIM))).astype(np.float32)


def base_attributes(n: int) -> list[dict]:
    langs = ["en", "de", "fr"]
    return [{"year": 2000 + i % 20, "score": i / 7, "lang": langs[i % 3], "tags": [f"t{i % 4}"], "ok": i % 2 == 0}
            for i in range(n)]


QUERIES = clustered(3, seed=99)


class Baseline:
    """A database with one indexed collection (tombstones and an exact delta too) and its snapshot."""

    def __init__(self, path) -> None:
        self.path = str(path)
        self.db = tierstore.connect(self.path)
        self.col = self.db.create_collection("docs", dim=DIM, metric="l2", attributes=SCHEMA)
        self.col.add(np.arange(N_BASE), clustered(N_BASE), base_attributes(N_BASE))
        self.col.build_index(target_list_size=32)
        self.col.delete(np.arange(0, N_BASE, 29))
        self.col.add(np.arange(N_BASE, N_BASE + 30), clustered(30, seed=3), base_attributes(30))
        self.col.tenant("acme").add([N_BASE + 100, N_BASE + 101], clustered(2, seed=4))
        self.live_ids = {int(i) for i in range(N_BASE + 30) if i % 29 or i >= N_BASE} | {N_BASE + 100, N_BASE + 101}
        self.snapshot = self.take()

    def take(self) -> tuple:
        res = self.col.search(QUERIES, k=10)
        filtered = self.col.search(QUERIES, k=10, filter={"lang": "en"})
        return (self.col.count(), res.ids.tobytes(), res.distances.tobytes(), filtered.ids.tobytes(),
                self.db.list_collections(), self.col.tenant("acme").count())

    def assert_unchanged(self, why: object) -> None:
        assert self.take() == self.snapshot, f"the store changed after {why!r}"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    made = Baseline(tmp_path_factory.mktemp("fuzz-db"))
    yield made
    made.db.close()


# ----------------------------------------------------------------------------- tests
def test_connect_and_create_collection(base, tmp_path):
    tally = Tally("connect/create_collection")
    root = tmp_path / "sub"
    root.mkdir()

    @fuzz_settings(120)
    @given(name=names, dim=st.one_of(st.integers(-3, 70_000), st.sampled_from([0, 1, 65_536, 65_537, 2 ** 70]),
                                     st.floats(), st.booleans(), st.none(), st.text(max_size=2),
                                     st.sampled_from([np.int64(4), np.uint8(3), np.float32(4)])),
           metric=st.one_of(st.sampled_from(["l2", "ip", "cosine", "L2", "", "dot", None, 3]), st.text(max_size=4),
                            st.just(np.array(["l2", "ip"])), st.just(["l2"])),
           attributes=st.one_of(st.none(), st.dictionaries(st.one_of(st.text(max_size=6), st.integers(), st.none()),
                                                           st.one_of(st.sampled_from(["int", "float", "keyword",
                                                                                      "keywords", "bool", "str",
                                                                                      "INT", ""]), odd_values),
                                                           max_size=3),
                                st.lists(st.text(max_size=3), max_size=2), st.text(max_size=3),
                                st.just({"a": np.array(["int", "bool"])})))
    def run(name, dim, metric, attributes):
        before = base.db.list_collections()
        col, err = tally.call(base.db.create_collection, name, dim, metric, attributes=attributes)
        if err is None:
            assert name in base.db.list_collections() and isinstance(name, str)
            assert col.dim == int(dim) and col.metric == metric and col.count() == 0
            base.db.drop_collection(name)
        assert base.db.list_collections() == before
        base.assert_unchanged(("create_collection", name, dim, metric, attributes))

    @fuzz_settings(50)
    @given(name=st.one_of(st.sampled_from(ODD_NAMES), st.text(max_size=30)),
           options=st.dictionaries(st.sampled_from(["memory_cache", "flush_rows", "auto_index_rows", "map_size",
                                                    "s3_options", "bogus"]), odd_values, max_size=2))
    def run_connect(name, options):
        if ".." in name or name.startswith("/"):
            uri = str(root / name.lstrip("/").replace("..", "dd"))
        elif "://" in name:
            uri = name
        else:
            uri = str(root / name) if name else name
        db, err = tally.call(tierstore.connect, uri, **options)
        if err is None:
            try:
                assert db.list_collections() == []
            finally:
                db.close()

    run()
    run_connect()
    for uri in ["", "s3://", "s3:///prefix", "ftp://host/x", str(root / "a\x00b"), str(root / ("n" * 300))]:
        db, err = tally.call(tierstore.connect, uri)
        assert err is not None, f"connect({uri!r}) should be refused"
    tally.report(170)


def test_add_rejects_or_stores_exactly(base):
    tally = Tally("col.add")

    @fuzz_settings(300)
    @given(data=st.data())
    def run(data):
        if data.draw(st.integers(0, 3)) == 0:  # well-formed, odd only in dtype and values: must be stored
            ids = data.draw(st.lists(FRESH, min_size=1, max_size=4, unique=True))
            dtype = data.draw(st.sampled_from(["float32", "float64", "float16", "int32", "uint8"]))
            vectors = (np.random.default_rng(len(ids)).standard_normal((len(ids), DIM)) * 4).astype(dtype)
            attributes = data.draw(st.one_of(st.none(), st.just([{"year": 1999, "lang": "xx", "_note": [1, "a"]}]
                                                                 * len(ids))))
        else:
            ids = data.draw(ids_arg())
            n = len(ids) if isinstance(ids, (list, tuple, np.ndarray)) and len(ids) and not isinstance(ids[0], list) \
                else 1
            vectors = data.draw(vectors_arg(n))
            attributes = data.draw(attributes_arg(n))
        added, err = tally.call(base.col.add, ids, vectors, attributes)
        if err is not None:
            base.assert_unchanged(("add", ids, vectors, attributes))
            return
        wanted = np.atleast_1d(np.asarray(ids)).astype(np.int64)
        assert added == wanted.size and (wanted >= 10 ** 6).all()
        rows = base.col.get(wanted)
        expected = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        for row, want in zip(rows, expected):
            assert row is not None and np.array_equal(row["vector"], want)
        assert base.col.delete(wanted) == wanted.size
        base.assert_unchanged(("add then delete", ids))

    run()
    tally.report(300)


def test_search_args(base):
    tally = Tally("col.search")

    @fuzz_settings(300)
    @given(x=st.one_of(arrays(cols=DIM), st.just(QUERIES), st.just(QUERIES[0]), st.just(QUERIES.astype(np.float16)),
                       st.just(QUERIES.tolist()), st.just(np.zeros(DIM)), st.lists(json_scalars, max_size=DIM)),
           k=st.one_of(st.integers(1, 40), st.integers(-3, 50),
                       st.sampled_from([0, 2 ** 20, 2 ** 20 + 1, 10 ** 9, 2 ** 31, 2 ** 63 - 1,
                                        2 ** 64, -(2 ** 63)]),
                       st.floats(), st.booleans(), st.none(), st.just("10"),
                       st.sampled_from([np.int64(5), np.uint64(2 ** 64 - 1), np.int8(-1), np.float32(3)])),
           params=st.dictionaries(st.sampled_from(["nprobe", "rerank", "prune_ratio", "nprob", "filters", "executor",
                                                   "explain"]),
                                  st.one_of(st.integers(-2, 10 ** 6), st.floats(), odd_values), max_size=2))
    def run(x, k, params):
        res, err = tally.call(base.col.search, x, k, **params)
        if err is None:
            nq = 1 if np.ndim(x) == 1 else len(x)
            assert res.ids.shape == res.distances.shape == (nq, int(k))
            found = set(res.ids.ravel().tolist()) - {-1}
            assert found <= base.live_ids
        base.assert_unchanged(("search", k, params))

    run()
    tally.report(300)


def test_search_with_malformed_filters(base):
    tally = Tally("col.search(filter=...)")
    attributes = {row["id"]: row["attributes"] for row in base.col.get(sorted(base.live_ids), include_vectors=False)}

    @fuzz_settings(500)
    @given(flt=filters, tenant=st.booleans())
    def run(flt, tenant):
        target = base.col.tenant("acme") if tenant else base.col
        res, err = tally.call(target.search, QUERIES, 5, filter=flt)
        if err is None:
            assert res.ids.shape[0] == len(QUERIES) and res.ids.shape[1] <= 5
            found = set(res.ids.ravel().tolist()) - {-1}
            assert found <= base.live_ids
            if tenant:
                assert found <= {N_BASE + 100, N_BASE + 101}
            if isinstance(flt, dict) and len(flt) == 1:  # one condition on one attribute: check what matched
                (name, want), = flt.items()
                if name in ("lang", "year", "ok") and isinstance(want, (str, int)) and not isinstance(want, float):
                    assert all((attributes[i] or {}).get(name) == want for i in found), (flt, found)
                if name == "year" and isinstance(want, dict) and set(want) == {"$gte"} \
                        and type(want["$gte"]) is int:
                    assert all((attributes[i] or {}).get("year", -1) >= want["$gte"] for i in found), (flt, found)
        base.assert_unchanged(("filter", flt))

    run()
    tally.report(500)


def test_get_delete_and_tenants(base):
    tally = Tally("col.get/delete/tenant")

    @fuzz_settings(250)
    @given(ids=ids_arg(), tenant=st.one_of(names, st.text(min_size=250, max_size=260)),
           op=st.sampled_from(["get", "delete", "tenant_count", "tenant_search", "tenant_delete", "tenant_filter"]))
    def run(ids, tenant, op):
        if op == "get":
            rows, err = tally.call(base.col.get, ids)
            if err is None:
                assert all(r is None for r in rows)  # no fuzzed id is stored
        elif op == "delete":
            deleted, err = tally.call(base.col.delete, ids)
            assert err is not None or deleted == 0
        else:
            handle, err = tally.call(base.col.tenant, tenant)
            if err is None:
                if op == "tenant_count":
                    count, _ = tally.call(handle.count)
                    assert count in (None, 2 if tenant == "acme" else 0)
                elif op == "tenant_search":
                    res, _ = tally.call(handle.search, QUERIES, 4)
                    if res is not None:
                        assert set(res.ids.ravel().tolist()) <= ({N_BASE + 100, N_BASE + 101, -1}
                                                                 if tenant == "acme" else {-1})
                elif op == "tenant_delete":
                    deleted, err = tally.call(handle.delete, ids)
                    assert err is not None or deleted == 0
                else:  # the tenant's search with an id-shaped filter: never another tenant's rows
                    res, _ = tally.call(handle.search, QUERIES, 4, filter={"year": {"$in": [ids]}})
                    assert res is None or set(res.ids.ravel().tolist()) <= {N_BASE + 100, N_BASE + 101, -1}
        base.assert_unchanged((op, ids, tenant))

    run()
    tally.report(250)


# ----------------------------------------------------------------------------- KV store
def test_kv_store_rejects_bad_tokens_and_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    tally = Tally("kv put/get")
    layers, heads, head_dim, tokens = 2, 2, 4, 16
    gen = torch.Generator().manual_seed(0)
    good = [(torch.randn(heads, tokens, head_dim, generator=gen), torch.randn(heads, tokens, head_dim, generator=gen))
            for _ in range(layers)]
    base_tokens = list(range(tokens))
    with tierstore.connect(str(tmp_path / "kv")) as db:
        kv = db.kv_cache(model="fuzz/model", revision="r1", codec="fp16", chunk_tokens=8)
        assert kv.put(base_tokens, good) == 2

        def snapshot():
            got = kv.get(base_tokens)
            return sorted(db.tier.list("")), [(k.numpy().tobytes(), v.numpy().tobytes()) for k, v in got]

        before = snapshot()

        @st.composite
        def tensors(draw):
            kind = draw(st.sampled_from(["good", "shape", "dtype", "layers", "mismatch", "odd", "nan"]))
            n = draw(st.sampled_from([tokens, 1, 8, 9, 0, 40]))
            dtype = torch.float32
            shape = (heads, n, head_dim)
            if kind == "shape":
                shape = draw(st.sampled_from([(heads, n), (heads, n, head_dim, 1), (heads + 1, n, head_dim),
                                              (heads, n, head_dim + 3), ()]))
            if kind == "dtype":
                dtype = draw(st.sampled_from([torch.int64, torch.bool, torch.complex64, torch.float64, torch.uint8,
                                              torch.bfloat16, torch.float16]))
            if kind == "odd":
                return draw(st.one_of(odd_values, st.just([]), st.just([(None, None)]), st.just([good[0]]),
                                      st.just(np.zeros((heads, n, head_dim), np.float32))))
            make = (lambda: torch.ones(shape, dtype=dtype)) if dtype.is_complex or dtype == torch.bool else \
                (lambda: (torch.randn(shape, generator=gen) * 3).to(dtype))
            count = draw(st.sampled_from([1, 3, layers])) if kind == "layers" else layers
            pairs = [(make(), make()) for _ in range(count)]
            if kind == "mismatch":
                pairs[-1] = (pairs[-1][0], torch.randn(heads, n + 1, head_dim))
            if kind == "nan" and shape[1]:
                pairs[0][0][0, 0, 0] = float("nan")
            return pairs

        @fuzz_settings(150)
        @given(token_ids=st.one_of(ids_arg(), st.just(torch.tensor([[10 ** 6 + 1, 10 ** 6 + 2]])),
                                   st.just(torch.tensor([1.5]))),
               pkv=tensors(), op=st.sampled_from(["put", "put", "get", "lookup"]),
               get_options=st.dictionaries(st.sampled_from(["layers", "format", "dtype", "device", "position"]),
                                           st.one_of(st.sampled_from([[0], [5], [-1], "batched", "dynamic_cache",
                                                                      "float16", "int8", "cpu", "bogus", "meta",
                                                                      0, 3]), odd_values), max_size=2))
        def run(token_ids, pkv, op, get_options):
            if op == "put":
                written, err = tally.call(kv.put, token_ids, pkv)
                if err is None:
                    wanted = np.atleast_1d(np.asarray(token_ids)).astype(np.int64).ravel().tolist()
                    assert min(wanted) >= 10 ** 6  # the fuzzed ids that may be stored are fresh ones
                    try:
                        got = kv.get(wanted)
                        assert got is not None and len(got) == len(pkv)
                        for (k_in, v_in), (k_out, v_out) in zip(pkv, got):
                            n = len(wanted)  # the fp16 codec stores float16: compare after that rounding
                            assert torch.equal(k_out, k_in[:, :n].half().to(k_out.dtype), ) or \
                                torch.isnan(k_in).any()
                            assert torch.equal(v_out, v_in[:, :n].half().to(v_out.dtype))
                    finally:
                        assert kv.delete(wanted) == written
            elif op == "get":
                got, err = tally.call(kv.get, token_ids, **get_options)
                assert err is not None or got is None  # fresh or broken token ids: never a hit
            else:
                n, err = tally.call(kv.lookup_prefix, token_ids)
                assert err is not None or n == 0
            assert snapshot() == before, f"the KV store changed after {op} {token_ids!r}"

        run()
    tally.report(150)


# ----------------------------------------------------------------------------- Lambda handler
@pytest.fixture(scope="module")
def s3_search_event(moto_server):
    """A collection in S3 and one valid search event recorded from a fan-out search."""
    from tierstore.serverless import FanoutExecutor, InProcessInvoker, WorkerConfig

    prefix = f"fuzz/{uuid.uuid4().hex}"
    db = tierstore.connect(f"s3://{BUCKET}/{prefix}", endpoint_url=moto_server.endpoint_url)
    col = db.create_collection("docs", dim=DIM)
    col.add(np.arange(N_BASE), clustered(N_BASE))
    col.build_index(target_list_size=32)
    config = WorkerConfig(bucket=BUCKET, prefix=prefix, endpoint_url=moto_server.endpoint_url)
    recording = RecordingInvoker(InProcessInvoker(config))
    FanoutExecutor(recording, partitions=2, branching=2).search(col, QUERIES, 5)
    yield {"event": recording.events[0], "prefix": prefix, "endpoint": moto_server.endpoint_url}
    db.close()


def b64(arr: np.ndarray) -> str:
    return base64.b64encode(arr.tobytes()).decode("ascii")


@st.composite
def mutated_events(draw, valid: dict):
    event = json.loads(json.dumps(valid))
    kind = draw(st.sampled_from(["whole", "field", "field", "drop", "extra", "array", "array", "scan", "children",
                                 "selection", "keys"]))
    if kind == "whole":
        return draw(st.one_of(json_like, odd_values))
    fields = sorted(event)
    if kind == "field":
        event[draw(st.sampled_from(fields))] = draw(st.one_of(json_like, st.sampled_from([2 ** 40, -1, 0, ""])))
    elif kind == "drop":
        del event[draw(st.sampled_from(fields))]
    elif kind == "extra":
        event[draw(st.text(max_size=5))] = draw(json_like)
    elif kind == "array":
        name = draw(st.sampled_from(["queries", "lists", "coarse"]))
        dtype = {"queries": "<f4", "lists": "<i8", "coarse": "<f4"}[name]
        size = np.frombuffer(base64.b64decode(event[name]), dtype=dtype).size
        size = draw(st.sampled_from([size, size, size - 1, size + 1, 0]))
        rng = np.random.default_rng(draw(st.integers(0, 2 ** 31)))
        if dtype == "<i8":
            arr = rng.integers(draw(st.sampled_from([-5, -(2 ** 62), 0])), draw(st.sampled_from([2, 400, 2 ** 62])),
                               max(size, 0)).astype(dtype)
        else:
            arr = (rng.standard_normal(max(size, 0)) * draw(st.sampled_from([1.0, 1e30]))).astype(dtype)
            if arr.size and draw(st.booleans()):
                arr[0] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        event[name] = draw(st.sampled_from([b64(arr), b64(arr)[:-2], "!!notbase64", b64(arr) + "="]))
    elif kind == "scan":
        event["scan"] = draw(st.lists(st.fixed_dictionaries(
            {"partition": st.one_of(st.integers(-2, 4), json_scalars),
             "queries": st.one_of(st.builds(lambda v: b64(np.array(v, "<i4")), st.lists(st.integers(-3, 5),
                                                                                          max_size=4)),
                                  json_scalars)}), max_size=3))
    elif kind == "children":
        event["children"] = draw(st.lists(st.fixed_dictionaries(
            {"node": st.one_of(st.integers(-1, 3), json_scalars),
             "take": st.builds(lambda v: b64(np.array(v, "<i4")), st.lists(st.integers(-2, 4), max_size=3)),
             "scan": st.one_of(st.just([]), json_like), "children": st.one_of(st.just([]), json_like)}), max_size=2))
    elif kind == "selection":
        event["selection"] = draw(st.one_of(json_like, st.fixed_dictionaries(
            {"size": st.integers(-1, 2 ** 41), "rows": st.one_of(st.text(max_size=8), st.just(b64(np.arange(3))))}),
            st.fixed_dictionaries({"size": st.integers(0, 100), "bitmap": st.sampled_from(["eJwDAAAAAAE=", "AAAA"])})))
    else:
        event[draw(st.sampled_from(["index", "bucket", "prefix", "digest"]))] = draw(st.one_of(
            st.sampled_from(["collections/../x", "../../etc/passwd", "collections/docs/none", "/collections/x",
                             "collections/\x00", "other-bucket", "", "collections/docs"]), st.text(max_size=10)))
    return event


def test_lambda_handler_rejects_malformed_events(s3_search_event, monkeypatch):
    from tierstore.serverless import handler as handler_module

    tally = Tally("lambda_handler")
    valid = s3_search_event["event"]
    monkeypatch.setenv("TIERSTORE_BUCKET", BUCKET)
    monkeypatch.setenv("TIERSTORE_PREFIX", s3_search_event["prefix"])
    monkeypatch.setenv("TIERSTORE_S3_ENDPOINT", s3_search_event["endpoint"])
    monkeypatch.setenv("TIERSTORE_CACHE_DIR", "")
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME", raising=False)
    monkeypatch.setattr(handler_module, "_WORKER", None)
    reference, err = tally.call(handler_module.lambda_handler, valid, None)
    assert err is None and reference["nq"] == len(QUERIES)

    @fuzz_settings(300)
    @given(data=st.data())
    def run(data):
        event = data.draw(mutated_events(valid))
        out, err = tally.call(handler_module.lambda_handler, event, None)
        if err is None:
            assert isinstance(out, dict) and out.get("v") == 1
            json.dumps(out, allow_nan=False)  # what Lambda would send back
        else:
            # ConfigError: an event with sub-trees reached a worker that has no function to invoke
            # (AWS_LAMBDA_FUNCTION_NAME unset here); NotFound: a well-formed key that is not there.
            assert isinstance(err, (EventError, tierstore.NotFound, tierstore.ConfigError)), \
                f"{type(err).__name__}: {err}"
        again, err = tally.call(handler_module.lambda_handler, valid, None)
        assert err is None and again["rows"] == reference["rows"], "a bad event changed the warm worker's answers"

    run()
    tally.report(600)


# ----------------------------------------------------------------------------- corrupted blobs
@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A closed LMDB database with an indexed collection, WAL records, a checkpoint and KV chunks."""
    torch = pytest.importorskip("torch")
    path = tmp_path_factory.mktemp("fuzz-stored") / "db"
    with tierstore.connect(str(path)) as db:
        col = db.create_collection("docs", dim=DIM, attributes=SCHEMA)
        col.add(np.arange(300), clustered(300), base_attributes(300))
        col.build_index(target_list_size=32)
        col.add(np.arange(300, 320), clustered(20, seed=5), base_attributes(20))
        col.delete([1, 2, 3])
        col.flush()
        col.add(np.arange(320, 330), clustered(10, seed=6))  # in the WAL until close checkpoints it
        col.delete([4])
        kv = db.kv_cache(model="fuzz/model", revision="r1", codec="int8", chunk_tokens=8)
        kv.put(list(range(16)), [(torch.randn(2, 16, 4), torch.randn(2, 16, 4)) for _ in range(2)])
    with tierstore.connect(str(path)) as db:
        col = db.collection("docs")
        live = sorted(set(range(330)) - {1, 2, 3, 4})
        expected = (col.count(), col.search(QUERIES, k=10).ids.tobytes(),
                    [r["vector"].tobytes() for r in col.get(live)])
    tier = LmdbTier(os.path.join(str(path), "tierstore.lmdb"))
    values = {key: tier.get(key) for key in tier.list("")}
    tier.close()
    yield {"path": path, "values": values, "expected": expected, "live": live}


@st.composite
def damage(draw, data: bytes):
    kind = draw(st.sampled_from(["flip", "flip", "truncate", "extend", "zero", "splice"]))
    buf = bytearray(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(buf) - 1))
            buf[at] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        del buf[draw(st.integers(0, len(buf) - 1)):]
    elif kind == "extend":
        buf += draw(st.binary(min_size=1, max_size=64))
    elif kind == "zero":
        start = draw(st.integers(0, len(buf) - 1))
        end = min(len(buf), start + draw(st.integers(1, 64)))
        if not any(buf[start:end]):
            buf[start] = 1
        else:
            buf[start:end] = bytes(end - start)
    else:
        start = draw(st.integers(0, len(buf) - 1))
        buf[start:start] = draw(st.binary(min_size=1, max_size=16))
    if bytes(buf) == data:  # two flips of one byte cancelled out
        buf[0] ^= 0x01
    return kind, bytes(buf)


def test_decode_blob_rejects_damaged_values(stored):
    tally = Tally("decode_blob")
    blobs = {}
    for key, value in stored["values"].items():
        try:
            decode_blob(value, source=key)
        except CorruptData:
            continue
        blobs[key] = value
    assert len(blobs) >= 0.9 * len(stored["values"]), "most stored values should be framed blobs"

    @fuzz_settings(600)
    @given(data=st.data())
    def run(data):
        key = data.draw(st.sampled_from(sorted(blobs)))
        _, damaged = data.draw(damage(blobs[key]))
        _, err = tally.call(decode_blob, damaged, source=key)
        assert isinstance(err, CorruptData), f"damaged {key} decoded as data"

    run()
    tally.report(600)


def test_reopening_damaged_store_raises_corrupt_data(stored, tmp_path):
    tally = Tally("reopen damaged store")
    keys = sorted(k for k in stored["values"] if k.startswith("collections/docs/"))
    assert any("/manifest/" in k for k in keys) and any("/vec/" in k for k in keys)
    count = 0

    @fuzz_settings(60)
    @given(data=st.data())
    def run(data):
        nonlocal count
        count += 1
        key = data.draw(st.sampled_from(keys))
        how, damaged = data.draw(damage(stored["values"][key]))
        copy = tmp_path / f"copy{count}"
        shutil.copytree(stored["path"], copy)
        tier = LmdbTier(os.path.join(str(copy), "tierstore.lmdb"))
        tier.put(key, damaged)
        tier.close()

        def reopen_and_read():
            with tierstore.connect(str(copy)) as db:
                col = db.collection("docs")
                return (col.count(), col.search(QUERIES, k=10).ids.tobytes(),
                        [r["vector"].tobytes() for r in col.get(stored["live"])])

        got, err = tally.call(reopen_and_read)
        if err is None:
            assert got == stored["expected"], f"{how} of {key} returned wrong data"
        else:
            assert isinstance(err, CorruptData), f"{how} of {key}: {type(err).__name__}: {err}"
        shutil.rmtree(copy)

    run()
    tally.report(60)
