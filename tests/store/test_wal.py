"""WriteAheadLog: exact round trips, crash safety under SIGKILL, torn batches, damage, truncation."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.store.conftest import flip_byte
from tierstore.errors import AlreadyExists, CorruptData, InvalidArgument, InvalidType, WriterConflict
from tierstore.store.blob import decode_blob
from tierstore.store.wal import WriteAheadLog
from tierstore.store.wal_records import DeleteRecord, UpsertRecord, encode_record

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def record_for(lsn: int, dim: int = 32) -> UpsertRecord | DeleteRecord:
    """The deterministic record that the crash child appends at ``lsn``."""
    rng = np.random.default_rng(lsn)
    rows = 1 + lsn % 40
    ids = np.arange(rows, dtype=np.int64) + lsn * 1000
    if lsn % 7 == 0:
        return DeleteRecord(ids)
    attributes = [{"lsn": lsn, "row": i, "tags": ["a", str(i)]} for i in range(rows)] if lsn % 2 else None
    return UpsertRecord(ids, rng.standard_normal((rows, dim), dtype=np.float32), attributes)


def replayed(log, after=None):
    return list(log.replay(after))


# ------------------------------------------------------------------ round trips
def test_round_trip_is_exact(tier):
    log = WriteAheadLog(tier, "docs")
    assert log.last_lsn == 0 and len(log) == 0 and replayed(log) == []
    records = [record_for(n) for n in range(1, 16)]
    assert [log.append(r) for r in records[:5]] == [1, 2, 3, 4, 5]
    assert log.append_many(records[5:]) == list(range(6, 16))
    got = replayed(log)
    assert [lsn for lsn, _ in got] == list(range(1, 16))
    for (lsn, record), want in zip(got, records):
        assert type(record) is type(want) and record == want
        assert record.ids.dtype == np.int64 and record.ids.tobytes() == want.ids.tobytes()
        if isinstance(want, UpsertRecord):
            assert record.vectors.dtype == np.float32 and record.vectors.tobytes() == want.vectors.tobytes()
            assert record.attributes == want.attributes
    assert [n for n, _ in log.replay(after=12)] == [13, 14, 15]
    assert tier.list("docs/wal/")[:2] == ["docs/wal/00000000000000000001", "docs/wal/00000000000000000002"]


def test_replayed_arrays_are_zero_copy_views(lmdb_tier):
    log = WriteAheadLog(lmdb_tier, "c")
    vectors = np.random.default_rng(0).standard_normal((100, 384), dtype=np.float32)
    log.append(UpsertRecord(np.arange(100), vectors))
    (_, record), = replayed(log)
    for array in (record.ids, record.vectors):
        assert not array.flags.owndata and not array.flags.writeable  # a view on the fetched bytes
    assert np.shares_memory(record.ids, record.vectors) is False
    assert record.vectors.base is not None and record.vectors.shape == (100, 384)


def test_record_format(lmdb_tier):
    log = WriteAheadLog(lmdb_tier, "c", writer="w1")
    log.append_many([UpsertRecord([5, 6], np.ones((2, 3)), [{"a": 1}, {}]), DeleteRecord([5])])
    blob = decode_blob(lmdb_tier.get("c/wal/00000000000000000001"))
    assert blob.header == {"kind": "wal-record", "format": 1, "lsn": 1, "batch": [1, 2], "op": "upsert",
                           "count": 2, "dim": 3, "writer": "w1"}
    assert np.frombuffer(blob.section("ids"), "<i8").tolist() == [5, 6]
    assert np.frombuffer(blob.section("vectors"), "<f4").tolist() == [1.0] * 6
    assert json.loads(bytes(blob.section("attributes"))) == [{"a": 1}, {}]
    delete = decode_blob(lmdb_tier.get("c/wal/00000000000000000002"))
    assert delete.header["op"] == "delete" and delete.header["batch"] == [1, 2]
    assert set(delete.sections) == {"ids"}


def test_reopen_continues_lsns(make_tier):
    log = WriteAheadLog(make_tier(), "c")
    log.append_many([record_for(n) for n in range(1, 6)])
    log.tier.close()
    reopened = WriteAheadLog(make_tier(), "c")
    assert reopened.last_lsn == 5 and len(reopened) == 5
    assert reopened.append(record_for(6)) == 6
    assert [r for _, r in reopened.replay()] == [record_for(n) for n in range(1, 7)]


# ------------------------------------------------------------------ crash safety
CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from tests.store.test_wal import child_main
child_main(sys.argv[2], json.loads(sys.argv[3]))
"""


def open_tier(kind: str, where: dict):
    from tierstore.tiers import FileTier, LmdbTier, S3Tier

    if kind == "lmdb":
        return LmdbTier(where["path"], map_size=64 * 1024 * 1024)
    if kind == "file":
        return FileTier(where["path"])
    return S3Tier(where["bucket"], prefix=where["prefix"], endpoint_url=where["endpoint_url"])


def child_main(kind: str, where: dict) -> None:
    """Append records forever, printing each LSN once its append has returned."""
    log = WriteAheadLog(open_tier(kind, where), "crash")
    while True:
        lsn = log.last_lsn + 1
        if lsn % 4 == 0:  # group commits too: a torn batch must vanish as a whole
            lsns = log.append_many([record_for(n, dim=384) for n in range(lsn, lsn + 3)])
        else:
            lsns = [log.append(record_for(lsn, dim=384))]
        sys.stdout.write("".join(f"{n}\n" for n in lsns))
        sys.stdout.flush()


@pytest.mark.parametrize("kind, rounds", [("lmdb", 5), ("file", 5), ("s3", 3)])
def test_acknowledged_appends_survive_sigkill(kind, rounds, tmp_path, request):
    where = request.getfixturevalue("s3_location") if kind == "s3" else {"path": str(tmp_path / kind)}
    rng = random.Random(1234)
    acknowledged: set[int] = set()
    env = {**os.environ, "PYTHONPATH": ROOT}
    for _ in range(rounds):
        child = subprocess.Popen([sys.executable, "-c", CHILD, ROOT, kind, json.dumps(where)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            target = rng.randint(2, 25)
            seen = 0
            while seen < target:
                line = child.stdout.readline()
                assert line, f"child died early: {child.stderr.read().decode()[-2000:]}"
                acknowledged.add(int(line))
                seen += 1
            time.sleep(rng.uniform(0, 0.02))  # land somewhere inside a later append
            child.send_signal(signal.SIGKILL)
            out, _ = child.communicate(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
        assert child.returncode == -signal.SIGKILL
        acknowledged.update(int(line) for line in out.split())
        tier = open_tier(kind, where)
        try:
            log = WriteAheadLog(tier, "crash")
            got = replayed(log)
            lsns = [lsn for lsn, _ in got]
            assert lsns == list(range(1, len(lsns) + 1))  # contiguous from 1: nothing partial, no gap
            assert acknowledged <= set(lsns)  # every acknowledged append survived
            assert log.last_lsn == lsns[-1]
            for lsn, record in got:  # every record, acknowledged or not, is exactly what was written
                assert record == record_for(lsn, dim=384), lsn
        finally:
            tier.close()


# ------------------------------------------------------------------ torn batches, damage
def test_torn_batch_is_dropped_whole_and_its_lsns_reused(tier):
    """What a crash inside a put_many leaves on S3 or files: some records of the batch."""
    log = WriteAheadLog(tier, "c", writer="w")
    log.append_many([record_for(n) for n in range(1, 4)])
    for lsn in (4, 6):  # batch 4..7: records 5 and 7 never landed
        tier.put(log.key(lsn), encode_record(record_for(lsn), lsn, (4, 7), "w"), mode="create")
    reopened = WriteAheadLog(tier, "c")
    assert reopened.last_lsn == 3
    assert [n for n, _ in reopened.replay()] == [1, 2, 3]
    assert reopened.append(record_for(40)) == 4  # the torn records are deleted first
    assert [(n, r) for n, r in reopened.replay(after=3)] == [(4, record_for(40))]
    assert not tier.contains(log.key(6))


def test_torn_tail_missing_its_last_records(tier):
    log = WriteAheadLog(tier, "c", writer="w")
    log.append(record_for(1))
    tier.put(log.key(2), encode_record(record_for(2), 2, (2, 5), "w"), mode="create")
    assert WriteAheadLog(tier, "c").last_lsn == 1
    assert [n for n, _ in WriteAheadLog(tier, "c").replay()] == [1]


def test_gap_in_the_middle_is_damage(tier):
    log = WriteAheadLog(tier, "c")
    for n in range(1, 6):
        log.append(record_for(n))
    tier.delete(log.key(3))
    with pytest.raises(CorruptData, match="00000000000000000003"):
        replayed(WriteAheadLog(tier, "c"))


@pytest.mark.parametrize("where", [40, -100, -1])
def test_corrupt_record_raises_naming_the_key(tier, where):
    log = WriteAheadLog(tier, "c")
    log.append_many([record_for(n) for n in range(1, 5)])
    flip_byte(tier, log.key(3), where)
    seen = []
    with pytest.raises(CorruptData, match="c/wal/00000000000000000003"):
        for lsn, _ in WriteAheadLog(tier, "c", replay_batch=2).replay():
            seen.append(lsn)
    assert seen == [1, 2]  # the damaged record and what follows it are never yielded


def test_record_copied_to_another_lsn_is_corrupt(lmdb_tier):
    log = WriteAheadLog(lmdb_tier, "c")
    log.append(record_for(1))
    lmdb_tier.put(log.key(2), lmdb_tier.get(log.key(1)))
    with pytest.raises(CorruptData, match="says it is LSN 1"):
        replayed(log)


# ------------------------------------------------------------------ two writers
def test_second_writer_is_detected_and_never_skips_ahead(tier):
    first = WriteAheadLog(tier, "c")
    assert first.append(record_for(1)) == 1
    second = WriteAheadLog(tier, "c")
    assert second.append(record_for(2)) == 2
    with pytest.raises(AlreadyExists, match="another writer is appending") as taken:
        first.append(record_for(99))
    assert type(taken.value) is WriterConflict
    with pytest.raises(WriterConflict, match="another writer"):  # fenced: it does not retry at LSN 3
        first.append_many([record_for(98)])
    assert first.last_lsn == 1
    assert second.append(record_for(3)) == 3
    assert [r for _, r in second.replay()] == [record_for(n) for n in (1, 2, 3)]


def test_threads_sharing_one_log_get_distinct_contiguous_lsns(lmdb_tier):
    import threading

    log = WriteAheadLog(lmdb_tier, "c")
    got: dict[int, UpsertRecord] = {}

    def work(thread):
        for i in range(15):
            record = UpsertRecord([thread * 100 + i], np.full((1, 4), thread, np.float32))
            lsns = log.append_many([record]) if i % 2 else [log.append(record)]
            got[lsns[0]] = record

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(got) == list(range(1, 61)) and log.last_lsn == 60
    assert all(record == got[lsn] for lsn, record in log.replay())


def test_retried_append_that_already_landed_is_not_a_conflict(lmdb_tier):
    log = WriteAheadLog(lmdb_tier, "c", writer="me")
    record = record_for(1)
    lmdb_tier.put(log.key(1), encode_record(record, 1, (1, 1), "me"))  # as if a lost response was retried
    assert log.append(record) == 1
    assert replayed(log) == [(1, record)]


# ------------------------------------------------------------------ truncation
def test_truncate_then_replay_and_reopen(tier):
    log = WriteAheadLog(tier, "c")
    log.append_many([record_for(n) for n in range(1, 9)])
    assert log.truncate(5) == 5
    assert log.truncated_upto == 5 and len(log) == 3
    assert [n for n, _ in log.replay()] == [6, 7, 8]
    assert [n for n, _ in log.replay(after=7)] == [8]
    with pytest.raises(InvalidArgument, match="records 4..5 .* were truncated"):
        replayed(log, after=3)
    with pytest.raises(CorruptData, match="ends at LSN 8"):
        replayed(log, after=12)
    with pytest.raises(InvalidArgument, match="past the last record"):
        log.truncate(9)
    assert log.truncate(3) == 0  # below the floor: nothing left to do
    assert log.truncate(8) == 3 and replayed(log) == [] and len(log) == 0
    reopened = WriteAheadLog(tier, "c")  # empty, yet LSNs continue: a checkpoint at 8 stays valid
    assert reopened.last_lsn == 8 and reopened.append(record_for(9)) == 9
    assert [n for n, _ in reopened.replay(after=8)] == [9]


def test_crash_midway_through_truncate(lmdb_tier):
    log = WriteAheadLog(lmdb_tier, "c")
    log.append_many([record_for(n) for n in range(1, 7)])
    lmdb_tier.put("c/wal/floor", decode_floor_blob(4))  # the floor was written, no record deleted yet
    lmdb_tier.delete(log.key(1))  # ... or only the oldest
    reopened = WriteAheadLog(lmdb_tier, "c")
    assert reopened.truncated_upto == 4 and [n for n, _ in reopened.replay()] == [5, 6]
    assert reopened.truncate(4) == 3  # the leftovers 2..4 go now
    assert lmdb_tier.list("c/wal/") == ["c/wal/00000000000000000005", "c/wal/00000000000000000006", "c/wal/floor"]


def decode_floor_blob(floor):
    from tierstore.store.wal import _encode_floor

    return _encode_floor(floor)


# ------------------------------------------------------------------ bad input
GOOD_VECTORS = np.zeros((2, 4), dtype=np.float32)


@pytest.mark.parametrize("make, error, match", [
    (lambda: UpsertRecord(np.array([1.0, 2.0]), GOOD_VECTORS), InvalidType, "ids must be integers"),
    (lambda: UpsertRecord(np.array([True, False]), GOOD_VECTORS), InvalidType, "ids must be integers"),
    (lambda: UpsertRecord(["a", "b"], GOOD_VECTORS), InvalidType, "ids must be integers"),
    (lambda: UpsertRecord([[1, 2]], GOOD_VECTORS), InvalidArgument, "ids must be 1-D"),
    (lambda: UpsertRecord([], np.zeros((0, 4))), InvalidArgument, "at least one id"),
    (lambda: UpsertRecord([1, -1], GOOD_VECTORS), InvalidArgument, "-1 pads"),
    (lambda: UpsertRecord(np.array([1, 2**63], dtype=np.uint64), GOOD_VECTORS), InvalidArgument, "2\\*\\*63"),
    (lambda: UpsertRecord([1, 1], GOOD_VECTORS), InvalidArgument, "repeat"),
    (lambda: UpsertRecord([1, 2], np.zeros((2, 4), dtype=np.int32)), InvalidType, "floating point"),
    (lambda: UpsertRecord([1, 2], np.zeros((2, 4), dtype=np.complex64)), InvalidType, "floating point"),
    (lambda: UpsertRecord([1, 2], np.zeros((3, 4))), InvalidArgument, r"shape \(2, dim\)"),
    (lambda: UpsertRecord([1, 2], np.zeros(8)), InvalidArgument, r"shape \(2, dim\)"),
    (lambda: UpsertRecord([1, 2], np.zeros((2, 0))), InvalidArgument, r"shape \(2, dim\)"),
    (lambda: UpsertRecord([1, 2], np.array([[0, 0], [0, math.nan]])), InvalidArgument, "row 1, id 2"),
    (lambda: UpsertRecord([1, 2], np.array([[math.inf, 0], [0, 0]], np.float32)), InvalidArgument, "NaN or inf"),
    (lambda: UpsertRecord([1, 2], np.full((2, 2), 1e300)), InvalidArgument, "in float32"),
    (lambda: UpsertRecord([1, 2], GOOD_VECTORS, [{}]), InvalidArgument, "one dict per id"),
    (lambda: UpsertRecord([1, 2], GOOD_VECTORS, {"a": 1}), InvalidType, "list of dicts"),
    (lambda: UpsertRecord([1, 2], GOOD_VECTORS, [{}, "x"]), InvalidType, r"attributes\[1\] must be a dict"),
    (lambda: UpsertRecord([1, 2], GOOD_VECTORS, [{}, {"y": math.nan}]), InvalidArgument,
     r"attributes\[1\]\['y'\]"),
    (lambda: UpsertRecord([1, 2], GOOD_VECTORS, [{}, {"y": object()}]), InvalidType, "is a object"),
    (lambda: DeleteRecord([0.5]), InvalidType, "ids must be integers"),
    (lambda: DeleteRecord(7), InvalidArgument, "1-D"),
    (lambda: UpsertRecord([1, 2], [[0.0, 1.0], [2.0]]), InvalidArgument, "cannot be read as an array"),
])
def test_bad_records_raise_typed_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_appends_write_nothing(lmdb_tier):
    log = WriteAheadLog(lmdb_tier, "c")
    with pytest.raises(InvalidType, match="UpsertRecord or a DeleteRecord"):
        log.append({"ids": [1]})  # type: ignore[arg-type]
    with pytest.raises(InvalidType, match="UpsertRecord or a DeleteRecord"):
        log.append_many([record_for(1), "not a record"])  # type: ignore[list-item]
    with pytest.raises(InvalidType, match="a list of records"):
        log.append_many(record_for(1))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="after must be an LSN"):
        replayed(log, after=-1)
    with pytest.raises(InvalidArgument, match="upto must be an LSN"):
        log.truncate("3")  # type: ignore[arg-type]
    assert log.append_many([]) == []
    assert lmdb_tier.list("c/") == [] and log.last_lsn == 0


def test_records_are_immutable_copies():
    ids, vectors = np.array([3, 4]), np.ones((2, 2), dtype=np.float64)
    record = UpsertRecord(ids, vectors, [{"t": [1]}, {}])
    ids[0], vectors[0, 0] = 99, 5.0
    assert record.ids.tolist() == [3, 4] and record.vectors[0, 0] == 1.0 and record.vectors.dtype == np.float32
    with pytest.raises(ValueError):
        record.vectors[0, 0] = 2.0
    with pytest.raises(TypeError):
        record.attributes[0]["t"] = 2  # type: ignore[index]
    assert record.attributes[0]["t"] == (1,)
    assert UpsertRecord(np.array([1], np.uint32), [[1.5]]).ids.dtype == np.int64


# ------------------------------------------------------------------ async
@pytest.mark.parametrize("make_tier", ["lmdb", "s3", "memory+file"], indirect=True)  # one code path: 3 suffice
def test_async_twins(make_tier):
    log = WriteAheadLog(make_tier(), "c")

    async def main():
        assert await log.append_async(record_for(1)) == 1
        assert await log.append_many_async([record_for(2), record_for(3)]) == [2, 3]
        got = [(lsn, record) async for lsn, record in log.replay_async()]
        assert got == [(n, record_for(n)) for n in (1, 2, 3)]
        assert await log.truncate_async(2) == 2
        assert [lsn async for lsn, _ in log.replay_async(after=2)] == [3]

    asyncio.run(main())


def test_throughput_smoke(lmdb_tier):
    """Not a benchmark: 200 group-committed records of 100 x 384 round-trip quickly."""
    log = WriteAheadLog(lmdb_tier, "perf")
    vectors = np.random.default_rng(1).standard_normal((100, 384), dtype=np.float32)
    records = [UpsertRecord(np.arange(i * 100, i * 100 + 100), vectors) for i in range(200)]
    start = time.perf_counter()
    for i in range(0, 200, 50):
        log.append_many(records[i:i + 50])
    count = sum(len(record) for _, record in log.replay())
    assert count == 200 * 100
    assert time.perf_counter() - start < 10
