"""The tier conformance suite: one set of behaviours every tier must show.

A backend opts in by subclassing :class:`TierConformance` and providing a ``make_tier``
fixture: a zero-argument factory that opens the tier at one fixed location, so calling
it again after ``close()`` reopens the same data. ``persistent`` says whether values
survive that reopen.
"""

from __future__ import annotations

import asyncio
import pickle

import numpy as np
import pytest

from tierstore.errors import (AlreadyExists, InvalidArgument, InvalidKey, InvalidType, NotFound, StoreClosed,
                              TierstoreError)
from tests.conftest import random_bytes

KiB, MiB = 1024, 1024 * 1024

BAD_KEYS = ["../x", "a/../b", "/abs", "a/", "a//b", "./a", "a\x00b", "a\nb", "a\\b", "", "x" * 2000,
            "s/" + "y" * 300]
BAD_KEY_TYPES = [None, b"bytes-key", 7, ("a",)]


class TierConformance:
    persistent = False
    #: sizes of the exact round-trip test; the 64 MiB one runs once per tier.
    sizes = [0, 1, 4 * KiB - 1, 4 * KiB, 1 * MiB + 3, 64 * MiB]

    @pytest.fixture
    def tier(self, make_tier):
        tier = make_tier()
        yield tier
        tier.close()

    # ------------------------------------------------------------ round trips
    @pytest.mark.parametrize("size", sizes, ids=lambda s: f"{s}B")
    def test_round_trip_is_exact(self, tier, size):
        value = random_bytes(size, seed=size)
        tier.put("v/value", value)
        got = tier.get("v/value")
        assert isinstance(got, (bytes, bytearray))
        assert len(got) == size
        assert got == value
        assert tier.size("v/value") == size
        assert tier.contains("v/value")

    def test_overwrite_replaces_value(self, tier):
        tier.put("k", b"first value")
        tier.put("k", b"2nd")
        assert tier.get("k") == b"2nd"
        assert tier.size("k") == 3

    def test_accepts_bytes_like_and_does_not_alias(self, tier):
        source = bytearray(b"abcdef")
        tier.put("ba", source)
        source[0:3] = b"XYZ"
        assert tier.get("ba") == b"abcdef"
        arr = np.arange(16, dtype=np.float32)
        tier.put("np", arr)
        assert np.array_equal(np.frombuffer(tier.get("np"), dtype=np.float32), arr)
        tier.put("mv", memoryview(b"0123456789")[2:6])
        assert tier.get("mv") == b"2345"

    def test_get_range(self, tier):
        value = random_bytes(10_000, seed=3)
        tier.put("r", value)
        for start, end in [(0, 10), (5, 5), (100, 9_000), (9_990, 10_000), (9_990, 20_000),
                           (0, None), (4_000, None), (10_000, None), (12_000, 13_000)]:
            assert tier.get_range("r", start, end) == value[start:end], (start, end)

    def test_get_range_rejects_bad_ranges(self, tier):
        tier.put("r", b"abc")
        with pytest.raises(InvalidArgument):
            tier.get_range("r", -1, 2)
        with pytest.raises(InvalidArgument):
            tier.get_range("r", 3, 1)
        with pytest.raises(InvalidType):
            tier.get_range("r", "0", 2)

    # ------------------------------------------------------------ create mode
    def test_create_mode_conflict_leaves_value(self, tier):
        tier.put("c", b"original", mode="create")
        with pytest.raises(AlreadyExists):
            tier.put("c", b"intruder", mode="create")
        assert tier.get("c") == b"original"
        tier.put("c", b"replaced", mode="overwrite")
        assert tier.get("c") == b"replaced"

    def test_bad_mode_rejected(self, tier):
        with pytest.raises(InvalidArgument):
            tier.put("m", b"x", mode="append")
        assert not tier.contains("m")

    # ------------------------------------------------------------ missing keys
    def test_missing_keys(self, tier):
        with pytest.raises(NotFound):
            tier.get("nope")
        with pytest.raises(KeyError):  # NotFound is also a KeyError
            tier.get("nope/deeper")
        with pytest.raises(NotFound):
            tier.get_range("nope", 0, 10)
        with pytest.raises(NotFound):
            tier.size("nope")
        assert not tier.contains("nope")
        tier.delete("nope")  # idempotent, no error

    def test_delete(self, tier):
        tier.put("d", b"x")
        tier.delete("d")
        assert not tier.contains("d")
        with pytest.raises(NotFound):
            tier.get("d")
        assert tier.list("") == []

    # ------------------------------------------------------------ batches
    def test_get_many_and_put_many(self, tier):
        items = {f"b/{i:03d}": random_bytes(i * 37, seed=i) for i in range(50)}
        tier.put_many(items)
        keys = list(items) + ["b/missing"]
        values = tier.get_many(keys)
        assert values[:-1] == list(items.values())
        assert values[-1] is None
        tier.put_many([("p/1", b"one"), ("p/2", b"two")])
        assert tier.get_many(["p/2", "p/1"]) == [b"two", b"one"]

    def test_put_many_create_reports_conflicts(self, tier):
        tier.put("pm/a", b"old")
        with pytest.raises(AlreadyExists):
            tier.put_many({"pm/a": b"new", "pm/b": b"b"}, mode="create")
        assert tier.get("pm/a") == b"old"
        assert tier.get("pm/b") == b"b"

    def test_put_many_validates_everything_first(self, tier):
        with pytest.raises(InvalidKey):
            tier.put_many([("ok/1", b"x"), ("../bad", b"y")])
        with pytest.raises(InvalidType):
            tier.put_many([("ok/1", b"x"), ("ok/2", None)])
        assert tier.list("") == []

    # ------------------------------------------------------------ listing
    def test_list_prefix(self, tier):
        for key in ["a/1", "a/2", "ab/3", "b/4", "a/sub/5"]:
            tier.put(key, key.encode())
        assert tier.list("") == ["a/1", "a/2", "a/sub/5", "ab/3", "b/4"]
        assert tier.list("a/") == ["a/1", "a/2", "a/sub/5"]
        assert tier.list("a") == ["a/1", "a/2", "a/sub/5", "ab/3"]
        assert tier.list("a/s") == ["a/sub/5"]
        assert tier.list("zzz") == []

    # ------------------------------------------------------------ validation
    @pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
    def test_invalid_keys_rejected(self, tier, key):
        with pytest.raises(InvalidKey) as info:
            tier.put(key, b"x")
        assert str(info.value)  # says what is wrong
        with pytest.raises(InvalidKey):
            tier.get(key)
        assert tier.list("") == []

    @pytest.mark.parametrize("key", BAD_KEY_TYPES, ids=repr)
    def test_key_types_rejected(self, tier, key):
        with pytest.raises(InvalidType):
            tier.put(key, b"x")
        assert tier.list("") == []

    @pytest.mark.parametrize("value", [None, "text", 12, 1.5, object()], ids=repr)
    def test_value_types_rejected(self, tier, value):
        with pytest.raises(InvalidType):
            tier.put("k", value)
        assert not tier.contains("k")

    def test_closed_tier_raises(self, make_tier):
        tier = make_tier()
        tier.put("x", b"1")
        tier.close()
        tier.close()  # idempotent
        assert tier.closed
        with pytest.raises(StoreClosed):
            tier.get("x")
        with pytest.raises(StoreClosed):
            tier.put("y", b"2")

    def test_errors_are_tierstore_errors(self, tier):
        for call in (lambda: tier.get("missing"), lambda: tier.put("../x", b""), lambda: tier.put("k", None)):
            with pytest.raises(TierstoreError):
                call()

    # ------------------------------------------------------------ statistics
    def test_stats_add_up(self, tier):
        tier.put("s/1", b"12345")
        tier.put("s/2", b"123")
        tier.get("s/1")
        tier.get_range("s/2", 0, 2)
        with pytest.raises(NotFound):
            tier.get("s/3")
        tier.get_many(["s/1", "s/3"])
        stats = tier.stats()
        assert stats.kind == tier.kind
        assert stats.gets == stats.hits + stats.misses == 5
        assert stats.hits == 3 and stats.misses == 2
        assert stats.puts == 2 and stats.bytes_written == 8
        assert stats.bytes_read == 5 + 2 + 5

    # ------------------------------------------------------------ concurrency
    def test_concurrent_async_tasks(self, tier):
        async def worker(i: int):
            key = f"async/{i:03d}"
            value = random_bytes(1000 + i, seed=i)
            await tier.put_async(key, value)
            assert await tier.contains_async(key)
            got = await tier.get_async(key)
            assert got == value
            assert await tier.get_range_async(key, 10, 20) == value[10:20]
            return key

        async def main():
            keys = await asyncio.gather(*(worker(i) for i in range(100)))
            listed = await tier.list_async("async/")
            many = await tier.get_many_async(keys[:10])
            return keys, listed, many

        keys, listed, many = asyncio.run(main())
        assert sorted(keys) == listed
        assert many == [random_bytes(1000 + i, seed=i) for i in range(10)]

    # ------------------------------------------------------------ persistence
    def test_persistence_across_reopen(self, make_tier):
        if not self.persistent:
            pytest.skip("volatile tier")
        tier = make_tier()
        tier.put("p/one", b"1" * 1000)
        tier.put("p/two", random_bytes(3 * MiB, seed=9))
        tier.put("p/gone", b"x")
        tier.delete("p/gone")
        tier.close()
        again = make_tier()
        try:
            assert again.list("p/") == ["p/one", "p/two"]
            assert again.get("p/one") == b"1" * 1000
            assert again.get("p/two") == random_bytes(3 * MiB, seed=9)
        finally:
            again.close()

    def test_pickle_reopens_same_location(self, tier):
        if not self.persistent:
            pytest.skip("volatile tier")
        tier.put("pk", b"pickled")
        clone = pickle.loads(pickle.dumps(tier))
        try:
            assert clone.get("pk") == b"pickled"
        finally:
            clone.close()
