"""TieredStore behaviour beyond the conformance suite: promotion, demotion, budgets, pins, stats."""

from __future__ import annotations

import random
import threading

import pytest

from tierstore.errors import CapacityError, ConfigError, InvalidArgument, NotFound
from tierstore.tiers import FileTier, LmdbTier, MemoryTier, TieredStore


def value(key: str, size: int = 100) -> bytes:
    return (key.encode() * (size // max(1, len(key)) + 1))[:size]


@pytest.fixture
def file_bottom(tmp_path):
    return lambda: FileTier(tmp_path / "bottom")


def level_keys(store: TieredStore, index: int) -> list[str]:
    return store.tiers[index].list("")


def test_read_promotes_into_levels_above(file_bottom):
    store = TieredStore([MemoryTier(), MemoryTier(), file_bottom()], budgets=[250, 1000, None])
    try:
        for i in range(4):
            store.put(f"k{i}", value(f"k{i}"))
        assert level_keys(store, 0) == ["k2", "k3"]        # budget 250 holds two values of 100
        assert level_keys(store, 1) == ["k0", "k1"]        # evicted values were demoted, not dropped
        assert store.get("k0") == value("k0")              # hit at level 1 ...
        assert "k0" in level_keys(store, 0)                # ... promoted to the top
        stats = store.stats()
        assert stats.levels[0].promotions == 1
        assert stats.levels[1].hits == 1
        assert store.get("k0") == value("k0")
        assert store.stats().levels[0].hits == 1           # the second read is served by the top
    finally:
        store.close()


def test_write_back_evictions_demote_and_flush_writes_bottom(file_bottom):
    store = TieredStore([MemoryTier(), MemoryTier(), file_bottom()], budgets=[300, 200, None],
                        write_policy="write-back")
    try:
        for i in range(8):
            store.put(f"w{i}", value(f"w{i}"))
        stats = store.stats()
        assert stats.levels[0].evictions == 5
        assert stats.levels[1].demotions == 5
        assert stats.levels[1].evictions == 3
        assert stats.levels[2].demotions == 3              # dirty values evicted from level 1 hit the bottom
        assert store.tiers[2].list("") == ["w0", "w1", "w2"]
        assert stats.dirty == 5
        for i in range(8):
            assert store.get(f"w{i}") == value(f"w{i}")
        dirty = store.stats().dirty                         # reads promote and push dirty values down
        assert store.flush() == dirty
        assert store.stats().dirty == 0
        assert store.tiers[2].list("") == [f"w{i}" for i in range(8)]
    finally:
        store.close()
    bottom = file_bottom()
    try:
        assert bottom.list("") == [f"w{i}" for i in range(8)]
        assert all(bottom.get(f"w{i}") == value(f"w{i}") for i in range(8))
    finally:
        bottom.close()


def test_close_flushes_write_back_values(file_bottom):
    store = TieredStore([MemoryTier(), file_bottom()], budgets=[10_000, None], write_policy="write-back")
    store.put("only-in-memory", b"dirty bytes")
    assert store.tiers[1].list("") == []
    store.close()
    bottom = file_bottom()
    try:
        assert bottom.get("only-in-memory") == b"dirty bytes"
    finally:
        bottom.close()


def test_never_drops_last_durable_copy_under_churn(tmp_path):
    rng = random.Random(7)
    store = TieredStore([MemoryTier(), LmdbTier(tmp_path / "cache", map_size=1 << 20), FileTier(tmp_path / "b")],
                        budgets=[1_000, 3_000, None], write_policy="write-back", policy="lfu")
    expected = {}
    try:
        for step in range(400):
            key = f"c/{rng.randrange(60)}"
            if rng.random() < 0.6:
                expected[key] = value(f"{key}:{step}", rng.randrange(1, 400))
                store.put(key, expected[key])
            elif rng.random() < 0.9:
                if key in expected:
                    assert store.get(key) == expected[key]
                else:
                    with pytest.raises(NotFound):
                        store.get(key)
            else:
                store.delete(key)
                expected.pop(key, None)
        assert store.list("c/") == sorted(expected)
        stats = store.stats()
        assert stats.levels[0].bytes_stored <= 1_000 and stats.levels[1].bytes_stored <= 3_000
        assert stats.levels[0].evictions > 0 and stats.levels[1].evictions > 0
    finally:
        store.close()
    bottom = FileTier(tmp_path / "b")
    try:
        assert bottom.list("c/") == sorted(expected)
        for key, data in expected.items():
            assert bottom.get(key) == data
    finally:
        bottom.close()


def test_overwrite_invalidates_stale_copies(file_bottom):
    store = TieredStore([MemoryTier(), MemoryTier(), file_bottom()], budgets=[150, 1000, None])
    try:
        store.put("x", value("old"))
        store.put("y", value("y"))                          # pushes x down to level 1
        assert "x" in level_keys(store, 1)
        store.put("x", value("new"))
        assert "x" not in level_keys(store, 1)
        assert store.get("x") == value("new")
        assert store.tiers[2].get("x") == value("new")
    finally:
        store.close()


def test_value_larger_than_caches_goes_to_bottom(file_bottom):
    store = TieredStore([MemoryTier(), file_bottom()], budgets=[100, None], write_policy="write-back")
    try:
        store.put("big", value("big", 500))
        assert level_keys(store, 0) == []
        assert store.tiers[1].get("big") == value("big", 500)
        assert store.get("big") == value("big", 500)       # too big to promote: still served
    finally:
        store.close()


def test_pins_protect_from_eviction(file_bottom):
    store = TieredStore([MemoryTier(), file_bottom()], budgets=[250, None])
    try:
        store.put("hot", value("hot"))
        store.pin("hot")
        for i in range(5):
            store.put(f"cold{i}", value(f"cold{i}"))
        assert "hot" in level_keys(store, 0)
        store.pin("cold4")
        with pytest.raises(CapacityError):
            store.pin("cold0")                               # the top is full of pinned values
        store.unpin("hot")
        store.pin("cold0")
        assert "hot" not in level_keys(store, 0) and "cold0" in level_keys(store, 0)
        with pytest.raises(InvalidArgument):
            store.unpin("never-pinned")
        with pytest.raises(NotFound):
            store.pin("missing")
        assert store.stats().pinned == 2
    finally:
        store.close()


def test_cost_aware_policy_keeps_expensive_values(file_bottom):
    store = TieredStore([MemoryTier(), file_bottom()], budgets=[300, None], policy="cost")
    try:
        store.put("expensive", value("e"), cost=1000.0)
        for i in range(6):
            store.put(f"cheap{i}", value(f"c{i}"), cost=1.0)
        assert "expensive" in level_keys(store, 0)
        with pytest.raises(InvalidArgument):
            store.put("bad", b"x", cost=-1)
    finally:
        store.close()


def test_prefetch_promotes(file_bottom):
    bottom = file_bottom()
    bottom.put_many({f"p{i}": value(f"p{i}") for i in range(3)})
    store = TieredStore([MemoryTier(), bottom], budgets=[1000, None])
    try:
        assert store.prefetch(["p0", "p1", "missing"]) == 2
        assert level_keys(store, 0) == ["p0", "p1"]
    finally:
        store.close()


def test_stats_add_up_across_levels(file_bottom):
    rng = random.Random(3)
    store = TieredStore([MemoryTier(), MemoryTier(), file_bottom()], budgets=[300, 600, None])
    try:
        for i in range(20):
            store.put(f"s{i}", value(f"s{i}"))
        for _ in range(200):
            key = f"s{rng.randrange(25)}"
            try:
                store.get(key)
            except NotFound:
                pass
        store.get_many([f"s{i}" for i in range(0, 25, 3)])
        stats = store.stats()
        levels = stats.levels
        assert levels[0].gets == stats.gets
        for upper, lower in zip(levels, levels[1:]):
            assert upper.misses == lower.gets
        assert stats.misses == levels[-1].misses
        assert stats.hits == sum(level.hits for level in levels)
        assert stats.bytes_read == sum(level.bytes_read for level in levels)
        assert all(level.gets == level.hits + level.misses for level in levels)
        assert levels[0].bytes_stored <= 300 and levels[1].bytes_stored <= 600
        assert levels[0].items == len(level_keys(store, 0))
    finally:
        store.close()


def test_concurrent_threads_match_serial_replay(file_bottom):
    store = TieredStore([MemoryTier(), MemoryTier(), file_bottom()], budgets=[400, 800, None],
                        write_policy="write-back")
    errors = []

    def worker(t: int):
        rng = random.Random(t)
        try:
            for step in range(150):
                key = f"t{t}/{rng.randrange(6)}"
                store.put(key, value(f"{key}@{step}", 50 + rng.randrange(100)))
                other = f"t{rng.randrange(4)}/{rng.randrange(6)}"
                try:
                    got = store.get(other)
                    assert got.startswith((other + "@").encode())
                except NotFound:
                    pass
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        for t in range(4):  # each thread's keys end with the last value it wrote (serial replay)
            rng = random.Random(t)
            last = {}
            for step in range(150):
                key = f"t{t}/{rng.randrange(6)}"
                last[key] = value(f"{key}@{step}", 50 + rng.randrange(100))
                rng.randrange(4), rng.randrange(6)
            for key, data in last.items():
                assert store.get(key) == data
    finally:
        store.close()


def test_reopened_persistent_cache_is_adopted(tmp_path):
    def make():
        return TieredStore([LmdbTier(tmp_path / "cache", map_size=1 << 20), FileTier(tmp_path / "b")],
                           budgets=[250, None])

    store = make()
    for i in range(4):
        store.put(f"r{i}", value(f"r{i}"))
    store.close()
    store = make()
    try:
        stats = store.stats()
        assert stats.levels[0].items == 2 and stats.levels[0].bytes_stored == 200
        store.put("r9", value("r9"))
        assert store.stats().levels[0].bytes_stored <= 250
        assert store.get("r2") == value("r2")
    finally:
        store.close()


def test_configuration_errors(tmp_path):
    with pytest.raises(ConfigError):
        TieredStore([MemoryTier(), FileTier(tmp_path / "f")], budgets=[100, 1000])  # durable bottom budget
    with pytest.raises(ConfigError):
        TieredStore([MemoryTier()], budgets=[100, None])
    with pytest.raises(InvalidArgument):
        TieredStore([MemoryTier()], write_policy="sometimes")
    with pytest.raises(InvalidArgument):
        TieredStore([MemoryTier()], budgets=[100], policy="random")
    tier = MemoryTier()
    with pytest.raises(ConfigError):
        TieredStore([tier, tier])
    with pytest.raises(TypeError):
        TieredStore(tier)


def test_volatile_cache_stack_rejects_value_bigger_than_budget():
    store = TieredStore([MemoryTier(), MemoryTier()], budgets=[100, 200])
    try:
        with pytest.raises(CapacityError):
            store.put("huge", b"x" * 500)
        assert store.list("") == []
        for i in range(10):                                  # a pure cache drops from its bottom
            store.put(f"v{i}", value(f"v{i}"))
        assert store.stats().levels[1].bytes_stored <= 200
        assert store.get("v9") == value("v9")
    finally:
        store.close()
