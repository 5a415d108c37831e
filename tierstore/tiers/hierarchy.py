"""TieredStore: tiers stacked top (fast, small) to bottom (durable, large).

The store offers the same surface as a single tier and adds ``pin``/``unpin``,
``prefetch`` and ``flush``. Level ``0`` is the top; the last level is the *bottom*,
which holds the authoritative copy when it is durable.

Reads go top-down; a hit below the top is promoted into every level above it that has
room (``promote=True``). ``get_range`` reads from the first level holding the key and
never promotes (a range of a large blob should not pull the whole blob up);
``get_ranges`` does the same for a batch, one batched read per level.

Writes follow ``write_policy``:

* ``"write-through"``: the bottom is written first, then the value is placed in the
  highest level whose budget it fits. A put is durable when it returns.
* ``"write-back"``: the value is placed in the highest level it fits and marked dirty;
  it reaches the bottom when it is evicted down to it, on :meth:`flush`, or on
  :meth:`close`. ``mode="create"`` puts always write through, so create-only semantics
  hold across processes.

A level with a byte budget (``budgets[i]``, default the tier's ``capacity_bytes``) is
*tracked*: the store knows its keys and sizes and evicts with the level's policy
(LRU, LFU or cost-aware) when a placement would pass the budget. Eviction demotes: the
victim is written to the next level down (or further, where it fits) unless a copy is
already there, so the last copy of a value is never dropped, except from a bottom level
that is not durable (a pure cache). A durable bottom cannot have a budget. A level without
a budget is never evicted from.

Statistics: :meth:`stats` returns a :class:`HierarchyStats` whose ``levels`` hold per-level
counters. A lookup that misses level ``i`` is then looked up at ``i + 1``, so
``levels[i].misses == levels[i + 1].gets`` and the store's misses are the bottom's.

Thread safety: bookkeeping, cache-level writes and evictions run under one lock; bottom
reads and write-through bottom writes run outside it, with per-key locks ordering writes
to one key and generation counters keeping a slow read from promoting a stale value.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import AlreadyExists, ConfigError, InvalidArgument, InvalidType, NotFound
from .base import BaseTier, validate_key
from ._levels import LevelStack
from .stats import TierStats

__all__ = ["TieredStore", "HierarchyStats", "WRITE_POLICIES"]

WRITE_POLICIES = ("write-through", "write-back")
_STRIPES = 64


@dataclass(frozen=True)
class HierarchyStats(TierStats):
    """Counters of the whole store plus one :class:`TierStats` per level (top first)."""

    levels: tuple[TierStats, ...] = ()
    dirty: int = 0
    pinned: int = 0


class TieredStore(BaseTier):
    """A stack of tiers with the single-tier surface; see the module docstring.

    :param tiers: top (fastest) to bottom (durable); the store owns and closes them.
    :param write_policy: ``"write-through"`` (default) or ``"write-back"``.
    :param budgets: byte budget per level (``None`` = untracked, never evicted);
        default: each tier's ``capacity_bytes``.
    :param policy: eviction policy per tracked level: ``"lru"``, ``"lfu"``, ``"cost"``
        or a zero-argument factory (see :mod:`tierstore.tiers.policy`).
    :param promote: copy values found below the top into the levels above.
    :param borrowed: tiers of the stack that someone else owns: :meth:`close` leaves
        them open (say, a database's tier under a cache level of its own).
    """

    kind = "tiered"

    def __init__(self, tiers: Sequence[BaseTier], *, write_policy: str = "write-through",
                 budgets: Sequence[int | None] | None = None, policy: Any = "lru", promote: bool = True,
                 name: str | None = None, max_workers: int = 8, borrowed: Iterable[BaseTier] = ()) -> None:
        if isinstance(tiers, BaseTier) or not isinstance(tiers, Sequence) or not tiers:
            raise InvalidType("tiers must be a non-empty list of tiers, top (fastest) first")
        for tier in tiers:
            if not isinstance(tier, BaseTier):
                raise InvalidType(f"every tier must be a tierstore tier, got {type(tier).__name__}")
        if len({id(t) for t in tiers}) != len(tiers):
            raise ConfigError("the same tier object appears twice in the hierarchy")
        if write_policy not in WRITE_POLICIES:
            raise InvalidArgument(f"write_policy must be one of {WRITE_POLICIES}, got {write_policy!r}")
        if budgets is None:
            budgets = [t.capacity_bytes for t in tiers]
        budgets = list(budgets)
        if len(budgets) != len(tiers):
            raise ConfigError(f"budgets has {len(budgets)} entries for {len(tiers)} tiers")
        for i, budget in enumerate(budgets):
            if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
                raise ConfigError(f"budgets[{i}] must be a positive int or None, got {budget!r}")
            if budget is not None and tiers[i].capacity_bytes is not None:
                budgets[i] = min(budget, tiers[i].capacity_bytes)
        if tiers[-1].durable and budgets[-1] is not None:
            raise ConfigError("the bottom tier is durable and holds the last copy of every value, so it cannot "
                              "have an eviction budget; pass None for it (or end the stack with a volatile cache)")
        super().__init__(name=name, max_workers=max_workers)
        self.durable = tiers[-1].durable  # type: ignore[misc]  (instance attribute overrides ClassVar)
        self.write_policy = write_policy
        self.promote = bool(promote)
        self._policy_spec = policy
        self._stack = LevelStack(tiers, budgets, policy)
        self._lock = threading.RLock()
        self._key_locks = [threading.Lock() for _ in range(_STRIPES)]
        self._generations = [0] * _STRIPES
        self._cost_local = threading.local()
        self._borrowed = {id(t) for t in borrowed}

    def __reduce__(self):
        # The copy reopens the same tiers (volatile ones arrive empty), so dirty values are
        # written down first: the copy then sees every acknowledged write.
        if not self._closed:
            self._flush()
        tiers = [level.tier for level in self._stack.levels]
        budgets = [level.budget for level in self._stack.levels]
        return (_rebuild, (tiers, {"write_policy": self.write_policy, "budgets": budgets,
                                   "policy": self._policy_spec, "promote": self.promote, "name": self.name}))

    @property
    def tiers(self) -> list[BaseTier]:
        return [level.tier for level in self._stack.levels]

    # ------------------------------------------------------------ small helpers
    @staticmethod
    def _stripe(key: str) -> int:
        return hash(key) % _STRIPES

    def _bump(self, key: str) -> None:
        self._generations[self._stripe(key)] += 1

    # ------------------------------------------------------------ primitives
    def _get(self, key: str) -> bytes:
        generation = self._generations[self._stripe(key)]
        for index, level in enumerate(self._stack.levels):
            if not level.may_hold(key):
                level.stats.record_get(False)
                continue
            try:
                value = level.tier.get(key)
            except NotFound:
                level.stats.record_get(False)
                continue
            level.stats.record_get(True, len(value))
            self._after_hit(index, key, value, generation)
            return value
        raise NotFound(f"key {key!r} not found in any tier of {self.name!r}")

    def _after_hit(self, index: int, key: str, value, generation: int) -> None:
        level = self._stack.levels[index]
        if level.tracked or (self.promote and index > 0):
            with self._lock:
                if level.tracked and key in level.resident:
                    level.policy.record_access(key)
                if self.promote and index > 0 and self._generations[self._stripe(key)] == generation:
                    for above in range(index - 1, -1, -1):
                        if not (self._stack.levels[above].tracked and key in self._stack.levels[above].resident):
                            self._stack.store_at(above, key, value, "promotions")

    def _get_range(self, key: str, start: int, end: int | None) -> bytes:
        for level in self._stack.levels:
            if not level.may_hold(key):
                level.stats.record_get(False)
                continue
            try:
                value = level.tier.get_range(key, start, end)
            except NotFound:
                level.stats.record_get(False)
                continue
            level.stats.record_get(True, len(value))
            return value
        raise NotFound(f"key {key!r} not found in any tier of {self.name!r}")

    def _get_many(self, keys: list[str]) -> list[bytes | None]:
        results: list[bytes | None] = [None] * len(keys)
        generations = [self._generations[self._stripe(k)] for k in keys]
        pending = list(range(len(keys)))
        for index, level in enumerate(self._stack.levels):
            if not pending:
                break
            asked = [i for i in pending if level.may_hold(keys[i])]
            values = level.tier.get_many([keys[i] for i in asked]) if asked else []
            found = {i: v for i, v in zip(asked, values) if v is not None}
            level.stats.record_gets(len(found), len(pending) - len(found), sum(map(len, found.values())))
            for i, value in found.items():
                results[i] = value
                self._after_hit(index, keys[i], value, generations[i])
            pending = [i for i in pending if i not in found]
        return results

    def _get_ranges(self, requests: list[tuple[str, int, int | None]]) -> list[bytes | None]:
        # Level by level, like _get_many: each level gets one batch of the requests it may
        # hold; a miss falls through to the next level. Like _get_range: no promotion.
        results: list[bytes | None] = [None] * len(requests)
        pending = list(range(len(requests)))
        for level in self._stack.levels:
            if not pending:
                break
            asked = [i for i in pending if level.may_hold(requests[i][0])]
            values = level.tier._read_ranges([requests[i] for i in asked]) if asked else []
            hits = nbytes = 0
            for i, value in zip(asked, values):
                if value is not None:
                    results[i] = value
                    hits += 1
                    nbytes += len(value)
            level.stats.record_gets(hits, len(pending) - hits, nbytes)
            if hits:
                pending = [i for i in pending if results[i] is None]
        return results

    def _size(self, key: str) -> int:
        for level in self._stack.levels:
            if level.tracked:
                if key in level.resident:
                    return level.resident[key]
                continue
            try:
                return level.tier.size(key)
            except NotFound:
                continue
        raise NotFound(f"key {key!r} not found in any tier of {self.name!r}")

    def _contains(self, key: str) -> bool:
        return any(level.resident is not None and key in level.resident
                   or level.resident is None and level.tier.contains(key) for level in self._stack.levels)

    def _list(self, prefix: str) -> Iterable[str]:
        keys: set[str] = set()
        for level in self._stack.levels:
            if level.tracked:
                keys.update(k for k in list(level.resident) if k.startswith(prefix))
            else:
                keys.update(level.tier.list(prefix))
        return keys

    def _put(self, key: str, value: memoryview, create: bool) -> None:
        self._put_one(key, value, create, self._take_cost())

    def _put_one(self, key: str, value: memoryview, create: bool, cost: float | None) -> None:
        bottom = self._stack.levels[self._stack.bottom]
        with self._key_locks[self._stripe(key)]:
            through = self.write_policy == "write-through" or create or self._stack.bottom == 0
            if create and key in self._stack.dirty:  # exists only in a cache level so far
                raise AlreadyExists(f"key {key!r} already exists in {self.name!r}")
            if through and not bottom.tracked:
                # Durable write first, outside the store lock (it may be a slow S3 PUT).
                bottom.tier.put(key, value, mode="create" if create else "overwrite")
                bottom.stats.record_put(value.nbytes)
            with self._lock:
                self._bump(key)
                if cost is None:
                    self._stack.costs.pop(key, None)
                else:
                    self._stack.costs[key] = cost
                self._stack.invalidate(key, range(self._stack.bottom))
                if through:
                    self._stack.dirty.discard(key)
                    if bottom.tracked:
                        if create and key in bottom.resident:
                            raise AlreadyExists(f"key {key!r} already exists in {self.name!r}")
                        self._stack.store_at(self._stack.bottom, key, value, "put", required=True)
                    self._stack.place_in_caches(key, value)
                elif self._stack.place_in_caches(key, value):
                    self._stack.dirty.add(key)
                else:  # fits no cache level: straight to the bottom
                    self._stack.dirty.discard(key)
                    self._stack.store_at(self._stack.bottom, key, value, "put", required=True)

    def _delete(self, key: str) -> bool:
        bottom = self._stack.levels[self._stack.bottom]
        with self._key_locks[self._stripe(key)]:
            with self._lock:
                self._bump(key)
                self._stack.dirty.discard(key)
                self._stack.costs.pop(key, None)
                self._stack.pins.pop(key, None)
                existed = self._stack.invalidate(key, range(self._stack.bottom))
                if bottom.tracked:
                    return self._stack.invalidate(key, [self._stack.bottom]) or existed
            return bottom.tier.delete(key) or existed

    # ------------------------------------------------------------ cost-aware puts
    def _take_cost(self) -> float | None:
        cost = getattr(self._cost_local, "cost", None)
        self._cost_local.cost = None
        return cost

    def put(self, key: str, value: object, *, mode: str = "overwrite", cost: float | None = None) -> None:
        """Store ``value``; ``cost`` (e.g. recompute seconds or tokens x layers) feeds the cost-aware policy."""
        if cost is not None and (isinstance(cost, bool) or not isinstance(cost, (int, float)) or not cost >= 0):
            raise InvalidArgument(f"cost must be a non-negative number, got {cost!r}")
        self._cost_local.cost = None if cost is None else float(cost)
        try:
            super().put(key, value, mode=mode)
        finally:
            self._cost_local.cost = None

    async def put_async(self, key: str, value: object, *, mode: str = "overwrite", cost: float | None = None) -> None:
        return await self._run(self.put, key, value, mode=mode, cost=cost)

    # ------------------------------------------------------------ pinning, prefetch, flush
    def pin(self, key: str) -> None:
        """Bring ``key`` to the top level and keep it from being evicted until :meth:`unpin`.

        Pins nest: a key pinned twice needs two unpins. Raises :class:`NotFound` for a
        missing key and :class:`CapacityError` when the top level is full of pinned values.
        """
        key = validate_key(key)
        self._check_open()
        top = self._stack.levels[0]
        with self._lock:
            if not top.may_hold(key) or not top.tier.contains(key):
                value = self._get(key)  # promotes when it can
                if not top.tier.contains(key):
                    self._stack.store_at(0, key, value, "promotions", required=True)
            self._stack.pins[key] = self._stack.pins.get(key, 0) + 1

    def unpin(self, key: str) -> None:
        """Undo one :meth:`pin`; raise :class:`InvalidArgument` if ``key`` is not pinned."""
        key = validate_key(key)
        with self._lock:
            count = self._stack.pins.get(key)
            if count is None:
                raise InvalidArgument(f"key {key!r} is not pinned")
            if count == 1:
                del self._stack.pins[key]
            else:
                self._stack.pins[key] = count - 1

    def pinned(self) -> list[str]:
        with self._lock:
            return sorted(self._stack.pins)

    def prefetch(self, keys: Iterable[str]) -> int:
        """Read ``keys`` through the hierarchy so they are promoted; return how many exist."""
        values = self.get_many(keys)
        return sum(v is not None for v in values)

    async def prefetch_async(self, keys: Iterable[str]) -> int:
        return await self._run(self.prefetch, list(keys))

    def flush(self) -> int:
        """Write every dirty (write-back) value down to the bottom; return how many."""
        self._check_open()
        return self._flush()

    def _flush(self) -> int:
        with self._lock:
            dirty = sorted(self._stack.dirty)
            for key in dirty:
                for level in self._stack.levels[:-1]:
                    if level.may_hold(key) and level.tier.contains(key):
                        self._stack.store_at(self._stack.bottom, key, level.tier.get(key), "demotions", required=True)
                        break
                self._stack.dirty.discard(key)
            return len(dirty)

    async def flush_async(self) -> int:
        return await self._run(self.flush)

    def _close(self) -> None:
        try:
            self._flush()
        finally:
            for level in self._stack.levels:
                if id(level.tier) not in self._borrowed:
                    level.tier.close()

    # ------------------------------------------------------------ statistics
    def stats(self) -> HierarchyStats:
        base = super().stats()
        levels = []
        for level in self._stack.levels:
            own = level.tier.stats()
            counts = level.stats.snapshot(name=own.name, kind=own.kind, capacity_bytes=level.budget,
                                          items=len(level.resident) if level.tracked else own.items,
                                          bytes_stored=level.bytes_used if level.tracked else own.bytes_stored,
                                          extra={"tier": own.as_dict()})
            levels.append(counts)
        with self._lock:
            dirty, pinned = len(self._stack.dirty), len(self._stack.pins)
        fields = base.as_dict()
        return HierarchyStats(**fields, levels=tuple(levels), dirty=dirty, pinned=pinned)


def _rebuild(tiers, kwargs):
    return TieredStore(tiers, **kwargs)
