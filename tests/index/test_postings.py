"""Posting-list segments: read plans cover exactly what is asked (plus merged gaps), checksums hold."""

from __future__ import annotations

import numpy as np
import pytest

from tierstore import CorruptData
from tierstore.index.postings import empty_directory, fetch_lists, list_bytes, plan_reads, write_segments
from tierstore.tiers import MemoryTier


@pytest.fixture
def stored():
    tier = MemoryTier()
    directory = empty_directory(40)
    rng = np.random.default_rng(0)
    lists, counts = {}, {}
    for i in range(40):
        n = int(rng.integers(1, 50))
        ids = rng.integers(0, 10**6, n)
        lists[i] = list_bytes(ids, rng.integers(0, 256, n * 16, dtype=np.uint8).tobytes())
        counts[i] = n
    write_segments(tier, "p", directory, lists, counts, first_segment=0, segment_bytes=8192)
    return tier, directory, lists


def test_segments_and_directory(stored):
    tier, directory, lists = stored
    assert len(directory.segment_keys) >= 3
    assert (np.diff(directory.segment) >= 0).all()  # list order is segment order


@pytest.mark.parametrize("gap", [0, 64, 1 << 20])
def test_plan_reads_only_what_is_needed(stored, gap):
    tier, directory, lists = stored
    wanted = np.array([1, 2, 3, 9, 17, 18, 30, 39])
    plan = plan_reads(directory, wanted, coalesce_gap=gap)
    covered = np.concatenate(plan.lists)
    assert sorted(covered.tolist()) == wanted.tolist()
    needed = int(directory.length[wanted].sum())
    for (key, start, end), group in zip(plan.requests, plan.lists):
        assert {directory.segment_keys[directory.segment[i]] for i in group} == {key}
        assert start == directory.offset[group].min() and end == (directory.offset + directory.length)[group].max()
    if gap == 0:
        assert plan.bytes <= needed + 64 * len(wanted)  # alignment padding at most
    # segments never leak into each other: a read stays inside its segment's lists
    assert len(plan.requests) >= len({directory.segment[i] for i in wanted})


def test_fetch_verifies(stored):
    tier, directory, lists = stored
    got, plan = fetch_lists(tier, directory, np.arange(40), coalesce_gap=1 << 20)
    assert len(plan.requests) == len(directory.segment_keys)
    for i, (ids, codes) in got.items():
        assert ids.tobytes() + codes.tobytes() == lists[i]
    key = directory.segment_keys[0]
    damaged = bytearray(tier.get(key))
    damaged[int(directory.offset[0]) + 3] ^= 1
    tier.put(key, bytes(damaged))
    with pytest.raises(CorruptData, match="posting list 0"):
        fetch_lists(tier, directory, np.array([0]))
