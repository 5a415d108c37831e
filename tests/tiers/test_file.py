"""FileTier specifics: on-disk layout, atomic writes, create mode, aiofiles reads, listing.

Everything runs against real files in ``tmp_path``; the one monkeypatch makes
``os.fsync`` fail, a disk fault that cannot be produced on demand.
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import pickle
import threading

import pytest

from tests.conftest import random_bytes
from tierstore.errors import AlreadyExists, ConfigError, InvalidKey, NotFound, TierUnavailable
from tierstore.tiers import FileTier
from tierstore.tiers.file import decode_segment, encode_segment

MiB = 1024 * 1024


@pytest.fixture
def tier(tmp_path):
    tier = FileTier(tmp_path / "files")
    yield tier
    tier.close()


def all_files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def shard(key: str) -> str:
    return "@" + hashlib.blake2b(key.encode()).hexdigest()[:2]


def _read_pickled(blob: bytes) -> None:
    tier = pickle.loads(blob)
    try:
        ok = tier.get("pk") == b"pickled" and tier.fsync is False and tier.name == "disk"
    finally:
        tier.close()
    raise SystemExit(0 if ok else 3)


# ----------------------------------------------------------------- layout
def test_layout_is_sharded_one_file_per_key(tier):
    tier.put("docs/list/0001", b"deep")
    tier.put("flat", b"top")
    assert all_files(tier.path) == sorted([f"docs/list/{shard('docs/list/0001')}/0001", f"{shard('flat')}/flat"])
    with open(os.path.join(tier.path, "docs", "list", shard("docs/list/0001"), "0001"), "rb") as stored:
        assert stored.read() == b"deep"  # stored as-is, no framing


def test_flat_namespace_spreads_over_shard_directories(tier):
    tier.put_many({f"k{i}": b"x" for i in range(1000)})
    top = os.listdir(tier.path)
    assert all(name.startswith("@") and len(name) == 3 for name in top)
    assert len(top) > 200  # 1000 keys over 256 shards
    assert max(len(os.listdir(os.path.join(tier.path, name))) for name in top) < 30
    assert len(tier.list("k")) == 1000


def test_segments_with_at_sign_or_percent(tier):
    keys = ["@home/x", "a/@b", "100%/x%41", "%40", "@", "a@b/%", "@tmp.fake"]
    for key in keys:
        tier.put(key, key.encode())
    assert [tier.get(key) for key in keys] == [key.encode() for key in keys]
    assert tier.list("") == sorted(keys)
    assert tier.list("@") == ["@", "@home/x", "@tmp.fake"]
    assert tier.list("100%/") == ["100%/x%41"]
    on_disk = all_files(tier.path)
    assert f"%40home/{shard('@home/x')}/x" in on_disk
    assert f"100%25/{shard('100%/x%41')}/x%2541" in on_disk
    assert f"{shard('@tmp.fake')}/%40tmp.fake" in on_disk
    for key in keys:
        for segment in key.split("/"):
            assert decode_segment(encode_segment(segment)) == segment


def test_segment_too_long_once_escaped_is_invalid_key(tier):
    segment = "%" * 100  # 100 bytes as a key segment, 300 once escaped
    with pytest.raises(InvalidKey, match="255"):
        tier.put(f"a/{segment}", b"x")
    assert tier.list("") == []
    assert tier.list(f"a/{segment}/") == []


# ----------------------------------------------------------------- atomic writes
def test_failed_write_leaves_no_temporary_file_and_keeps_old_value(tier, monkeypatch):
    tier.put("a/k", b"old value")

    def failing_fsync(fd):
        raise OSError(5, "Input/output error (injected)")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(TierUnavailable) as info:
        tier.put("a/k", b"new value")
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(TierUnavailable):
        tier.put("b/new", b"never written", mode="create")
    monkeypatch.undo()
    assert tier.get("a/k") == b"old value"
    assert not tier.contains("b/new")
    assert [path for path in all_files(tier.path) if "@tmp." in path] == []


def test_concurrent_writers_to_one_key_leave_one_complete_value(tier):
    values = [bytes([i]) * (1 * MiB) for i in range(8)]
    torn, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                value = tier.get("hot")
            except NotFound:
                continue
            if value not in values:
                torn.append(len(value))

    def writer(value):
        for _ in range(5):
            tier.put("hot", value)

    watcher = threading.Thread(target=reader)
    watcher.start()
    writers = [threading.Thread(target=writer, args=(value,)) for value in values]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    watcher.join()
    assert torn == []
    assert tier.get("hot") in values
    assert all_files(tier.path) == [f"{shard('hot')}/hot"]


def test_create_mode_uses_link_so_exactly_one_creator_wins(tier):
    outcomes, barrier = [], threading.Barrier(8)

    def creator(i):
        barrier.wait()
        try:
            tier.put("once", f"creator {i}".encode(), mode="create")
            outcomes.append(i)
        except AlreadyExists:
            pass

    threads = [threading.Thread(target=creator, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(outcomes) == 1
    assert tier.get("once") == f"creator {outcomes[0]}".encode()
    with pytest.raises(AlreadyExists, match="create"):
        tier.put_many({"once": b"again", "twice": b"2"}, mode="create")
    assert tier.get("twice") == b"2"
    assert all_files(tier.path) == sorted([f"{shard('once')}/once", f"{shard('twice')}/twice"])


def test_without_fsync_values_still_round_trip(tmp_path):
    with FileTier(tmp_path / "nofsync", fsync=False) as tier:
        tier.put("a/b", random_bytes(3 * MiB, seed=4))
        assert tier.get_range("a/b", 5, 50) == random_bytes(3 * MiB, seed=4)[5:50]
        assert tier.delete("a/b") and not tier.delete("a/b")


# ----------------------------------------------------------------- async reads
def test_async_reads_through_aiofiles(tier):
    value = random_bytes(2 * MiB + 17, seed=11)
    tier.put("x/async", value)

    async def main():
        whole, part, tail = await asyncio.gather(tier.get_async("x/async"), tier.get_range_async("x/async", 100, 5000),
                                                 tier.get_range_async("x/async", 2 * MiB))
        past_end = await tier.get_range_async("x/async", 3 * MiB, 4 * MiB)
        with pytest.raises(NotFound):
            await tier.get_async("x/missing")
        with pytest.raises(InvalidKey):
            await tier.get_async("../escape")
        return whole, part, tail, past_end

    whole, part, tail, past_end = asyncio.run(main())
    assert whole == value and part == value[100:5000] and tail == value[2 * MiB:] and past_end == b""
    stats = tier.stats()
    assert (stats.gets, stats.hits, stats.misses) == (5, 4, 1)
    assert stats.bytes_read == len(value) + 4900 + 17


def test_async_read_of_closed_tier_raises(tmp_path):
    from tierstore.errors import StoreClosed

    tier = FileTier(tmp_path / "closed")
    tier.put("k", b"v")
    tier.close()
    with pytest.raises(StoreClosed):
        asyncio.run(tier.get_async("k"))


# ----------------------------------------------------------------- listing
def test_list_prefixes_across_directory_levels(tier):
    for key in ["a/1", "a/2", "ab/3", "b/4", "a/x/y/5", "abc", "a%/6"]:
        tier.put(key, b".")
    assert tier.list("a/") == ["a/1", "a/2", "a/x/y/5"]
    assert tier.list("a") == ["a%/6", "a/1", "a/2", "a/x/y/5", "ab/3", "abc"]
    assert tier.list("ab") == ["ab/3", "abc"]
    assert tier.list("a/x/") == ["a/x/y/5"]
    assert tier.list("a/x/y/5") == ["a/x/y/5"]
    assert tier.list("c") == [] and tier.list("b/4/deeper/") == []


def test_list_skips_leftover_temporary_files(tier):
    tier.put("dir/key", b"v")
    shard_dir = os.path.join(tier.path, "dir", shard("dir/key"))
    with open(os.path.join(shard_dir, "@tmp.deadbeef"), "wb") as leftover:  # as a crash mid-write leaves
        leftover.write(b"partial")
    assert tier.list("") == ["dir/key"]
    assert tier.list("dir/") == ["dir/key"]


# ----------------------------------------------------------------- config, pickle
def test_path_that_is_a_file_is_config_error(tmp_path):
    afile = tmp_path / "afile"
    afile.write_bytes(b"x")
    with pytest.raises(ConfigError, match="regular file"):
        FileTier(afile)
    with pytest.raises(TierUnavailable) as info:
        FileTier(afile / "below")
    assert isinstance(info.value.__cause__, OSError)


def test_pickled_tier_reopens_in_another_process(tmp_path):
    with FileTier(tmp_path / "files", fsync=False, name="disk") as tier:
        tier.put("pk", b"pickled")
        blob = pickle.dumps(tier)
    process = multiprocessing.get_context("spawn").Process(target=_read_pickled, args=(blob,))
    process.start()
    process.join(120)
    code = process.exitcode
    process.close()
    assert code == 0
