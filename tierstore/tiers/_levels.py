"""The levels of a :class:`~tierstore.tiers.TieredStore` and where values sit in them.

:class:`LevelStack` is the placement engine: it knows which keys each tracked level holds,
writes values into a level (evicting with the level's policy to stay in budget), demotes
victims so that no durable value loses its last copy, and tracks dirty (write-back),
pinned and cost-annotated keys. It is not thread-safe: the store calls it under its lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..errors import CapacityError, NotFound
from .base import BaseTier
from .policy import make_policy
from .stats import StatsCounter

__all__ = ["Level", "LevelStack"]


class Level:
    """One tier in the stack and the store's bookkeeping for it."""

    __slots__ = ("tier", "budget", "policy", "resident", "bytes_used", "stats")

    def __init__(self, tier: BaseTier, budget: int | None, policy) -> None:
        self.tier = tier
        self.budget = budget
        self.policy = policy
        self.resident: dict[str, int] | None = {} if budget is not None else None
        self.bytes_used = 0
        self.stats = StatsCounter()

    @property
    def tracked(self) -> bool:
        return self.resident is not None

    def may_hold(self, key: str) -> bool:
        """False only when the level certainly lacks ``key`` (tracked levels know)."""
        return self.resident is None or key in self.resident


class LevelStack:
    """Levels top (0) to bottom, plus the dirty, pinned and cost bookkeeping."""

    def __init__(self, tiers: Sequence[BaseTier], budgets: Sequence[int | None], policy) -> None:
        self.levels = [Level(t, b, make_policy(policy) if b is not None else None) for t, b in zip(tiers, budgets)]
        self.bottom = len(self.levels) - 1
        self.dirty: set[str] = set()
        self.pins: dict[str, int] = {}
        self.costs: dict[str, float] = {}
        for level in self.levels:
            if level.tracked:
                self.scan(level)

    def scan(self, level: Level) -> None:
        """Adopt what a tracked level already holds (a persistent cache reopened)."""
        for key in level.tier.list(""):
            try:
                size = level.tier.size(key)
            except NotFound:
                continue
            level.resident[key] = size
            level.bytes_used += size
            level.policy.record_insert(key, size, 1.0)

    def cost_of(self, key: str) -> float:
        return self.costs.get(key, 1.0)

    def pinned_skip(self, protect: str):
        if not self.pins:
            return (protect,)
        skip = set(self.pins)
        skip.add(protect)
        return skip

    # ------------------------------------------------------------ placement (under self._lock)
    def store_at(self, index: int, key: str, value, reason: str, *, required: bool = False) -> bool:
        """Write ``value`` into level ``index``, evicting as needed. False if it does not fit."""
        level = self.levels[index]
        size = len(value) if not isinstance(value, memoryview) else value.nbytes
        if level.tracked:
            if size > level.budget:
                if required:
                    raise CapacityError(f"a value of {size} bytes is larger than the budget of level {index} "
                                        f"({level.tier.name}: {level.budget} bytes)")
                return False
            try:
                self.make_room(index, size, key)
            except CapacityError:
                if required:
                    raise
                return False
        try:
            level.tier.put(key, value)
        except CapacityError:
            if required:
                raise
            return False
        level.stats.record_put(size)
        if reason != "put":
            level.stats.add(reason)
        if level.tracked:
            old = level.resident.get(key)
            level.resident[key] = size
            level.bytes_used += size - (old or 0)
            level.policy.record_insert(key, size, self.cost_of(key))
        return True

    def make_room(self, index: int, size: int, protect: str) -> None:
        level = self.levels[index]
        while level.bytes_used - level.resident.get(protect, 0) + size > level.budget:
            victim = level.policy.choose_victim(self.pinned_skip(protect))
            if victim is None:
                raise CapacityError(f"level {index} ({level.tier.name}) cannot make room for {size} bytes: "
                                    f"{level.bytes_used} of {level.budget} bytes are pinned or in use")
            self.evict(index, victim)

    def evict(self, index: int, key: str) -> None:
        level = self.levels[index]
        if index < self.bottom:
            self.demote(index, key)
        elif level.tier.durable:  # unreachable by construction; kept as a guard on the invariant
            raise CapacityError("refusing to evict the last durable copy of " + repr(key))
        level.tier.delete(key)
        level.bytes_used -= level.resident.pop(key, 0)
        level.policy.record_evict(key)
        level.stats.add("evictions")

    def demote(self, index: int, key: str) -> None:
        """Make sure a current copy of ``key`` exists below level ``index`` before it leaves.

        Every copy in a cache level is current (a put invalidates the others), so only the
        bottom can hold a stale value, and only while the key is dirty.
        """
        value = None
        for below in range(index + 1, self.bottom + 1):
            target = self.levels[below]
            if target.tracked:
                has_copy = key in target.resident
            elif below == self.bottom:
                has_copy = key not in self.dirty
            else:
                has_copy = target.tier.contains(key)
            if has_copy:
                return
            if value is None:
                value = self.levels[index].tier.get(key)
            required = below == self.bottom and target.tier.durable
            if self.store_at(below, key, value, "demotions", required=required):
                if below == self.bottom:
                    self.dirty.discard(key)
                return
        # Only reachable when the bottom is a volatile cache that has no room: the value is dropped.

    def invalidate(self, key: str, levels: Iterable[int]) -> bool:
        """Remove ``key`` from the given levels; return whether any held it."""
        existed = False
        for index in levels:
            level = self.levels[index]
            if level.tracked:
                if key not in level.resident:
                    continue
                level.bytes_used -= level.resident.pop(key)
                level.policy.record_remove(key)
            existed = level.tier.delete(key) or existed
        return existed

    def place_in_caches(self, key: str, value) -> bool:
        """Put ``value`` in the highest cache level (above the bottom) it fits."""
        for index in range(self.bottom):
            if self.store_at(index, key, value, "put"):
                return True
        return False
