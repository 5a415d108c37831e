"""The partition plan and the invocation tree: pure, deterministic code, no I/O.

**Partitions.** The index's posting lists already live in S3 as segment blobs, packed
in list-number order (neighbouring lists are neighbours in space). A partition is a
run of consecutive stored lists in that byte order, so a worker loads its partition
with one ranged GET per segment it touches: the existing blobs are reused, nothing is
rewritten. Runs are cut so that partitions hold about equal bytes. The plan is a
function of the posting directory and ``P`` only, so the coordinator and every worker
compute the same plan from the same index state (checked by :func:`directory_digest`).

**Tree.** ``N`` worker nodes (node ``i`` scans partitions ``i, i+N, ...``, usually one)
form a complete ``b``-ary forest in breadth-first order: the coordinator invokes nodes
``0..b-1``; node ``i`` invokes nodes ``b*(i+1) .. b*(i+1)+b-1``. Each query is routed to
the partitions holding its probed lists, and a node is invoked only when its sub-tree
has work, so a query touching few partitions wakes few workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from xxhash import xxh3_64

from ..errors import InvalidArgument

__all__ = ["PartitionPlan", "build_plan", "directory_digest", "TreeShape", "route"]


def directory_digest(directory) -> str:
    """A fingerprint of a posting directory (where every list lives): plans agree iff digests do."""
    h = xxh3_64()
    for name, arr in sorted(directory.arrays().items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update("\x00".join(directory.segment_keys).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class PartitionPlan:
    """``P`` partitions of the stored posting lists.

    ``lists[p]``: the list numbers of partition ``p`` (in byte order);
    ``owner[list_no]``: the partition of a list, ``-1`` for lists with nothing stored;
    ``nbytes[p]``: bytes of the partition's lists.
    """

    partitions: int
    lists: tuple[np.ndarray, ...]
    owner: np.ndarray
    nbytes: np.ndarray
    digest: str


def build_plan(directory, partitions: int) -> PartitionPlan:
    """Cut the stored lists of ``directory`` into ``partitions`` byte-balanced runs.

    Asking for more partitions than there are stored lists gives one list per partition.
    """
    if isinstance(partitions, bool) or not isinstance(partitions, (int, np.integer)) or partitions < 1:
        raise InvalidArgument(f"partitions must be an int >= 1, got {partitions!r}")
    stored = np.flatnonzero(directory.segment >= 0)
    if stored.size == 0:
        raise InvalidArgument("the index stores no posting list; build the index before searching serverlessly")
    order = np.lexsort((directory.offset[stored], directory.segment[stored]))
    stored = stored[order]
    sizes = directory.length[stored].astype(np.float64)
    count = int(min(partitions, stored.size))
    # Cut where the cumulative bytes cross multiples of total / count; every part non-empty.
    ends = np.cumsum(sizes)
    cuts = np.searchsorted(ends, ends[-1] * np.arange(1, count) / count, side="left") + 1
    cuts = np.maximum(cuts, np.arange(1, count))                 # at least one list before cut i
    cuts = np.minimum(cuts, stored.size - count + np.arange(1, count))  # and enough left after it
    cuts = np.maximum.accumulate(cuts)
    bounds = np.concatenate([[0], cuts, [stored.size]])
    lists = tuple(stored[a:b].copy() for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()))
    owner = np.full(directory.nlist, -1, dtype=np.int32)
    for p, part in enumerate(lists):
        owner[part] = p
    nbytes = np.array([int(directory.length[part].sum()) for part in lists], dtype=np.int64)
    return PartitionPlan(count, lists, owner, nbytes, directory_digest(directory))


@dataclass(frozen=True)
class TreeShape:
    """``nodes`` workers in a ``branching``-ary forest; node ``i`` scans partitions ``i::nodes``."""

    nodes: int
    branching: int

    def __post_init__(self) -> None:
        for name in ("nodes", "branching"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InvalidArgument(f"{name} must be an int >= 1, got {value!r}")
        if self.branching < 2 and self.nodes > 1:
            raise InvalidArgument(f"branching must be >= 2 for {self.nodes} workers (a chain is not a tree)")

    def roots(self) -> list[int]:
        return list(range(min(self.branching, self.nodes)))

    def children(self, node: int) -> list[int]:
        first = self.branching * (node + 1)
        return list(range(first, min(first + self.branching, self.nodes)))

    def level(self, node: int) -> int:
        """1 for the nodes the coordinator invokes, 2 for their children, ..."""
        level, start, width = 1, 0, self.branching
        while node >= start + width:
            start += width
            width *= self.branching
            level += 1
        return level

    @property
    def depth(self) -> int:
        return self.level(self.nodes - 1)

    def node_partitions(self, node: int, partitions: int) -> list[int]:
        return list(range(node, partitions, self.nodes))


def route(plan: PartitionPlan, lists: np.ndarray) -> list[np.ndarray]:
    """Per partition, the (sorted) queries whose probed ``lists`` (``(nq, w)``, -1 skipped) it holds."""
    nq = lists.shape[0]
    owners = np.where(lists >= 0, plan.owner[np.maximum(lists, 0)], -1)
    q = np.repeat(np.arange(nq, dtype=np.int64), lists.shape[1])
    p = owners.ravel().astype(np.int64)
    keep = p >= 0
    pairs = np.unique(p[keep] * nq + q[keep])  # sorted by partition, then query, no duplicates
    part, query = np.divmod(pairs, nq)
    starts = np.searchsorted(part, np.arange(plan.partitions + 1))
    return [query[starts[i]:starts[i + 1]].astype(np.int32) for i in range(plan.partitions)]
