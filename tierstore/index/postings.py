"""Posting lists as coalesced blobs: the on-tier layout, the resident directory, fetching.

A posting list is stored as ``ids`` (``count`` little-endian int64) followed by its codes
(the bytes of :meth:`~tierstore.index.quant.FaissCodes.encode_lists`). Lists are packed,
in list-number order (neighbouring lists are neighbours in space: the clustering emits
them region by region), into *segments* of about ``segment_bytes``: framed blobs
(:mod:`tierstore.store.blob`) with one 64-byte-aligned section per list, written under::

    "{prefix}/seg/{segment:08d}"

The :class:`PostingDirectory` is what stays resident: per list its segment, absolute
byte offset and length, vector count and xxh3 checksum. A query that needs lists
``L`` computes its reads with :func:`plan_reads`: one ranged read per run of wanted
lists in a segment, runs closer than ``coalesce_gap`` bytes merged (an object store
charges per request and a few KB more per GET cost nothing), all issued in one
:meth:`~tierstore.tiers.base.BaseTier.get_ranges` round. Every list is checked against
its checksum; damage is :class:`~tierstore.errors.CorruptData`, never scanned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from xxhash import xxh3_64_intdigest

from ..errors import CorruptData
from ..store.blob import encode_blob, read_header

__all__ = ["PostingDirectory", "write_segments", "plan_reads", "fetch_lists", "ReadPlan"]

_ALIGN = 64


@dataclass
class PostingDirectory:
    """Where each list lives; all arrays have one entry per list number."""

    segment_keys: list[str]
    segment: np.ndarray   # int32, index into segment_keys (-1: empty list, nothing stored)
    offset: np.ndarray    # int64, absolute byte offset in the segment blob
    length: np.ndarray    # int64, bytes
    count: np.ndarray     # int64, vectors (rows, counting replicas) in the list
    checksum: np.ndarray  # uint64, xxh3_64 of the list's bytes

    @property
    def nlist(self) -> int:
        return int(self.count.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        return {"segment": self.segment, "offset": self.offset, "length": self.length,
                "count": self.count, "checksum": self.checksum}

    def total_bytes(self) -> int:
        return int(self.length.sum())


def empty_directory(nlist: int) -> PostingDirectory:
    return PostingDirectory([], np.full(nlist, -1, np.int32), np.zeros(nlist, np.int64),
                            np.zeros(nlist, np.int64), np.zeros(nlist, np.int64), np.zeros(nlist, np.uint64))


def list_bytes(ids: np.ndarray, codes: bytes) -> bytes:
    return np.ascontiguousarray(ids, dtype="<i8").tobytes() + bytes(codes)


def write_segments(tier, prefix: str, directory: PostingDirectory, lists: dict[int, bytes], counts: dict[int, int],
                   *, first_segment: int, segment_bytes: int, key_suffix: str = "") -> list[str]:
    """Write ``lists`` (list number -> stored bytes) as new segments and point ``directory`` at them.

    Segments are numbered from ``first_segment`` (never reused, so a reader holding an
    older directory keeps valid keys). Returns the new segment keys, written before the
    directory is changed: a crash leaves only unreferenced blobs.
    """
    order = sorted(lists)
    groups: list[list[int]] = []
    size = segment_bytes
    for list_no in order:
        if size >= segment_bytes:
            groups.append([])
            size = 0
        groups[-1].append(list_no)
        size += len(lists[list_no])
    items, placed = [], []
    for number, group in enumerate(groups, start=first_segment):
        key = f"{prefix}/seg/{number:08d}{key_suffix}"
        blob = encode_blob({"kind": "posting-segment", "format": 1, "lists": group},
                           sections={str(list_no): lists[list_no] for list_no in group}, align=_ALIGN)
        info = read_header(blob, source=key)
        items.append((key, blob))
        placed.append((key, group, info))
    if items:
        tier.put_many(items)
    for key, group, info in placed:
        directory.segment_keys.append(key)
        seg = len(directory.segment_keys) - 1
        for list_no in group:
            section = info.section(str(list_no))
            directory.segment[list_no] = seg
            directory.offset[list_no] = section.offset
            directory.length[list_no] = section.length
            directory.count[list_no] = counts[list_no]
            directory.checksum[list_no] = np.uint64(section.checksum)
    return [key for key, _ in items]


@dataclass(frozen=True)
class ReadPlan:
    """Ranged reads covering some lists: ``requests[i]`` serves ``lists[i]`` (list numbers)."""

    requests: list[tuple[str, int, int]]
    lists: list[np.ndarray]

    @property
    def bytes(self) -> int:
        return sum(end - start for _, start, end in self.requests)


def plan_reads(directory: PostingDirectory, list_nos: np.ndarray, *, coalesce_gap: int = 0) -> ReadPlan:
    """Group the wanted lists into ranged reads, merging runs closer than ``coalesce_gap`` bytes."""
    list_nos = np.asarray(list_nos, dtype=np.int64)
    list_nos = list_nos[directory.segment[list_nos] >= 0]
    if list_nos.size == 0:
        return ReadPlan([], [])
    seg = directory.segment[list_nos]
    start = directory.offset[list_nos]
    order = np.lexsort((start, seg))
    list_nos, seg, start = list_nos[order], seg[order], start[order]
    end = start + directory.length[list_nos]
    # A new read starts where the segment changes or the gap to the previous list is too
    # wide. Lists of a segment never overlap, so within a segment ``end`` grows with ``start``.
    breaks = np.ones(list_nos.size, dtype=bool)
    breaks[1:] = (seg[1:] != seg[:-1]) | (start[1:] - end[:-1] > coalesce_gap)
    firsts = np.flatnonzero(breaks)
    lasts = np.append(firsts[1:], list_nos.size)
    requests, groups = [], []
    for a, b in zip(firsts.tolist(), lasts.tolist()):
        requests.append((directory.segment_keys[int(seg[a])], int(start[a]), int(end[b - 1])))
        groups.append(list_nos[a:b])
    return ReadPlan(requests, groups)


def fetch_lists(tier, directory: PostingDirectory, list_nos: np.ndarray, *,
                coalesce_gap: int = 0) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], ReadPlan]:
    """Fetch and verify lists in one round of ranged reads.

    Returns ``{list_no: (ids int64 view, codes uint8 view)}`` and the plan that was run.
    """
    plan = plan_reads(directory, list_nos, coalesce_gap=coalesce_gap)
    if not plan.requests:
        return {}, plan
    chunks = tier.get_ranges(plan.requests)
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for (key, start, _), chunk, group in zip(plan.requests, chunks, plan.lists):
        buf = memoryview(chunk)
        for list_no in group.tolist():
            a = int(directory.offset[list_no]) - start
            n = int(directory.length[list_no])
            view = buf[a:a + n]
            if view.nbytes != n or xxh3_64_intdigest(view) != int(directory.checksum[list_no]):
                raise CorruptData(f"posting list {list_no} in {key!r} fails its checksum; the segment is damaged: "
                                  "restore it or rebuild the index")
            count = int(directory.count[list_no])
            arr = np.frombuffer(view, dtype=np.uint8)
            out[list_no] = (arr[:count * 8].view("<i8"), arr[count * 8:])
    return out, plan
