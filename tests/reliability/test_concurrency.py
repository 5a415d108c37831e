"""Concurrency: many coroutines on one collection, two processes on one directory, two
clients committing to one S3 prefix.

Every test compares the store with a serial replay of the acknowledged operations: each
batch of vectors is a pure function of its number, so a batch is either all there with
its exact vectors or not there at all. The designed rule is *one writer per collection*
(docs/architecture.md, "One writer per collection"): a second writer gets
:class:`~tierstore.errors.WriterConflict` (or :class:`~tierstore.errors.CommitConflict`
for a checkpoint from a stale base) before it writes anything, and reopening the
collection once the other writer is done is the remedy.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

import tierstore
from tierstore.errors import CommitConflict, WriterConflict

DIM = 12
BATCH = 16


def batch_ids(batch: int) -> np.ndarray:
    return np.arange(batch * BATCH, (batch + 1) * BATCH, dtype=np.int64)


def batch_vectors(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((BATCH, DIM)).astype(np.float32)


def check_batches(col, present: set[int], absent: set[int]) -> None:
    """Every batch in ``present`` is there with its exact vectors; none of ``absent`` is."""
    for batch in sorted(present | absent):
        got = col.get(batch_ids(batch))
        hits = [g for g in got if g is not None]
        assert len(hits) in (0, BATCH), f"batch {batch} is half visible: {len(hits)} of {BATCH} rows"
        if batch in present:
            assert hits, f"acknowledged batch {batch} is missing"
            assert np.array_equal(np.stack([g["vector"] for g in hits]), batch_vectors(batch)), \
                f"batch {batch} came back with other vectors"
        else:
            assert not hits, f"batch {batch} is present but was never acknowledged (or was deleted)"
    assert col.count() == len(present) * BATCH
    if present:
        sample = sorted(present)[:: max(1, len(present) // 10)]
        res = col.search(np.stack([batch_vectors(b)[3] for b in sample]), k=1)
        assert res.ids[:, 0].tolist() == [int(batch_ids(b)[3]) for b in sample]


# ------------------------------------------------------------------ 1. asyncio
WRITERS, READERS, ROUNDS = 8, 8, 12


async def test_async_writers_and_readers_match_serial_replay(tmp_path):
    acked: list[tuple[str, int]] = []  # in acknowledgement order: the serial replay
    started: set[int] = set()
    done = asyncio.Event()
    reader_checks = [0]

    async def writer(client, col, w: int) -> None:
        rng = random.Random(w)
        mine: list[int] = []
        for j in range(ROUNDS):
            batch = w * 100 + j
            started.add(batch)
            assert await col.add(batch_ids(batch), batch_vectors(batch)) == BATCH
            acked.append(("add", batch))
            mine.append(batch)
            if j % 3 == 2:
                victim = mine.pop(rng.randrange(len(mine)))
                assert await col.delete(batch_ids(victim)) == BATCH
                acked.append(("delete", victim))
            if j % 5 == 4:
                await col.flush()

    async def reader(col, r: int) -> None:
        rng = random.Random(1000 + r)
        while not done.is_set():
            if not started:
                await asyncio.sleep(0)
                continue
            batch = rng.choice(sorted(started))
            if rng.random() < 0.5:
                got = await col.get(batch_ids(batch))
                hits = [g for g in got if g is not None]
                assert len(hits) in (0, BATCH), f"reader saw batch {batch} half applied ({len(hits)} rows)"
                if hits:
                    assert np.array_equal(np.stack([g["vector"] for g in hits]), batch_vectors(batch))
            else:
                query = batch_vectors(batch)[rng.randrange(BATCH)]
                res = await col.search(query, k=BATCH)
                ids = res.ids[0][res.ids[0] >= 0]
                seen = {int(i) // BATCH for i in ids}
                assert seen <= started, f"search returned ids of batches never added: {seen - started}"
                for i, dist in zip(ids.tolist(), res.distances[0].tolist()):  # each id with its own vector
                    want = float(((batch_vectors(i // BATCH)[i % BATCH] - query) ** 2).sum())
                    assert dist == pytest.approx(want, rel=1e-3, abs=1e-3), f"id {i} scored against another vector"
            reader_checks[0] += 1

    async with tierstore.connect_async(tmp_path, max_workers=8, flush_rows=5 * BATCH,
                                       auto_index_rows=20 * BATCH) as client:
        col = await client.create_collection("docs", dim=DIM)
        readers = [asyncio.create_task(reader(col, r)) for r in range(READERS)]
        try:
            await asyncio.gather(*(writer(client, col, w) for w in range(WRITERS)))
        finally:
            done.set()
            await asyncio.gather(*readers)  # a reader's assertion or exception fails the test here
        stats = await col.stats()
    assert reader_checks[0] >= READERS
    assert stats["index"] is not None, "the index was never built: the test did not exercise checkpoints"

    present: set[int] = set()
    for op, batch in acked:  # serial replay
        (present.add if op == "add" else present.discard)(batch)
    assert len(acked) == WRITERS * (ROUNDS + ROUNDS // 3)
    with tierstore.connect(tmp_path) as db:
        check_batches(db.collection("docs"), present, started - present)


# ------------------------------------------------------------------ 2. two processes
CHILD = r"""
import sys, time
import numpy as np
import tierstore
from tierstore.errors import WriterConflict
DIM, BATCH = %d, %d
path, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
db = tierstore.connect(path, flush_rows=4 * BATCH)
col = db.collection("docs")
print("ready", col.count(), flush=True)
sys.stdin.readline()  # both start writing at once
for batch in range(first, first + count):
    ids = np.arange(batch * BATCH, (batch + 1) * BATCH, dtype=np.int64)
    vectors = np.random.default_rng(batch).standard_normal((BATCH, DIM)).astype(np.float32)
    print("start", batch, flush=True)
    try:
        col.add(ids, vectors)
    except WriterConflict as exc:
        print("conflict", batch, str(exc).replace("\n", " "), flush=True)
        print("read", col.count(), flush=True)  # reading goes on in the losing process
        db.close()
        sys.exit(3)
    print("ack", batch, flush=True)
    if batch %% 3 == 2:
        col.flush()
db.close()
print("closed", flush=True)
""" % (DIM, BATCH)


def _spawn(path: str, first: int, count: int, errors) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, path, str(first), str(count)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=errors, text=True)


def _events(out: str) -> list[list[str]]:
    return [line.split(" ", 2) for line in out.splitlines() if line.strip()]


def test_two_processes_one_directory_second_writer_gets_typed_error(tmp_path):
    path = str(tmp_path / "store")
    with tierstore.connect(path) as db:
        db.create_collection("docs", dim=DIM).add(batch_ids(0), batch_vectors(0))
    present = {0}
    with tempfile.TemporaryFile("w+") as errors:
        procs = [_spawn(path, 100, 10, errors), _spawn(path, 200, 10, errors)]
        for proc in procs:
            line = proc.stdout.readline()
            assert line.split()[:2] == ["ready", str(BATCH)], f"child did not open the store: {line!r}"
        for proc in procs:  # go
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outs = [proc.communicate(timeout=60)[0] for proc in procs]
        errors.seek(0)
        stderr = errors.read()
    codes = sorted(proc.returncode for proc in procs)
    assert codes == [0, 3], f"want one winner and one typed loser, got exit codes {codes}:\n{outs}\n{stderr[-3000:]}"
    winner, loser = (outs[0], outs[1]) if procs[0].returncode == 0 else (outs[1], outs[0])
    won = [int(e[1]) for e in _events(winner) if e[0] == "ack"]
    assert len(won) == 10 and _events(winner)[-1] == ["closed"]
    lost = _events(loser)
    conflict = next(e for e in lost if e[0] == "conflict")
    assert "another" in conflict[2] and "open" in conflict[2], f"the error does not say what to do: {conflict[2]}"
    assert lost[-1][0] == "read" and int(lost[-1][1]) >= BATCH
    loser_acked = {int(e[1]) for e in lost if e[0] == "ack"}
    loser_tried = {int(e[1]) for e in lost if e[0] == "start"}
    present |= set(won) | loser_acked
    with tierstore.connect(path) as db:
        col = db.collection("docs")
        check_batches(col, present, loser_tried - loser_acked)
        # once the other writer is gone, the loser's remedy works: open again and write
        failed = int(conflict[1])
        col.add(batch_ids(failed), batch_vectors(failed))
        present.add(failed)
    with tierstore.connect(path) as db:
        check_batches(db.collection("docs"), present, set())


def test_second_writer_in_one_process_is_refused_until_first_closes(tmp_path):
    path = str(tmp_path / "store")
    first = tierstore.connect(path)
    col = first.create_collection("docs", dim=DIM)
    col.add(batch_ids(0), batch_vectors(0))
    with tierstore.connect(path) as second:
        other = second.collection("docs")
        assert other.count() == BATCH  # reading is fine
        with pytest.raises(WriterConflict, match="another"):
            other.add(batch_ids(1), batch_vectors(1))
        with pytest.raises(WriterConflict):
            other.delete(batch_ids(0))
    col.add(batch_ids(2), batch_vectors(2))
    first.close()
    with tierstore.connect(path) as db:
        col = db.collection("docs")
        check_batches(col, {0, 2}, {1})
        col.add(batch_ids(1), batch_vectors(1))
        check_batches(col, {0, 1, 2}, set())


# ------------------------------------------------------------------ 3. two S3 clients
def test_two_s3_clients_commit_to_one_prefix(s3_location):
    uri = f"s3://{s3_location['bucket']}/{s3_location['prefix']}"
    options = {"endpoint_url": s3_location["endpoint_url"], "flush_rows": 10 * BATCH}
    with tierstore.connect(uri, **options) as db:
        db.create_collection("docs", dim=DIM)
    acked: dict[int, set[int]] = {0: set(), 1: set()}
    conflicts = {"WriterConflict": 0, "CommitConflict": 0}
    failures: list[BaseException] = []
    barrier = threading.Barrier(2)
    lock = threading.Lock()

    def client(c: int) -> None:
        try:
            with tierstore.connect(uri, **options) as db:
                col = db.collection("docs")
                barrier.wait()
                for batch in range(1000 * (c + 1), 1000 * (c + 1) + 8):
                    for _attempt in range(20):
                        try:
                            col.add(batch_ids(batch), batch_vectors(batch))
                            with lock:
                                acked[c].add(batch)
                            col.flush()
                            break
                        except (WriterConflict, CommitConflict) as exc:
                            with lock:
                                conflicts[type(exc).__name__] += 1
                            col.close()  # the remedy the error names: reopen, then retry
                            col = db.collection("docs")
                            time.sleep(random.uniform(0, 0.02))
                    else:
                        raise AssertionError(f"client {c} never got batch {batch} in")
        except BaseException as exc:  # noqa: BLE001 - reported below with its traceback
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert not any(thread.is_alive() for thread in threads)
    if failures:
        raise failures[0]
    present = acked[0] | acked[1]
    assert len(present) == 16
    assert sum(conflicts.values()) > 0, "the clients never contended: the test did not exercise a conflict"
    with tierstore.connect(uri, **options) as db:
        check_batches(db.collection("docs"), present, set())


def test_stale_s3_handles_are_refused_before_writing(s3_location):
    """The interleavings that lost writes before: deterministic, one step at a time."""
    uri = f"s3://{s3_location['bucket']}/{s3_location['prefix']}"
    options = {"endpoint_url": s3_location["endpoint_url"]}
    with tierstore.connect(uri, **options) as db_a, tierstore.connect(uri, **options) as db_b:
        col_a = db_a.create_collection("docs", dim=DIM)
        col_b = db_b.collection("docs")
        col_a.add(batch_ids(1), batch_vectors(1))
        col_a.flush()  # commits and truncates the WAL record col_b's next append would reuse
        with pytest.raises(WriterConflict, match="open the collection again"):
            col_b.add(batch_ids(2), batch_vectors(2))
        with pytest.raises(WriterConflict):  # fenced: no later write slips in either
            col_b.add(batch_ids(3), batch_vectors(3))
        col_b.close()  # no checkpoint from a fenced handle, no error
        col_b = db_b.collection("docs")
        assert col_b.count() == BATCH
        col_b.add(batch_ids(2), batch_vectors(2))
        with pytest.raises(WriterConflict):  # col_a is the stale one now
            col_a.add(batch_ids(4), batch_vectors(4))
        with tierstore.connect(uri, **options) as db_c:
            col_c = db_c.collection("docs")  # replays batch 2 from the WAL
            col_b.flush()
            with pytest.raises(CommitConflict, match="open the collection again"):
                col_c.flush()  # from a replaced base: refused before any blob is written
            col_c.close()
    with tierstore.connect(uri, **options) as db:
        check_batches(db.collection("docs"), {1, 2}, {3, 4})
