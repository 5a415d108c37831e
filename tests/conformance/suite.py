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

    # ------------------------------------------------------------ batched ranges
    def test_get_ranges_equal_slices_of_get(self, tier):
        values = {f"gr/{i}": random_bytes(5_000 + 1_000 * i, seed=40 + i) for i in range(3)}
        tier.put_many(values)
        tier.put("gr/empty", b"")
        requests = [("gr/0", 0, 10), ("gr/1", 100, 4_000), ("gr/2", 6_500, None), ("gr/0", 4_990, 9_000),
                    ("gr/1", 3, 3), ("gr/2", 20_000, None), ("gr/0", 0, None), ("gr/1", 5_999, 6_000),
                    ("gr/2", 7_000, 7_000), ("gr/empty", 0, None), ("gr/empty", 0, 10), ["gr/1", 10, 20]]
        expected = [tier.get(key)[start:end] for key, start, end in requests]
        assert expected == [values.get(key, b"")[start:end] for key, start, end in requests]
        got = tier.get_ranges(requests)
        assert got == expected
        assert all(isinstance(v, (bytes, bytearray)) for v in got)
        assert tier.get_ranges(iter(requests[:2])) == expected[:2]  # any iterable, read once
        assert asyncio.run(tier.get_ranges_async(r for r in requests)) == expected

    def test_get_ranges_empty_batch(self, tier):
        assert tier.get_ranges([]) == []
        assert asyncio.run(tier.get_ranges_async([])) == []
        assert tier.stats().gets == 0

    def test_get_ranges_missing_key_raises_not_found(self, tier):
        tier.put("gm/a", b"abcdef")
        with pytest.raises(NotFound) as info:
            tier.get_ranges([("gm/a", 0, 2), ("gm/missing", 0, 2), ("gm/a", 4, None)])
        assert "gm/missing" in str(info.value)
        with pytest.raises(NotFound):
            asyncio.run(tier.get_ranges_async([("gm/nope", 0, None)]))
        stats = tier.stats()  # counted like three get_range calls, then one more
        assert (stats.gets, stats.hits, stats.misses, stats.bytes_read) == (4, 2, 2, 4)

    def test_get_ranges_validates_everything_before_any_read(self, tier, monkeypatch):
        tier.put("gv/a", b"abcdef")

        def no_io(requests):
            raise AssertionError(f"read {requests!r} despite an invalid request")
        monkeypatch.setattr(tier, "_get_ranges", no_io)
        bad = [([("gv/a", 0, 1), ("../x", 0, 1)], InvalidKey), ([("gv/a", 0, 1), ("a//b", 0, None)], InvalidKey),
               ([("gv/a", 0, 1), (None, 0, 1)], InvalidType), ([("gv/a", 0, 1), ("gv/a", -1, 2)], InvalidArgument),
               ([("gv/a", 0, 1), ("gv/a", 3, 1)], InvalidArgument), ([("gv/a", "0", 2)], InvalidType),
               ([("gv/a", 0, 2.0)], InvalidType), ([("gv/a", True, 2)], InvalidType), ([("gv/a", 0)], InvalidType),
               (["gv/a"], InvalidType), ("gv/a", InvalidType), (b"gv/a", InvalidType), (7, InvalidType)]
        for requests, error in bad:
            with pytest.raises(error):
                tier.get_ranges(requests)
        with pytest.raises(InvalidKey):
            asyncio.run(tier.get_ranges_async([("gv/a", 0, 1), ("../x", 0, 1)]))
        assert tier.stats().gets == 0

    def test_get_ranges_on_closed_tier(self, make_tier):
        tier = make_tier()
        tier.put("gc", b"x")
        tier.close()
        with pytest.raises(StoreClosed):
            tier.get_ranges([("gc", 0, 1)])

    def test_get_ranges_of_a_hierarchy_reads_each_level_once(self, tier):
        if tier.kind != "tiered":
            pytest.skip("TieredStore only")
        levels = tier.tiers
        levels[-1].put("gh/bottom", b"0123456789")  # only in the bottom level, behind the store's back
        tier.put("gh/top", b"abcdefghij")
        before = [(s.gets, s.hits, s.misses) for s in tier.stats().levels]
        assert tier.get_ranges([("gh/bottom", 2, 5), ("gh/top", 7, None), ("gh/bottom", 8, None)]) == \
            [b"234", b"hij", b"89"]
        after = tier.stats().levels
        delta = [(s.gets - g, s.hits - h, s.misses - m) for s, (g, h, m) in zip(after, before)]
        assert delta == [(3, 1, 2), (2, 0, 2), (2, 2, 0)]  # a miss at level i is a lookup at i + 1
        assert not levels[0].contains("gh/bottom")  # ranged reads never promote
        with pytest.raises(NotFound) as info:  # a key missing everywhere fails the batch, naming it
            tier.get_ranges([("gh/top", 0, 1), ("gh/nowhere", 0, 1)])
        assert "gh/nowhere" in str(info.value)

    def test_get_ranges_of_s3_run_concurrently(self, tier, monkeypatch):
        if tier.kind != "s3":
            pytest.skip("S3 only")
        import threading

        tier.put_many({f"gs/{i}": random_bytes(1_000, seed=i) for i in range(4)})
        client = tier._client()
        real_get_object = client.get_object
        all_in_flight = threading.Barrier(4, timeout=10)  # broken unless 4 GETs are in flight at once

        def get_object(**kwargs):
            all_in_flight.wait()
            return real_get_object(**kwargs)
        monkeypatch.setattr(client, "get_object", get_object)
        requests = [(f"gs/{i}", 10 * i, 10 * i + 5) for i in range(4)]
        assert tier.get_ranges(requests) == [random_bytes(1_000, seed=i)[10 * i:10 * i + 5] for i in range(4)]

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
