"""Eviction policies: which key a level of the hierarchy gives up first.

Policies are plain code with no I/O and no torch. A :class:`~tierstore.tiers.TieredStore`
tells each level's policy what happened to its keys (``record_*``) and asks it for a
victim (``choose_victim``) whenever the level is over its byte budget; the policy never
touches the data itself.

========================= ==================================================================
policy                    evicts first
========================= ==================================================================
:class:`LRUPolicy`        the least recently inserted or accessed key
:class:`LFUPolicy`        the least frequently used key; ties go to the least recently used
:class:`CostAwarePolicy`  the lowest GreedyDual-Size-Frequency priority
                          ``L + freq * cost / size``: cheap to recompute, large, rarely used
========================= ==================================================================

In every policy, inserting a key that is already tracked (a replacement) takes the new
``size`` and ``cost`` and counts as one use of the key. No policy is thread-safe: the
hierarchy serializes the calls under its own lock.
"""

from __future__ import annotations

import heapq
import math
import numbers
from collections import OrderedDict
from collections.abc import Callable, Container, Iterator
from types import MappingProxyType
from typing import Protocol, Union, runtime_checkable

from ..errors import InvalidArgument, InvalidType

__all__ = ["EvictionPolicy", "LRUPolicy", "LFUPolicy", "CostAwarePolicy", "make_policy", "POLICY_NAMES"]


@runtime_checkable
class EvictionPolicy(Protocol):
    """What the hierarchy needs from an eviction policy (one instance per level).

    ``record_insert`` registers a new key or replaces a tracked one (taking its new size
    and cost). ``record_access`` notes a hit; ``record_remove`` forgets a key the user
    deleted; ``record_evict`` forgets a key that was evicted (policies that age, like
    GDSF, advance their clock there). The last three ignore unknown keys.
    ``choose_victim`` names the next key to evict, skipping the keys in ``skip`` (pinned,
    in flight), without forgetting it: the caller moves the value, then calls
    ``record_evict``. It returns ``None`` when every tracked key is skipped or none is.
    """

    def record_insert(self, key: str, size: int, cost: float = 1.0) -> None: ...

    def record_access(self, key: str) -> None: ...

    def record_remove(self, key: str) -> None: ...

    def record_evict(self, key: str) -> None: ...

    def choose_victim(self, skip: Container[str] = ()) -> str | None: ...

    def __len__(self) -> int: ...

    def __contains__(self, key: object) -> bool: ...


def _check_entry(size: object, cost: object) -> None:
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0:
        raise InvalidArgument(f"size must be an int >= 0 (the value's length in bytes), got {size!r}")
    if isinstance(cost, bool) or not isinstance(cost, numbers.Real) or not math.isfinite(cost) or cost < 0:
        raise InvalidArgument(f"cost must be a finite number >= 0 (e.g. seconds to recompute), got {cost!r}")


class LRUPolicy:
    """Evict the least recently used key: an ordered dict, every operation O(1).

    ``choose_victim`` walks from the oldest key past the skipped ones. Not thread-safe.
    """

    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()

    def record_insert(self, key: str, size: int, cost: float = 1.0) -> None:
        _check_entry(size, cost)
        self._order[key] = None
        self._order.move_to_end(key)

    def record_access(self, key: str) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def record_remove(self, key: str) -> None:
        self._order.pop(key, None)

    def record_evict(self, key: str) -> None:
        self._order.pop(key, None)

    def choose_victim(self, skip: Container[str] = ()) -> str | None:
        for key in self._order:
            if key not in skip:
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __repr__(self) -> str:
        return f"<LRUPolicy {len(self)} keys>"


class _Bucket:
    """The keys used exactly ``freq`` times, least recently used first; a list node."""

    __slots__ = ("freq", "keys", "prev", "next")

    def __init__(self, freq: int) -> None:
        self.freq = freq
        self.keys: OrderedDict[str, None] = OrderedDict()
        self.prev: _Bucket = self
        self.next: _Bucket = self


class LFUPolicy:
    """Evict the least frequently used key, the least recently used among equals.

    Keys sit in frequency buckets kept in a doubly linked list in ascending order
    (the O(1) LFU scheme), each bucket ordered by recency, so every ``record_*`` call is
    O(1) and ``choose_victim`` is O(1 + skipped keys). Not thread-safe.
    """

    def __init__(self) -> None:
        self._head = _Bucket(0)  # sentinel: head.next is the lowest frequency
        self._bucket_of: dict[str, _Bucket] = {}

    def _bucket_after(self, node: _Bucket, freq: int) -> _Bucket:
        """The bucket for ``freq`` right after ``node``, linked in if missing."""
        nxt = node.next
        if nxt is not self._head and nxt.freq == freq:
            return nxt
        bucket = _Bucket(freq)
        bucket.prev, bucket.next = node, nxt
        node.next = nxt.prev = bucket
        return bucket

    def _detach(self, key: str, bucket: _Bucket) -> None:
        del bucket.keys[key]
        if not bucket.keys:
            bucket.prev.next, bucket.next.prev = bucket.next, bucket.prev

    def _bump(self, key: str, bucket: _Bucket) -> None:
        target = self._bucket_after(bucket, bucket.freq + 1)
        target.keys[key] = None
        self._bucket_of[key] = target
        self._detach(key, bucket)  # after linking `target`, so an emptied bucket is still its anchor

    def record_insert(self, key: str, size: int, cost: float = 1.0) -> None:
        _check_entry(size, cost)
        bucket = self._bucket_of.get(key)
        if bucket is not None:
            self._bump(key, bucket)
            return
        target = self._bucket_after(self._head, 1)
        target.keys[key] = None
        self._bucket_of[key] = target

    def record_access(self, key: str) -> None:
        bucket = self._bucket_of.get(key)
        if bucket is not None:
            self._bump(key, bucket)

    def record_remove(self, key: str) -> None:
        bucket = self._bucket_of.pop(key, None)
        if bucket is not None:
            self._detach(key, bucket)

    record_evict = record_remove  # LFU does not age

    def frequency(self, key: str) -> int:
        """How often ``key`` was inserted or accessed since it was last inserted new; 0 if untracked."""
        bucket = self._bucket_of.get(key)
        return 0 if bucket is None else bucket.freq

    def _buckets(self) -> Iterator[_Bucket]:
        node = self._head.next
        while node is not self._head:
            yield node
            node = node.next

    def choose_victim(self, skip: Container[str] = ()) -> str | None:
        for bucket in self._buckets():
            for key in bucket.keys:
                if key not in skip:
                    return key
        return None

    def __len__(self) -> int:
        return len(self._bucket_of)

    def __contains__(self, key: object) -> bool:
        return key in self._bucket_of

    def __repr__(self) -> str:
        return f"<LFUPolicy {len(self)} keys>"


class _Entry:
    __slots__ = ("freq", "size", "cost", "priority", "seq")

    def __init__(self, size: int, cost: float) -> None:
        self.freq = 0
        self.size = size
        self.cost = cost
        self.priority = 0.0
        self.seq = 0


class CostAwarePolicy:
    """GreedyDual-Size-Frequency: keep what is costly to recompute, small and often used.

    Each key has the priority ``H = L + freq * cost / size`` (a size of 0 counts as 1
    byte), computed when it is inserted or accessed; the victim is the key of lowest
    ``H``, the least recently used among equals. ``L`` is a clock that starts at 0 and
    rises to the victim's ``H`` on each ``record_evict``, so a key that was hot long ago
    ages out instead of staying forever. ``cost`` is what losing the value costs (the
    KV store passes recompute time); with equal costs the policy favours small values.

    Priorities live in a heap with lazy invalidation: an update pushes a new entry and
    leaves the old one stale, and the heap is rebuilt when stale entries outnumber live
    ones, so operations are O(log n) amortized and memory stays O(n). Not thread-safe.
    """

    _COMPACT_SLACK = 64  # never rebuild a heap this small

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._clock = 0.0
        self._seq = 0

    @property
    def clock(self) -> float:
        """The aging clock ``L``: the priority of the last evicted key (never decreases)."""
        return self._clock

    def priority(self, key: str) -> float | None:
        """The current priority ``H`` of ``key``, or ``None`` when it is not tracked."""
        entry = self._entries.get(key)
        return None if entry is None else entry.priority

    def _touch(self, key: str, entry: _Entry) -> None:
        entry.freq += 1
        entry.priority = self._clock + entry.freq * entry.cost / max(entry.size, 1)
        self._seq += 1
        entry.seq = self._seq
        heapq.heappush(self._heap, (entry.priority, entry.seq, key))
        if len(self._heap) > 2 * len(self._entries) + self._COMPACT_SLACK:
            self._compact()

    def _compact(self) -> None:
        self._heap = [(e.priority, e.seq, k) for k, e in self._entries.items()]
        heapq.heapify(self._heap)

    def _is_live(self, item: tuple[float, int, str]) -> bool:
        entry = self._entries.get(item[2])
        return entry is not None and entry.seq == item[1]

    def record_insert(self, key: str, size: int, cost: float = 1.0) -> None:
        _check_entry(size, cost)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(int(size), float(cost))
        else:
            entry.size, entry.cost = int(size), float(cost)
        self._touch(key, entry)

    def record_access(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            self._touch(key, entry)

    def record_remove(self, key: str) -> None:
        self._entries.pop(key, None)  # its heap entries go stale

    def record_evict(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            # max(): evicting a key other than the minimum (one chosen past a skip, say)
            # must not move the clock backwards.
            self._clock = max(self._clock, entry.priority)

    def choose_victim(self, skip: Container[str] = ()) -> str | None:
        heap = self._heap
        while heap and not self._is_live(heap[0]):
            heapq.heappop(heap)
        if not heap:
            return None
        if heap[0][2] not in skip:
            return heap[0][2]
        # Visit the heap in priority order without popping: a best-first walk of the
        # implicit tree (a child is never smaller than its parent).
        frontier = [(heap[0], 0)]
        while frontier:
            item, index = heapq.heappop(frontier)
            if item[2] not in skip and self._is_live(item):
                return item[2]
            for child in (2 * index + 1, 2 * index + 2):
                if child < len(heap):
                    heapq.heappush(frontier, (heap[child], child))
        return None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __repr__(self) -> str:
        return f"<CostAwarePolicy {len(self)} keys, clock {self._clock:g}>"


PolicySpec = Union[str, Callable[[], EvictionPolicy]]

#: The names :func:`make_policy` accepts, and the class each one makes.
POLICY_NAMES = MappingProxyType({
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "cost": CostAwarePolicy,
    "cost-aware": CostAwarePolicy,
    "gdsf": CostAwarePolicy,
})


def make_policy(spec: PolicySpec) -> EvictionPolicy:
    """Return a new policy from a name in :data:`POLICY_NAMES` or a zero-argument factory.

    Each call returns a fresh instance, so give each level its own call. A factory may
    be a class (``make_policy(LRUPolicy)``) or any callable returning an
    :class:`EvictionPolicy`.
    """
    valid = ", ".join(repr(name) for name in POLICY_NAMES)
    if isinstance(spec, str):
        cls = POLICY_NAMES.get(spec.strip().lower())
        if cls is None:
            raise InvalidArgument(f"unknown eviction policy {spec!r}; use one of {valid} or a zero-argument "
                                  "callable that returns a policy")
        return cls()
    is_instance = not isinstance(spec, type) and isinstance(spec, EvictionPolicy)
    if is_instance or not callable(spec):
        hint = ("; pass a factory (the class, say), not an instance, so that each level gets its own"
                if is_instance else "")
        raise InvalidArgument(f"eviction policy must be one of {valid} or a zero-argument callable that returns "
                              f"a policy, got {type(spec).__name__}{hint}")
    policy = spec()
    if not isinstance(policy, EvictionPolicy):
        raise InvalidType(f"policy factory {spec!r} returned {type(policy).__name__}, which lacks the "
                          "EvictionPolicy methods (record_insert, record_access, record_remove, "
                          "record_evict, choose_victim, __len__, __contains__)")
    return policy
