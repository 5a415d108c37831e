"""LmdbTier specifics: map growth, several processes, fork, pickling, long keys.

Everything runs against real LMDB environments in ``tmp_path`` and real processes.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
import time
import warnings

import pytest

from tests.conftest import random_bytes
from tierstore.errors import AlreadyExists, ConfigError, TierUnavailable
from tierstore.tiers import LmdbTier

MiB = 1024 * 1024


@pytest.fixture
def tier(tmp_path):
    tier = LmdbTier(tmp_path / "env", map_size=1 * MiB)
    yield tier
    tier.close()


def spawn(target, *args) -> int:
    """Run ``target(*args)`` in a fresh interpreter (spawn) and return its exit code."""
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    process.join(120)
    if process.is_alive():
        process.kill()
        process.join()
    code = process.exitcode
    process.close()
    return code


def fork_and_wait(child) -> int:
    """Fork; run ``child()`` in the child (exit 0 when it returns True) and return the exit code."""
    with warnings.catch_warnings():  # Python >= 3.12 warns about fork in a threaded process
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if child() else 2
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


# ----------------------------------------------------------------- child bodies
def _read_expected(path: str, keys: list[str], readonly: bool) -> None:
    with LmdbTier(path, map_size=1 * MiB, readonly=readonly) as tier:
        ok = all(tier.get(key) == random_bytes(100_000, seed=i) for i, key in enumerate(keys))
        ok = ok and tier.list("shared/") == sorted(keys)
    raise SystemExit(0 if ok else 3)


def _write_large(path: str) -> None:
    with LmdbTier(path, map_size=1 * MiB) as tier:
        tier.put("from-child", random_bytes(8 * MiB, seed=77))


def _read_pickled(blob: bytes) -> None:
    tier = pickle.loads(blob)
    try:
        ok = tier.get("pk") == b"pickled" and tier.readonly and tier.name == "cache"
    finally:
        tier.close()
    raise SystemExit(0 if ok else 3)


# ----------------------------------------------------------------- map growth
def test_map_grows_from_a_tiny_map_for_values_bigger_than_it(tier):
    big = random_bytes(64 * MiB, seed=1)
    tier.put("big", big)
    assert tier.get("big") == big
    replacement = random_bytes(64 * MiB, seed=2)  # copy-on-write: both copies must fit at commit
    tier.put("big", replacement)
    assert tier.get("big") == replacement
    tier.put_many({f"many/{i}": random_bytes(3 * MiB, seed=i) for i in range(4)})
    assert tier.get("many/3") == random_bytes(3 * MiB, seed=3)
    stats = tier.stats()
    assert stats.extra["map_size"] >= 64 * MiB + 12 * MiB
    assert stats.items == 5
    assert stats.bytes_stored == 64 * MiB + 12 * MiB


def test_growing_the_map_while_threads_read(tier):
    tier.put("steady", b"steady value")
    stop, failures, reads = threading.Event(), [], [0]

    def reader():
        while not stop.is_set():
            try:
                assert tier.get("steady") == b"steady value"
                assert tier.list("steady") == ["steady"]
                reads[0] += 1
            except BaseException as exc:  # reported below, in the test's thread
                failures.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    try:
        for i in range(6):  # each write outgrows the map a little more
            tier.put(f"grow/{i}", random_bytes((i + 1) * 2 * MiB, seed=i))
        writes_took = time.monotonic() - started
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert reads[0] > 0
    assert writes_took < 30  # busy readers must not starve the writer (seconds, not minutes)
    assert tier.stats().extra["map_size"] > 12 * MiB
    assert tier.get("grow/5") == random_bytes(12 * MiB, seed=5)


# ----------------------------------------------------------------- processes
@pytest.mark.parametrize("readonly", [True, False], ids=["readonly", "writable"])
def test_second_process_sees_committed_values(tier, readonly):
    keys = [f"shared/{i}" for i in range(5)]
    tier.put_many({key: random_bytes(100_000, seed=i) for i, key in enumerate(keys)})
    assert spawn(_read_expected, tier.path, keys, readonly) == 0


def test_map_grown_by_another_process_is_adopted(tier):
    tier.put("small", b"x")
    assert spawn(_write_large, tier.path) == 0
    # The child grew the map past this process's 1 MiB mapping.
    assert tier.get("from-child") == random_bytes(8 * MiB, seed=77)
    tier.put("after", random_bytes(2 * MiB, seed=5))
    assert tier.list("") == ["after", "from-child", "small"]


def test_fork_child_reopens_and_reads_and_writes(tier):
    tier.put("before-fork", b"parent")

    def child():
        ok = tier.get("before-fork") == b"parent"
        tier.put("from-child", random_bytes(2 * MiB, seed=3))  # also grows the child's map
        return ok and tier.list("") == ["before-fork", "from-child"]

    assert fork_and_wait(child) == 0
    assert tier.get("from-child") == random_bytes(2 * MiB, seed=3)
    tier.put("parent-after", b"still writable")
    assert tier.get("parent-after") == b"still writable"


def test_fork_while_other_threads_use_the_tier(tier):
    tier.put("k", b"v")
    stop, failures = threading.Event(), []

    def worker(n):
        i = 0
        while not stop.is_set():
            try:
                assert tier.get("k") == b"v"
                tier.put(f"w{n}/{i % 5}", b"x" * 1000)
                i += 1
            except BaseException as exc:
                failures.append(exc)
                return

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    try:
        codes = [fork_and_wait(lambda: tier.get("k") == b"v" and tier.put("c", b"1") is None) for _ in range(5)]
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert codes == [0] * 5
    assert failures == []
    assert tier.get("c") == b"1"


# ----------------------------------------------------------------- pickling
def test_pickled_tier_reopens_in_another_process(tmp_path):
    with LmdbTier(tmp_path / "env", map_size=1 * MiB, name="cache") as tier:
        tier.put("pk", b"pickled")
        readonly = LmdbTier(tmp_path / "env", readonly=True, name="cache")
        try:
            blob = pickle.dumps(readonly)
        finally:
            readonly.close()
        assert spawn(_read_pickled, blob) == 0


def test_tiers_on_one_path_in_one_process_share_the_environment(tier):
    clone = pickle.loads(pickle.dumps(tier))
    clone.put("via-clone", b"1")
    assert tier.get("via-clone") == b"1"
    clone.close()
    tier.put("after-clone-closed", b"2")  # the shared handle stays open for the remaining tier
    assert tier.list("") == ["after-clone-closed", "via-clone"]


def test_readonly_tier_refuses_writes_and_writable_open_of_readonly_env(tier, tmp_path):
    tier.put("k", b"v")
    with LmdbTier(tier.path, readonly=True) as reader:
        assert reader.get("k") == b"v"
        with pytest.raises(ConfigError, match="readonly=True"):
            reader.put("k", b"w")
    assert tier.get("k") == b"v"
    other = tmp_path / "ro-only"
    LmdbTier(other).close()
    with LmdbTier(other, readonly=True) as reader:
        with pytest.raises(ConfigError, match="read-only"):
            LmdbTier(other)
        assert reader.list("") == []


# ----------------------------------------------------------------- long keys
def test_long_keys_round_trip_and_list(tier):
    head = "long/" + "h" * 240 + "/" + "h" * 240 + "/"  # 487 bytes: past the stored form's 478-byte head
    keys = [head + "a" * 250, head + "a" * 249 + "b", head + "z/" + "q" * 250 + "/" + "q" * 250, "long/short"]
    assert [len(key.encode()) > 511 for key in keys] == [True, True, True, False]
    tier.put_many({key: key.encode()[-50:] for key in keys})
    assert [tier.get(key) for key in keys] == [key.encode()[-50:] for key in keys]
    assert tier.list("long/") == sorted(keys)
    assert tier.list(head + "a") == sorted(keys[:2])
    assert tier.list(head + "a" * 250) == [keys[0]]
    assert tier.list(head + "z/") == [keys[2]]
    assert tier.get_many([keys[1], head + "missing"]) == [keys[1].encode()[-50:], None]
    with pytest.raises(AlreadyExists):
        tier.put(keys[0], b"again", mode="create")
    assert tier.delete(keys[0]) is True
    assert tier.list(head) == sorted(keys[1:3])
    assert tier.stats().items == 3


def test_long_keys_survive_reopen(tmp_path):
    key = "deep/" + "/".join(["s" * 200] * 4)
    with LmdbTier(tmp_path / "env", map_size=1 * MiB) as tier:
        tier.put(key, b"long")
    with LmdbTier(tmp_path / "env", map_size=1 * MiB) as tier:
        assert tier.list("deep/") == [key]
        assert tier.get(key) == b"long"


# ----------------------------------------------------------------- batches, stats, errors
def test_put_many_create_commits_the_rest_then_reports(tier):
    tier.put("c/1", b"old")
    with pytest.raises(AlreadyExists) as info:
        tier.put_many([("c/1", b"new"), ("c/2", b"two"), ("c/2", b"dup"), ("c/3", b"three")], mode="create")
    assert "c/1" in str(info.value) and "2 key(s)" in str(info.value)
    assert tier.get_many(["c/1", "c/2", "c/3"]) == [b"old", b"two", b"three"]
    tier.put_many([("c/4", b"first"), ("c/4", b"last")])
    assert tier.get("c/4") == b"last"


def test_items_and_bytes_stored_follow_writes(tier, tmp_path):
    tier.put("a", b"12345")
    tier.put("a", b"12")
    tier.put_many({"b": b"123", "c": b""})
    tier.delete("c")
    tier.delete("missing")
    stats = tier.stats()
    assert (stats.items, stats.bytes_stored) == (2, 5)
    tier.close()
    with LmdbTier(tmp_path / "env") as again:  # persisted with the data
        assert (again.stats().items, again.stats().bytes_stored) == (2, 5)


def test_bad_paths_are_clear_errors(tmp_path):
    afile = tmp_path / "afile"
    afile.write_bytes(b"not a directory")
    with pytest.raises(ConfigError, match="is a file"):
        LmdbTier(afile)
    with pytest.raises(ConfigError, match="readonly=False"):
        LmdbTier(tmp_path / "missing", readonly=True)
    with pytest.raises(TierUnavailable) as info:
        LmdbTier(afile / "below-a-file")
    assert info.value.__cause__ is not None
    with pytest.raises(ValueError):
        LmdbTier(tmp_path / "env", map_size=0)
