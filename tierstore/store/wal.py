"""Write-ahead log of upserts and deletes: acknowledged records survive a crash.

Layout under ``prefix`` (keys sort numerically thanks to zero padding)::

    "{prefix}/wal/{lsn:020d}"   one record per object, written with mode="create"
    "{prefix}/wal/floor"        the truncation floor: records <= floor were dropped

A record (:class:`~tierstore.store.wal_records.UpsertRecord` or
:class:`~tierstore.store.wal_records.DeleteRecord`) is a framed blob whose format
:mod:`tierstore.store.wal_records` describes; every record names the batch (first and
last LSN) it was written with. Replay decodes ``ids`` and ``vectors`` with
``np.frombuffer`` on the fetched bytes: no copy, read-only arrays.

**Durability.** :meth:`WriteAheadLog.append` returns the record's LSN only after the
tier's put returned: committed by LMDB (with ``sync=True``), fsynced and renamed by the
file tier, acknowledged by S3. Tiers write each object atomically, so a crash leaves a
whole record or none. :meth:`~WriteAheadLog.append_many` (group commit) writes a batch
with one ``put_many``; every record names its batch, and a batch of which only some
records landed before a crash (S3 and file tiers write them one by one) is *torn*:
replay stops before it and the next append deletes what landed, so a batch is
replayed whole or not at all. Any other gap in the LSNs is damage (truncation only
removes the oldest records) and raises :class:`~tierstore.errors.CorruptData`, as
does a record that fails its checksum: records are never skipped.

**One writer.** A single process (one :class:`WriteAheadLog` object) is expected to own
a log; appends are serialised by a lock (batch with ``append_many`` for throughput).
A second writer is detected when its create-only put meets an LSN that exists:
:class:`~tierstore.errors.WriterConflict` (an :class:`~tierstore.errors.AlreadyExists`),
and the object then refuses further appends (it never skips ahead). Detection is best
effort: records of a batch that raced may interleave with the other writer's, so fence
writers above the log (a writer epoch claimed through a manifest commit, and one log
prefix per epoch).

**Truncation.** After a checkpoint (a manifest that includes every record up to LSN
``n``) call ``truncate(n)``: it first records ``n`` as the floor, then deletes the
records; a crash in between leaves records below the floor, which replay ignores and
the next truncate deletes. LSNs continue above the floor after a reopen, even when
the log is empty.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import AlreadyExists, CorruptData, InvalidArgument, InvalidType, NotFound, WriterConflict
from ..tiers.base import BaseTier
from ._layout import check_prefix, default_writer_id, parse_numbered
from ._steps import Steps, call, run_steps, run_steps_async
from .blob import decode_blob, encode_blob, header_size, read_header
from .wal_records import WAL_FORMAT, DeleteRecord, Record, UpsertRecord, decode_record, encode_record

__all__ = ["WriteAheadLog"]

_HEADER_READ = 4096


# ------------------------------------------------------------- floor and listing
def _encode_floor(floor: int) -> bytes:
    return encode_blob({"kind": "wal-floor", "format": WAL_FORMAT, "floor": floor})


def _decode_floor(data: object, key: str) -> int:
    head = decode_blob(data, source=key).header
    floor = head.get("floor")
    if head.get("kind") != "wal-floor" or type(floor) is not int or floor < 0:
        raise CorruptData(f"{key!r} is not a WAL truncation floor (header {head!r:.120})")
    return floor


@dataclass(frozen=True)
class _Tail:
    """What a listing says about the log: ``floor < live LSNs``, the last complete LSN, a torn batch."""

    floor: int
    end: int
    torn: tuple[int, ...]
    live: tuple[int, ...]


# ------------------------------------------------------------------------ the log
class WriteAheadLog:
    """The write-ahead log under ``prefix`` in ``tier``; see the module docstring.

    Opening lists the log (and reads the floor and the newest record's header) to learn
    :attr:`last_lsn`; the next append continues after it. The log does not own the tier,
    and is as durable as it is: use a durable tier (LMDB with ``sync=True``, files, S3,
    or a TieredStore whose bottom is one); on a MemoryTier the log dies with the process.

    :param replay_batch: records fetched per ``get_many`` during replay (S3 fetches a
        batch in parallel).
    """

    def __init__(self, tier: BaseTier, prefix: str, *, writer: str | None = None, replay_batch: int = 64) -> None:
        if not isinstance(tier, BaseTier):
            raise InvalidType(f"tier must be a tierstore tier, got {type(tier).__name__}")
        if isinstance(replay_batch, bool) or not isinstance(replay_batch, int) or replay_batch < 1:
            raise InvalidArgument(f"replay_batch must be a positive int, got {replay_batch!r}")
        if writer is not None and not isinstance(writer, str):
            raise InvalidType(f"writer must be a str or None, got {type(writer).__name__}")
        self.tier = tier
        self.prefix = check_prefix(prefix)
        self.writer = writer or default_writer_id()
        self.replay_batch = replay_batch
        self._dir = f"{self.prefix}/wal/" if self.prefix else "wal/"
        self._floor_key = self._dir + "floor"
        self._lock = threading.Lock()
        self._fenced: str | None = None
        self._stale = False
        self._adopt(run_steps(tier, self._scan()))

    def __repr__(self) -> str:
        return f"<WriteAheadLog {self._dir!r} last_lsn={self._last} on {self.tier!r}>"

    def key(self, lsn: int) -> str:
        """The key of record ``lsn``."""
        return f"{self._dir}{lsn:020d}"

    @property
    def last_lsn(self) -> int:
        """The LSN of the last record appended (0 for a new log); the next append gets ``last_lsn + 1``."""
        return self._last

    @property
    def truncated_upto(self) -> int:
        """The truncation floor: records with LSN <= this were truncated."""
        return self._floor

    def __len__(self) -> int:
        """Records after the truncation floor (what ``replay()`` yields)."""
        return self._last - self._floor

    # ---------------------------------------------------------------- appending
    def append(self, record: Record) -> int:
        """Append ``record`` durably and return its LSN. See the module docstring."""
        return self.append_many([record])[0]

    def append_many(self, records: Iterable[Record]) -> list[int]:
        """Append ``records`` with one ``put_many`` (group commit); return their LSNs.

        Each record is its own object; after a crash, replay yields the whole batch or
        none of it. Raises :class:`WriterConflict` (an :class:`AlreadyExists`) when
        another writer took an LSN; this log then refuses further appends.
        """
        if isinstance(records, (UpsertRecord, DeleteRecord)):
            raise InvalidType("append_many takes a list of records; use append() for one")
        records = list(records)
        for record in records:
            if not isinstance(record, (UpsertRecord, DeleteRecord)):
                raise InvalidType(f"a WAL record is an UpsertRecord or a DeleteRecord, got {type(record).__name__}")
        if not records:
            return []
        with self._lock:
            self._ready_to_append()
            first, last = self._last + 1, self._last + len(records)
            items = [(self.key(lsn), encode_record(record, lsn, (first, last), self.writer))
                     for lsn, record in zip(range(first, last + 1), records)]
            self._stale = True  # until the put is known to have landed: on failure, list before the next append
            try:
                if len(items) == 1:
                    self.tier.put(*items[0], mode="create")
                else:
                    self.tier.put_many(items, mode="create")
            except AlreadyExists as exc:
                if not self._landed_as_ours(items):
                    self._fenced = (f"another writer is appending to the log {self._dir!r}: LSNs {first}..{last} "
                                    "were taken. One process may append to a log; this WriteAheadLog accepts no "
                                    "more appends (reopen it once the other writer has stopped)")
                    raise WriterConflict(self._fenced) from exc
            if self._truncated_floor() >= first:
                # Another writer checkpointed and truncated past these LSNs, so the create-only
                # puts refilled freed slots, below the floor that replay starts from: never
                # acknowledge that. Delete them (they are ours) so no part of the batch replays.
                for key, _ in items:
                    self.tier.delete(key)
                self._fenced = (f"another writer appended to the log {self._dir!r} and truncated it past LSN "
                                f"{first}: this WriteAheadLog was stale and accepts no more appends (reopen it "
                                "once the other writer has stopped)")
                raise WriterConflict(self._fenced)
            self._stale = False
            self._last = last
            return list(range(first, last + 1))

    def _truncated_floor(self) -> int:
        """The floor as stored now (another writer may have moved it): one get."""
        try:
            return _decode_floor(self.tier.get(self._floor_key), self._floor_key)
        except NotFound:
            return 0

    def _ready_to_append(self) -> None:
        if self._fenced:
            raise WriterConflict(self._fenced)
        if self._stale:
            self._adopt(run_steps(self.tier, self._scan()))
            self._stale = False
        if self._torn:  # records of a batch that never completed: never acknowledged, so drop them
            for lsn in self._torn:
                self.tier.delete(self.key(lsn))
            self._torn = ()

    def _landed_as_ours(self, items: list[tuple[str, bytes]]) -> bool:
        """After AlreadyExists: were the existing objects written by an earlier attempt of this put?"""
        stored = self.tier.get_many([key for key, _ in items])
        return all(value == blob for value, (_, blob) in zip(stored, items))

    def _adopt(self, tail: _Tail) -> None:
        self._floor, self._last, self._torn = tail.floor, tail.end, tail.torn

    # ---------------------------------------------------------------- replaying
    def replay(self, after: int | None = None) -> Iterator[tuple[int, Record]]:
        """Yield ``(lsn, record)`` for every record after ``after``, in LSN order.

        ``after`` is the LSN a checkpoint already includes (default: the truncation
        floor, i.e. everything still in the log). Raises :class:`InvalidArgument` when
        records after ``after`` were truncated, and :class:`CorruptData` for a damaged
        record, a gap, or a log that ends before ``after``. The listing is taken when
        iteration starts; records are fetched ``replay_batch`` at a time.
        """
        plan = self._plan(run_steps(self.tier, self._scan()), after)
        for start in range(0, len(plan), self.replay_batch):
            chunk = plan[start:start + self.replay_batch]
            yield from self._decode_chunk(chunk, self.tier.get_many([self.key(lsn) for lsn in chunk]))

    async def replay_async(self, after: int | None = None) -> AsyncIterator[tuple[int, Record]]:
        """Async :meth:`replay` (an async iterator) through the tier's async methods."""
        plan = self._plan(await run_steps_async(self.tier, self._scan()), after)
        for start in range(0, len(plan), self.replay_batch):
            chunk = plan[start:start + self.replay_batch]
            for item in self._decode_chunk(chunk, await self.tier.get_many_async([self.key(n) for n in chunk])):
                yield item

    def _decode_chunk(self, lsns: list[int], values: list[bytes | None]) -> Iterator[tuple[int, Record]]:
        for lsn, value in zip(lsns, values):
            key = self.key(lsn)
            if value is None:
                raise CorruptData(f"WAL record {key!r} was listed but is gone: another process truncated the log "
                                  "during replay (replay again from the newer checkpoint), or it was deleted")
            yield lsn, decode_record(value, key, lsn)

    def _plan(self, tail: _Tail, after: object) -> list[int]:
        """The LSNs to read: after..end, which must all be present."""
        if after is None:
            after = tail.floor
        elif isinstance(after, bool) or not isinstance(after, (int, np.integer)) or after < 0:
            raise InvalidArgument(f"after must be an LSN (an int >= 0) or None, got {after!r}")
        after = int(after)
        if after < tail.floor:
            raise InvalidArgument(f"records {after + 1}..{tail.floor} of {self._dir!r} were truncated; replay from "
                                  f"a checkpoint at LSN >= {tail.floor} (the checkpoint is older than the truncation)")
        if after > tail.end:
            raise CorruptData(f"the log {self._dir!r} ends at LSN {tail.end}, before the checkpoint's LSN {after}: "
                              f"records {tail.end + 1}..{after} are missing (the log was damaged or replaced)")
        present = set(tail.live)
        missing = [lsn for lsn in range(after + 1, tail.end + 1) if lsn not in present]
        if missing:
            raise CorruptData(f"the log {self._dir!r} lacks record(s) {missing[:5]} (of {len(missing)}) before LSN "
                              f"{tail.end}: truncation only removes the oldest records, so this is damage; "
                              f"restore {self.key(missing[0])!r} or rebuild from a checkpoint")
        return list(range(after + 1, tail.end + 1))

    def _scan(self) -> Steps:
        """List the log: floor, live LSNs, and whether the newest batch is complete."""
        keys = yield call("list", self._dir)
        floor = 0
        if self._floor_key in keys:
            floor = _decode_floor((yield call("get", self._floor_key)), self._floor_key)
        live = tuple(lsn for lsn in parse_numbered(keys, self._dir) if lsn > floor)
        if not live:
            return _Tail(floor, floor, (), ())
        newest = live[-1]
        key = self.key(newest)
        head = yield call("get_range", key, 0, _HEADER_READ)
        needed = header_size(head, source=key)
        if needed > len(head) >= _HEADER_READ:
            head += yield call("get_range", key, len(head), needed)
        header = read_header(head, source=key).header
        if header.get("lsn") != newest:
            raise CorruptData(f"WAL record {key!r} says it is LSN {header.get('lsn')!r}: it was copied or renamed")
        batch = header.get("batch")
        if not (isinstance(batch, list) and len(batch) == 2 and all(type(n) is int for n in batch)
                and batch[0] <= newest <= batch[1]):
            raise CorruptData(f"WAL record {key!r} has a malformed batch {batch!r:.60}; restore it or rebuild")
        first, last = batch
        present = set(live)
        if last > newest or any(lsn not in present for lsn in range(max(first, floor + 1), newest)):
            if first <= floor:  # truncation only reaches acknowledged records, never a torn batch
                raise CorruptData(f"the newest batch of {self._dir!r} ({first}..{last}) is incomplete but reaches "
                                  f"below the truncation floor {floor}: the log is damaged")
            return _Tail(floor, first - 1, tuple(lsn for lsn in live if lsn >= first), live)
        return _Tail(floor, newest, (), live)

    # ---------------------------------------------------------------- truncating
    def truncate(self, upto: int) -> int:
        """Drop the records with LSN <= ``upto``; return how many objects were deleted.

        Call it only once a committed checkpoint includes every record up to ``upto``.
        Writes the floor first, then deletes (in parallel), so a crash midway leaves
        records below the floor that replay ignores and the next truncate removes.
        """
        if isinstance(upto, bool) or not isinstance(upto, (int, np.integer)) or upto < 0:
            raise InvalidArgument(f"upto must be an LSN (an int >= 0), got {upto!r}")
        upto = int(upto)
        with self._lock:
            if self._stale:
                self._adopt(run_steps(self.tier, self._scan()))
                self._stale = False
            if upto > self._last:
                raise InvalidArgument(f"upto={upto} is past the last record ({self._last}) of {self._dir!r}; only "
                                      "appended records that a checkpoint includes may be truncated")
            if upto > self._floor:
                self.tier.put(self._floor_key, _encode_floor(upto))
                self._floor = upto
        victims = [self.key(lsn) for lsn in parse_numbered(self.tier.list(self._dir), self._dir) if lsn <= upto]
        if len(victims) > 1:
            with ThreadPoolExecutor(min(8, len(victims)), thread_name_prefix="tierstore-wal") as pool:
                list(pool.map(self.tier.delete, victims))
        elif victims:
            self.tier.delete(victims[0])
        return len(victims)

    # ---------------------------------------------------------------- async twins
    async def append_async(self, record: Record) -> int:
        """Async :meth:`append` (runs on a worker thread: appends share one lock with sync callers)."""
        return await asyncio.to_thread(self.append, record)

    async def append_many_async(self, records: Iterable[Record]) -> list[int]:
        """Async :meth:`append_many`."""
        return await asyncio.to_thread(self.append_many, list(records))

    async def truncate_async(self, upto: int) -> int:
        """Async :meth:`truncate`."""
        return await asyncio.to_thread(self.truncate, upto)
