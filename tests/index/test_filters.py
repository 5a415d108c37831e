"""Metadata filters: every operator against a plain-Python reference, errors that name the part, columns' bytes."""

from __future__ import annotations

import math
import time
from dataclasses import FrozenInstanceError

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierstore.errors import CorruptData, FilterError, InvalidArgument, InvalidType
from tierstore.index.filters import MAX_DEPTH, AttributeColumns, MatchAll, parse_filter
from tierstore.store.blob import decode_blob, encode_blob

SCHEMA = {"year": "int", "score": "float", "draft": "bool", "section": "keyword", "tags": "keywords"}
INTS = [-2, 0, 1, 3, 2**40]
FLOATS = [-1.5, 0.0, 0.25, 3.0, 1e300]
WORDS = ["a", "b", "c", "é", ""]
ABSENT_WORD = "not-in-any-row"


# ------------------------------------------------------------------ reference
def reference(spec: dict, row: dict | None) -> bool:
    """What the filter means, written out directly over one row's dict."""
    row = row or {}
    return all(_reference_clause(key, value, row) for key, value in spec.items())


def _reference_clause(key: str, value, row: dict) -> bool:
    if key == "$and":
        return all(reference(item, row) for item in value)
    if key == "$or":
        return any(reference(item, row) for item in value)
    operators = value if isinstance(value, dict) else {"$eq": value}
    return all(_reference_op(SCHEMA[key], op, operand, row.get(key)) for op, operand in operators.items())


def _reference_op(kind: str, op: str, operand, value) -> bool:
    if kind == "keywords":
        tags = set(value or ())
        wanted = set(operand) if isinstance(operand, list) else {operand}
        return {"$eq": bool(tags & wanted), "$in": bool(tags & wanted),
                "$ne": not tags & wanted, "$nin": not tags & wanted}[op]
    if value is None:
        return op in ("$ne", "$nin")
    return {"$eq": lambda: value == operand, "$ne": lambda: value != operand,
            "$gt": lambda: value > operand, "$gte": lambda: value >= operand,
            "$lt": lambda: value < operand, "$lte": lambda: value <= operand,
            "$in": lambda: value in operand, "$nin": lambda: value not in operand}[op]()


# ------------------------------------------------------------------ data
def random_rows(seed: int, count: int) -> list[dict | None]:
    rng = np.random.default_rng(seed)
    rows: list[dict | None] = []
    for _ in range(count):
        if rng.random() < 0.05:
            rows.append(None)
            continue
        row: dict = {}
        if rng.random() < 0.8:
            row["year"] = int(rng.choice(INTS))
        if rng.random() < 0.8:
            row["score"] = float(rng.choice(FLOATS)) if rng.random() < 0.7 else int(rng.choice(INTS[:4]))
        if rng.random() < 0.8:
            row["draft"] = bool(rng.random() < 0.5)
        elif rng.random() < 0.5:
            row["draft"] = None
        if rng.random() < 0.8:
            row["section"] = str(rng.choice(WORDS))
        if rng.random() < 0.8:
            row["tags"] = [str(word) for word in rng.choice(WORDS, size=int(rng.integers(0, 4)))]
        if rng.random() < 0.1:
            row["unrelated"] = {"not": "in the schema"}
        rows.append(row)
    return rows


ROWS = random_rows(0, 400)
COLUMNS = AttributeColumns.build(SCHEMA, ROWS)

_OPERATORS = {"int": ["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin"],
              "float": ["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin"],
              "bool": ["$eq", "$ne"], "keyword": ["$eq", "$ne", "$in", "$nin"],
              "keywords": ["$eq", "$ne", "$in", "$nin"]}
_POOLS = {"int": st.sampled_from(INTS + [5, -100]),
          "float": st.sampled_from(FLOATS + [2, -7, 1.0000001]),
          "bool": st.booleans(),
          "keyword": st.sampled_from(WORDS + [ABSENT_WORD]),
          "keywords": st.sampled_from(WORDS + [ABSENT_WORD])}


@st.composite
def conditions(draw) -> dict:
    name = draw(st.sampled_from(sorted(SCHEMA)))
    kind = SCHEMA[name]
    op = draw(st.sampled_from(_OPERATORS[kind]))
    if op in ("$in", "$nin"):
        operand = draw(st.lists(_POOLS[kind], min_size=1, max_size=4))
    else:
        operand = draw(_POOLS[kind])
    if op == "$eq" and draw(st.booleans()):
        return {name: operand}
    return {name: {op: operand}}


def _merge(parts: list[dict]) -> dict:
    """Several conditions at one level (an implicit AND); keys that collide nest in $and."""
    merged: dict = {}
    for part in parts:
        ((key, value),) = part.items()
        if key in merged:
            return {"$and": parts}
        merged[key] = value
    return merged


filters = st.recursive(
    conditions(),
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=3).map(lambda items: {"$and": items}),
        st.lists(children, min_size=1, max_size=3).map(lambda items: {"$or": items}),
        st.lists(conditions(), min_size=2, max_size=3).map(_merge),
        st.just({}),
    ),
    max_leaves=8,
)


# ------------------------------------------------------------------ semantics
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=filters, subset=st.lists(st.integers(0, len(ROWS) - 1), max_size=30))
def test_random_filters_match_the_reference(spec, subset):
    parsed = parse_filter(spec, SCHEMA)
    expected = np.array([reference(spec, row) for row in ROWS])
    got = parsed.evaluate(COLUMNS)
    assert got.dtype == bool and got.shape == (len(ROWS),)
    np.testing.assert_array_equal(got, expected, err_msg=parsed.describe())
    np.testing.assert_array_equal(parsed.evaluate(COLUMNS, np.array(subset, np.int64)), expected[subset])
    assert parsed.attributes() <= set(SCHEMA)


@pytest.mark.parametrize("kind", sorted(_OPERATORS))
def test_every_operator_of_every_type(kind):
    name = next(key for key, value in SCHEMA.items() if value == kind)
    operand_pool = {"int": [1, 3], "float": [0.25, 3], "bool": [True], "keyword": ["a", ABSENT_WORD],
                    "keywords": ["b", "é"]}[kind]
    for op in _OPERATORS[kind]:
        operand = operand_pool if op in ("$in", "$nin") else operand_pool[0]
        spec = {name: {op: operand}}
        expected = [reference(spec, row) for row in ROWS]
        assert 0 < sum(expected) < len(ROWS), spec  # the data exercise both outcomes
        assert parse_filter(spec, SCHEMA).evaluate(COLUMNS).tolist() == expected, spec


def test_missing_values_follow_pinecone():
    rows = [{}, None, {"year": None, "draft": None, "section": None, "tags": None}, {"tags": []}]
    columns = AttributeColumns.build(SCHEMA, rows)
    for spec, matches in [({"year": 1}, False), ({"year": {"$ne": 1}}, True), ({"year": {"$gt": -5}}, False),
                          ({"year": {"$lte": 5}}, False), ({"year": {"$in": [0, 1]}}, False),
                          ({"year": {"$nin": [0, 1]}}, True), ({"score": {"$lt": 1.0}}, False),
                          ({"score": {"$ne": 0.0}}, True), ({"draft": False}, False),
                          ({"draft": {"$ne": True}}, True), ({"section": ""}, False),
                          ({"section": {"$nin": ["a"]}}, True), ({"tags": "a"}, False),
                          ({"tags": {"$ne": "a"}}, True), ({"tags": {"$nin": ["a"]}}, True)]:
        assert parse_filter(spec, SCHEMA).evaluate(columns).tolist() == [matches] * 4, spec


def test_tags_contain_semantics():
    rows = [{"tags": ["a", "b"]}, {"tags": ["c"]}, {"tags": ("b", "b")}, {"tags": {"d", "a"}}, {}]
    columns = AttributeColumns.build({"tags": "keywords"}, rows)

    def match(spec):
        return parse_filter(spec, {"tags": "keywords"}).evaluate(columns).tolist()

    assert match({"tags": "a"}) == [True, False, False, True, False]
    assert match({"tags": {"$ne": "b"}}) == [False, True, False, True, True]
    assert match({"tags": {"$in": ["c", "d"]}}) == [False, True, False, True, False]
    assert match({"tags": {"$nin": ["a", "c"]}}) == [False, False, True, False, True]
    assert match({"tags": {"$in": ["zzz"]}}) == [False] * 5
    assert match({"tags": {"$eq": "a", "$ne": "b"}}) == [False, False, False, True, False]


def test_numbers_compare_exactly():
    rows = [{"year": 2**62 + 1, "score": 1}, {"year": 2**62, "score": 0.1}, {"year": -(2**63), "score": -0.0}]
    columns = AttributeColumns.build(SCHEMA, rows)
    assert parse_filter({"year": {"$gt": 2**62}}, SCHEMA).evaluate(columns).tolist() == [True, False, False]
    assert parse_filter({"year": -(2**63)}, SCHEMA).evaluate(columns).tolist() == [False, False, True]
    assert parse_filter({"score": 1}, SCHEMA).evaluate(columns).tolist() == [True, False, False]
    assert parse_filter({"score": 0.0}, SCHEMA).evaluate(columns).tolist() == [False, False, True]


def test_long_in_lists_use_the_same_semantics():
    values = list(range(-50, 50, 3))  # more values than the equality loop handles
    spec = {"year": {"$in": values + INTS}, "section": {"$nin": WORDS[:2] + [f"w{i}" for i in range(40)]}}
    expected = [reference(spec, row) for row in ROWS]
    assert parse_filter(spec, SCHEMA).evaluate(COLUMNS).tolist() == expected
    tags = {"tags": {"$in": [f"w{i}" for i in range(40)] + ["c"]}}
    assert parse_filter(tags, SCHEMA).evaluate(COLUMNS).tolist() == [reference(tags, row) for row in ROWS]


def test_empty_filter_matches_everything():
    parsed = parse_filter({}, SCHEMA)
    assert parsed == MatchAll() and parsed.attributes() == frozenset()
    assert parsed.evaluate(COLUMNS).all()
    assert parse_filter({"$or": [{}, {"year": 1}]}, SCHEMA).evaluate(COLUMNS).all()
    assert parse_filter({}, {}).evaluate(AttributeColumns.build({}, [None, {"x": 1}])).tolist() == [True, True]


def test_parsed_filters_are_immutable_values_with_readable_text():
    spec = {"$or": [{"year": {"$gte": 2020, "$lt": 2024}}, {"tags": {"$in": ["a", "b"]}, "draft": False}],
            "section": {"$nin": ["x"] * 12}}
    parsed = parse_filter(spec, SCHEMA)
    assert parsed == parse_filter(spec, SCHEMA) and hash(parsed) == hash(parse_filter(spec, SCHEMA))
    assert parsed.attributes() == {"year", "tags", "draft", "section"}
    assert str(parsed) == ("((year >= 2020 AND year < 2024) OR (tags CONTAINS ANY ['a', 'b'] AND draft = False)) "
                           "AND section NOT IN ['x', 'x', 'x', 'x', 'x', 'x', 'x', 'x', 'x', 'x', ... (+2)]")
    with pytest.raises(FrozenInstanceError):
        parsed.children = ()


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("spec, where", [
    ([("year", 1)], "filter: a filter must be a dict"),
    (None, "filter: a filter must be a dict"),
    ({"yeer": 1}, "yeer: unknown attribute 'yeer'"),
    ({"$and": [{"year": 1}, {"nope": {"$gt": 1}}]}, "$and[1].nope: unknown attribute"),
    ({"$and": [{}, {"year": {"$gte": "2020"}}]}, "$and[1].year.$gte: int attribute 'year' needs an int, got str"),
    ({"year": True}, "year: int attribute 'year' needs an int, got bool"),
    ({"year": 2020.0}, "year: int attribute 'year' needs an int, got float"),
    ({"year": 2**63}, "year: int attribute 'year' 9223372036854775808 is outside the int64 range"),
    ({"score": {"$lt": math.nan}}, "score.$lt: float attribute 'score' needs a finite number"),
    ({"score": {"$in": [1.0, math.inf]}}, "score.$in[1]: float attribute 'score' needs a finite number"),
    ({"score": {"$gt": 10**400}}, "score.$gt: float attribute 'score' needs a finite number"),
    ({"score": False}, "score: float attribute 'score' needs a number, got bool"),
    ({"draft": 1}, "draft: bool attribute 'draft' needs a bool, got int"),
    ({"section": 8}, "section: keyword attribute 'section' needs a str, got int"),
    ({"tags": {"$in": ["a", None]}}, "tags.$in[1]: keywords attribute 'tags' needs a str, got NoneType"),
    ({"year": {"$regex": "x"}}, "year.$regex: '$regex' is not an operator for int attribute 'year'"),
    ({"year": {"gte": 1}}, "year.gte: 'gte' is not an operator for int attribute"),
    ({"section": {"$gt": "a"}}, "section.$gt: '$gt' does not apply to keyword attribute 'section'"),
    ({"draft": {"$in": [True]}}, "draft.$in: '$in' does not apply to bool attribute 'draft'"),
    ({"tags": {"$lte": "a"}}, "tags.$lte: '$lte' does not apply to keywords attribute"),
    ({"$not": {"year": 1}}, "$not: unknown operator '$not'"),
    ({"year": {"$in": 2020}}, "year.$in: $in needs a non-empty list of values, got int"),
    ({"year": {"$nin": "abc"}}, "year.$nin: $nin needs a non-empty list of values, got str"),
    ({"year": {"$in": []}}, "year.$in: $in needs a non-empty list"),
    ({"year": {"$in": list(range(10_001))}}, "year.$in: $in has 10001 values; the limit is 10000"),
    ({"year": [1, 2]}, "year: a list is not a value; to match any of several write {'year': {'$in': [...]}}"),
    ({"year": {}}, "year: empty operator dict"),
    ({"$and": []}, "$and: $and needs a non-empty list of filters"),
    ({"$or": {"year": 1}}, "$or: $or needs a non-empty list of filters, got dict"),
    ({"$or": [{"year": 1}, "year"]}, "$or[1]: a filter must be a dict, got str"),
    ({1: 2}, "filter: keys must be str, got int"),
    ({"year": {1: 2}}, "year: operator keys must be str, got int"),
])
def test_malformed_filters_name_the_offending_part(spec, where):
    with pytest.raises(FilterError) as info:
        parse_filter(spec, SCHEMA)
    assert str(info.value).startswith(where)
    assert isinstance(info.value, InvalidArgument) and isinstance(info.value, ValueError)


def test_depth_and_size_bombs_are_refused_quickly():
    bomb: dict = {"year": 1}
    for _ in range(100_000):  # far deeper than Python's recursion limit
        bomb = {"$and": [bomb]}
    with pytest.raises(FilterError, match=f"deeper than {MAX_DEPTH} levels"):
        parse_filter(bomb, SCHEMA)
    deep_ok: dict = {"year": 1}
    for _ in range(MAX_DEPTH):
        deep_ok = {"$or": [deep_ok]}
    assert parse_filter(deep_ok, SCHEMA).evaluate(COLUMNS).tolist() == [reference({"year": 1}, r) for r in ROWS]
    started = time.perf_counter()
    for wide in ({"$or": [{"year": 1}] * 1_000_000}, {"$and": [{}] * 1_000_000}):
        with pytest.raises(FilterError, match="more than 1000 conditions"):
            parse_filter(wide, SCHEMA)
    assert time.perf_counter() - started < 1.0


def test_a_filter_only_evaluates_against_its_schema():
    parsed = parse_filter({"section": "a"}, SCHEMA)
    with pytest.raises(FilterError, match="'section' is not a keyword column"):
        parsed.evaluate(AttributeColumns.build({"section": "int"}, [{"section": 1}]))
    with pytest.raises(FilterError, match="'section' is not a keyword column"):
        parsed.evaluate(AttributeColumns.build({"year": "int"}, [{"year": 1}]))
    with pytest.raises(InvalidArgument, match=r"in \[0, 400\)"):
        parsed.evaluate(COLUMNS, [0, 400])
    with pytest.raises(InvalidArgument, match="1-D array of ints"):
        parsed.evaluate(COLUMNS, [0.5])
    assert parsed.evaluate(COLUMNS, []).shape == (0,)


# ------------------------------------------------------------------ columns
@pytest.mark.parametrize("rows, error, where", [
    ([{"year": "2020"}], InvalidType, "rows[0]['year'] needs an int, got str"),
    ([{}, {"year": True}], InvalidType, "rows[1]['year'] needs an int, got bool"),
    ([{"year": 2**64}], InvalidArgument, "rows[0]['year'] 18446744073709551616 is outside the int64 range"),
    ([{"score": math.nan}], InvalidArgument, "rows[0]['score'] needs a finite number"),
    ([{"draft": "yes"}], InvalidType, "rows[0]['draft'] needs a bool"),
    ([{"section": ["a"]}], InvalidType, "rows[0]['section'] needs a str, got list"),
    ([{"tags": "a"}], InvalidType, "rows[0]['tags'] needs a list of str tags, got str"),
    ([{"tags": ["a", 1]}], InvalidType, "rows[0]['tags'] needs str tags, got int"),
    ([{}, 7], InvalidType, "rows[1] must be a dict or None, got int"),
])
def test_bad_rows_are_named(rows, error, where):
    with pytest.raises(error) as info:
        AttributeColumns.build(SCHEMA, rows)
    assert str(info.value).startswith(where)


def test_bad_schemas_are_refused():
    with pytest.raises(InvalidArgument, match="has type 'text'"):
        AttributeColumns.build({"x": "text"}, [])
    with pytest.raises(InvalidArgument, match="not starting with"):
        parse_filter({}, {"$x": "int"})
    with pytest.raises(InvalidType):
        AttributeColumns.build(["x"], [])


def _same_columns(left: AttributeColumns, right: AttributeColumns) -> None:
    assert len(left) == len(right) and left.schema == right.schema
    for spec in [{"year": {"$gte": 0}}, {"score": {"$lt": 1}}, {"draft": True}, {"section": "a"},
                 {"tags": {"$in": ["b", "c"]}}, {"year": {"$ne": 3}}, {"tags": {"$nin": ["a"]}}]:
        parsed = parse_filter(spec, SCHEMA)
        np.testing.assert_array_equal(parsed.evaluate(left), parsed.evaluate(right), err_msg=str(spec))


def test_bytes_round_trip_exactly():
    data = COLUMNS.to_bytes()
    back = AttributeColumns.from_bytes(data)
    _same_columns(back, COLUMNS)
    assert back.to_bytes() == data
    empty = AttributeColumns.build(SCHEMA, [])
    assert len(AttributeColumns.from_bytes(empty.to_bytes())) == 0
    assert len(AttributeColumns.from_bytes(AttributeColumns.build({}, [None] * 3).to_bytes())) == 3


def test_damaged_bytes_are_corrupt_data():
    data = bytearray(COLUMNS.to_bytes())
    data[len(data) // 2] ^= 0x40
    with pytest.raises(CorruptData):
        AttributeColumns.from_bytes(bytes(data), source="k")
    with pytest.raises(CorruptData):
        AttributeColumns.from_bytes(COLUMNS.to_bytes()[:-3])


def _reframe(change) -> bytes:
    """Well-framed bytes (valid checksums) whose content ``change`` made inconsistent."""
    blob = decode_blob(COLUMNS.to_bytes())
    header = dict(blob.header)
    sections = {name: bytes(blob.section(name)) for name in blob.sections}
    change(header, sections)
    return encode_blob(header, sections=sections)


@pytest.mark.parametrize("change, problem", [
    (lambda h, s: s.update({"c3.codes": np.full(len(ROWS), 99, "<i4").tobytes()}), "outside the vocabulary"),
    (lambda h, s: s.update({"c4.offsets": np.arange(len(ROWS) + 1, dtype="<i8")[::-1].tobytes()}), "offsets"),
    (lambda h, s: s.update({"c2.values": np.full(len(ROWS), 5, np.int8).tobytes()}), "bool column"),
    (lambda h, s: s.update({"c0.present": np.full(len(ROWS), 2, np.uint8).tobytes()}), "presence mask"),
    (lambda h, s: s.update({"c1.values": np.full(len(ROWS), np.inf, "<f8").tobytes()}), "infinity"),
    (lambda h, s: s.update({"c0.values": b"\0" * 8}), "has 1 entries, expected 400"),
    (lambda h, s: s.update({"c3.vocabulary": b'["a", "a"]'}), "repeats a word"),
    (lambda h, s: s.update({"c3.vocabulary": b'{"a": 1}'}), "not a list of str"),
    (lambda h, s: s.pop("c1.values"), "no section 'c1.values'"),
    (lambda h, s: h.update({"rows": -1}), "row count"),
    (lambda h, s: h.update({"schema": [["x", "text"]]}), "has type 'text'"),
    (lambda h, s: h.update({"format": "posting-list"}), "not attribute-columns"),
])
def test_inconsistent_content_is_corrupt_data(change, problem):
    with pytest.raises(CorruptData, match=problem):
        AttributeColumns.from_bytes(_reframe(change), source="attrs/1")


def test_append_equals_building_at_once():
    for split in (0, 1, 123, len(ROWS)):
        grown = AttributeColumns.build(SCHEMA, ROWS[:split]).append(ROWS[split:])
        _same_columns(grown, COLUMNS)
        assert grown.to_bytes() == COLUMNS.to_bytes()  # vocabularies grow in the same order
    later = random_rows(1, 50) + [{"section": "new-word", "tags": ["new-tag"]}]
    both = COLUMNS.append(later)
    assert len(COLUMNS) == len(ROWS) and len(both) == len(ROWS) + len(later)  # append returns new columns
    _same_columns(both, AttributeColumns.build(SCHEMA, ROWS + later))
    assert parse_filter({"tags": "new-tag"}, SCHEMA).evaluate(both).nonzero()[0].tolist() == [len(both) - 1]


def test_reorder_and_take_select_rows():
    perm = np.random.default_rng(2).permutation(len(ROWS))
    reordered = COLUMNS.reorder(perm)
    _same_columns(reordered, AttributeColumns.build(SCHEMA, [ROWS[i] for i in perm]))
    picked = np.array([5, 5, 0, 399, 17])
    _same_columns(COLUMNS.take(picked), AttributeColumns.build(SCHEMA, [ROWS[i] for i in picked]))
    spec = parse_filter({"$or": [{"tags": "a"}, {"year": {"$lt": 1}}]}, SCHEMA)
    np.testing.assert_array_equal(spec.evaluate(reordered), spec.evaluate(COLUMNS)[perm])
    np.testing.assert_array_equal(spec.evaluate(COLUMNS, picked), spec.evaluate(COLUMNS)[picked])
    with pytest.raises(InvalidArgument, match="permutation"):
        COLUMNS.reorder(np.zeros(len(ROWS), np.int64))
    with pytest.raises(InvalidArgument, match="permutation"):
        COLUMNS.reorder(perm[:-1])
    assert len(COLUMNS.take([])) == 0


def test_memory_is_compact():
    assert 0 < COLUMNS.nbytes < 40 * len(ROWS)  # 8+1 int, 8 float, 1 bool, 4 keyword, 8 + ~4x1.5 tags
    assert "rows=400" in repr(COLUMNS)


@given(rows=st.lists(st.none() | st.fixed_dictionaries({}, optional={
    "year": st.none() | st.integers(-(2**63), 2**63 - 1),
    "score": st.none() | st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**53), 2**53),
    "draft": st.none() | st.booleans(),
    "section": st.none() | st.text(max_size=3),
    "tags": st.none() | st.lists(st.text(max_size=2), max_size=3)}), max_size=30), spec=filters)
@settings(max_examples=100, deadline=None)
def test_random_rows_round_trip_and_match(rows, spec):
    columns = AttributeColumns.from_bytes(AttributeColumns.build(SCHEMA, rows).to_bytes())
    assert parse_filter(spec, SCHEMA).evaluate(columns).tolist() == [reference(spec, row) for row in rows]


# ------------------------------------------------------------------ speed
def test_evaluate_a_million_rows(capsys):
    base = AttributeColumns.build(SCHEMA, [{"year": 2015 + i % 10, "score": i / 7, "section": str(i % 10),
                                            "tags": ["a", "b", "c", "d"][: i % 4], "draft": i % 2 == 0}
                                           for i in range(1000)])
    picked = np.random.default_rng(3).integers(0, 1000, 1_000_000)
    big = base.take(picked)
    parsed = parse_filter({"year": {"$gte": 2020, "$lt": 2024}, "tags": {"$in": ["a", "b"]}, "section": "8"},
                          SCHEMA)
    best = math.inf
    for _ in range(7):
        started = time.perf_counter()
        matches = int(np.count_nonzero(parsed.evaluate(big)))
        best = min(best, time.perf_counter() - started)
    subset = np.sort(np.random.default_rng(4).choice(1_000_000, 10_000, replace=False))
    started = time.perf_counter()
    parsed.evaluate(big, subset)
    subset_time = time.perf_counter() - started
    with capsys.disabled():
        print(f"\n[filters] {parsed}: {matches} of 1,000,000 rows in {best * 1e3:.2f} ms "
              f"(10,000-row subset {subset_time * 1e3:.2f} ms); columns {big.nbytes / 2**20:.1f} MiB")
    assert matches == np.count_nonzero(parsed.evaluate(base)[picked]) > 0
    assert best < 0.5  # generous: a few ms expected; only a gross regression fails
