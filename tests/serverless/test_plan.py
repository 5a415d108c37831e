"""The partition plan and the tree: pure, deterministic, complete."""

from __future__ import annotations

import numpy as np
import pytest

from tierstore.errors import InvalidArgument
from tierstore.index.postings import PostingDirectory
from tierstore.serverless.plan import TreeShape, build_plan, directory_digest, route


def directory(nlist: int = 40, seed: int = 0) -> PostingDirectory:
    rng = np.random.default_rng(seed)
    length = rng.integers(100, 5000, nlist).astype(np.int64)
    segment = (np.arange(nlist) // 10).astype(np.int32)
    segment[[3, 17]] = -1  # empty lists: nothing stored
    offset = np.zeros(nlist, np.int64)
    for seg in range(4):
        mine = np.flatnonzero(segment == seg)
        offset[mine] = 64 + np.concatenate([[0], np.cumsum(length[mine])[:-1]])
    keys = [f"c/seg/{i:08d}" for i in range(4)]
    return PostingDirectory(keys, segment, offset, length, rng.integers(1, 50, nlist).astype(np.int64),
                            np.zeros(nlist, np.uint64))


@pytest.mark.parametrize("partitions", [1, 3, 8, 38, 100])
def test_plan_covers_every_stored_list_once_in_byte_order(partitions):
    d = directory()
    plan = build_plan(d, partitions)
    stored = np.flatnonzero(d.segment >= 0)
    assert plan.partitions == min(partitions, stored.size)
    together = np.concatenate(plan.lists)
    assert sorted(together.tolist()) == stored.tolist()
    assert all(part.size for part in plan.lists)
    key = d.segment[together].astype(np.int64) * (1 << 40) + d.offset[together]
    assert (np.diff(key) > 0).all()  # runs in byte order: few ranged GETs per partition
    assert (plan.owner[d.segment < 0] == -1).all()
    for p, part in enumerate(plan.lists):
        assert (plan.owner[part] == p).all()
    assert build_plan(d, partitions).digest == plan.digest
    assert all(np.array_equal(a, b) for a, b in zip(build_plan(d, partitions).lists, plan.lists))


def test_plan_balances_bytes():
    d = directory(400, seed=3)
    plan = build_plan(d, 8)
    assert plan.nbytes.max() < 1.3 * plan.nbytes.mean()


def test_digest_changes_with_the_directory():
    d = directory()
    before = directory_digest(d)
    d.offset[5] += 64
    assert directory_digest(d) != before


def test_plan_rejects_bad_counts():
    with pytest.raises(InvalidArgument, match="partitions"):
        build_plan(directory(), 0)


def test_tree_shape_is_a_complete_forest():
    shape = TreeShape(21, 4)
    assert shape.roots() == [0, 1, 2, 3]
    assert shape.children(0) == [4, 5, 6, 7]
    assert shape.children(3) == [16, 17, 18, 19]
    assert shape.children(4) == [20]
    assert [shape.level(i) for i in (0, 3, 4, 19, 20)] == [1, 1, 2, 2, 3]
    assert shape.depth == 3
    seen = list(shape.roots())
    for node in range(21):
        seen.extend(shape.children(node))
    assert sorted(seen) == list(range(21))  # every node has exactly one parent
    assert TreeShape(8, 8).depth == 1 and TreeShape(128, 2).depth == 7  # 2+4+...+64 = 126, then 2 more
    with pytest.raises(InvalidArgument):
        TreeShape(4, 1)


def test_route_sends_each_query_to_the_partitions_of_its_lists():
    d = directory()
    plan = build_plan(d, 5)
    rng = np.random.default_rng(1)
    lists = rng.integers(-1, d.nlist, (30, 6))
    routes = route(plan, lists)
    for p in range(plan.partitions):
        expected = [q for q in range(30) if any(l >= 0 and plan.owner[l] == p for l in lists[q])]
        assert routes[p].tolist() == expected
