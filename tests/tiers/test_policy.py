"""Eviction policies: victim order, skip, aging, and a model-checked random walk."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tierstore.errors import InvalidArgument, InvalidType
from tierstore.tiers.policy import (POLICY_NAMES, CostAwarePolicy, EvictionPolicy, LFUPolicy, LRUPolicy,
                                    make_policy)

ALL_POLICIES = [LRUPolicy, LFUPolicy, CostAwarePolicy]


def fill(policy, *keys, size=10, cost=1.0):
    for key in keys:
        policy.record_insert(key, size, cost)
    return policy


def drain(policy, skip=()):
    """Evict until only skipped keys remain; return the victims in order."""
    order = []
    while (victim := policy.choose_victim(skip)) is not None:
        order.append(victim)
        policy.record_evict(victim)
    return order


# ---------------------------------------------------------------- all policies
@pytest.mark.parametrize("cls", ALL_POLICIES)
def test_empty_policy_has_no_victim(cls):
    policy = cls()
    assert len(policy) == 0 and policy.choose_victim() is None
    assert isinstance(policy, EvictionPolicy)


@pytest.mark.parametrize("cls", ALL_POLICIES)
def test_unknown_keys_are_ignored(cls):
    policy = fill(cls(), "a")
    policy.record_access("ghost")
    policy.record_remove("ghost")
    policy.record_evict("ghost")
    assert len(policy) == 1 and "ghost" not in policy
    assert policy.choose_victim() == "a"


@pytest.mark.parametrize("cls", ALL_POLICIES)
def test_skip_is_honoured_and_not_remembered(cls):
    policy = fill(cls(), "a", "b", "c")
    first = policy.choose_victim()
    second = policy.choose_victim({first})
    assert second not in (None, first) and second in policy
    assert policy.choose_victim({"a", "b", "c"}) is None
    assert policy.choose_victim() == first  # skipping left no trace
    assert len(policy) == 3


@pytest.mark.parametrize("cls", ALL_POLICIES)
def test_choose_victim_does_not_remove(cls):
    policy = fill(cls(), "a", "b")
    victim = policy.choose_victim()
    assert victim in policy and policy.choose_victim() == victim
    policy.record_remove(victim)
    assert victim not in policy and len(policy) == 1


@pytest.mark.parametrize("cls", ALL_POLICIES)
@pytest.mark.parametrize("size, cost", [(-1, 1.0), (True, 1.0), (1.5, 1.0), ("10", 1.0),
                                        (10, -1.0), (10, float("nan")), (10, float("inf")), (10, "1")])
def test_bad_size_or_cost_is_rejected(cls, size, cost):
    policy = cls()
    with pytest.raises(InvalidArgument, match="size|cost"):
        policy.record_insert("k", size, cost)
    assert "k" not in policy


# ------------------------------------------------------------------------ LRU
def test_lru_evicts_least_recently_used():
    policy = fill(LRUPolicy(), "a", "b", "c", "d")
    policy.record_access("a")
    policy.record_access("c")
    assert drain(policy) == ["b", "d", "a", "c"]


def test_lru_replacement_counts_as_use():
    policy = fill(LRUPolicy(), "a", "b")
    policy.record_insert("a", 99)
    assert policy.choose_victim() == "b" and len(policy) == 2


def test_lru_skip_walks_from_oldest():
    policy = fill(LRUPolicy(), "a", "b", "c")
    assert policy.choose_victim({"a"}) == "b"
    assert drain(policy, skip={"b"}) == ["a", "c"]
    assert len(policy) == 1 and "b" in policy


# ------------------------------------------------------------------------ LFU
def test_lfu_prefers_evicting_rarely_used():
    policy = fill(LFUPolicy(), "hot", "warm", "cold")
    for _ in range(5):
        policy.record_access("hot")
    policy.record_access("warm")
    assert policy.frequency("hot") == 6 and policy.frequency("cold") == 1
    assert drain(policy) == ["cold", "warm", "hot"]


def test_lfu_ties_go_to_least_recently_used():
    policy = fill(LFUPolicy(), "a", "b", "c")
    policy.record_access("b")
    policy.record_access("a")  # a and b both used twice, b longer ago
    assert drain(policy) == ["c", "b", "a"]


def test_lfu_new_key_starts_at_one_after_removal():
    policy = fill(LFUPolicy(), "a", "b")
    for _ in range(3):
        policy.record_access("a")
    policy.record_remove("a")
    policy.record_insert("a", 10)
    assert policy.frequency("a") == 1 and policy.frequency("gone") == 0
    assert policy.choose_victim() == "b"  # equal counts: b is older


def test_lfu_skip_crosses_frequency_buckets():
    policy = fill(LFUPolicy(), "a", "b", "c")
    policy.record_access("b")
    policy.record_access("c")
    policy.record_access("c")
    assert policy.choose_victim({"a"}) == "b"
    assert policy.choose_victim({"a", "b"}) == "c"
    assert policy.choose_victim() == "a"


# ----------------------------------------------------------------- cost-aware
def test_cost_aware_keeps_costly_item_of_same_size():
    policy = CostAwarePolicy()
    policy.record_insert("costly", 100, cost=10.0)
    policy.record_insert("cheap", 100, cost=1.0)
    assert policy.choose_victim() == "cheap"


def test_cost_aware_evicts_huge_cheap_item_before_small_ones():
    policy = CostAwarePolicy()
    for i in range(3):
        policy.record_insert(f"small{i}", 10, cost=1.0)
    policy.record_insert("huge", 10_000, cost=1.0)
    assert policy.choose_victim() == "huge"


def test_cost_aware_frequency_raises_priority():
    policy = CostAwarePolicy()
    policy.record_insert("a", 10, cost=1.0)
    policy.record_insert("b", 10, cost=1.0)
    policy.record_access("a")
    assert policy.priority("a") == pytest.approx(2 * 1.0 / 10)
    assert policy.choose_victim() == "b"


def test_cost_aware_zero_size_counts_as_one_byte():
    policy = CostAwarePolicy()
    policy.record_insert("empty", 0, cost=3.0)
    assert policy.priority("empty") == 3.0 and policy.priority("ghost") is None


def test_cost_aware_ages_stale_items_out():
    policy = CostAwarePolicy()
    policy.record_insert("stale1", 1, cost=2.0)  # H = 2
    policy.record_insert("stale2", 1, cost=2.0)
    policy.record_insert("doomed", 1, cost=1.5)  # H = 1.5
    assert policy.choose_victim() == "doomed"
    policy.record_evict("doomed")
    assert policy.clock == 1.5
    # Same frequency and a lower cost than the stale items, yet H = 1.5 + 1 > 2: without
    # aging the newcomer (H = 1) would be evicted before keys nobody has touched since.
    policy.record_insert("fresh", 1, cost=1.0)
    assert drain(policy) == ["stale1", "stale2", "fresh"]


def test_cost_aware_remove_does_not_age():
    policy = CostAwarePolicy()
    policy.record_insert("a", 1, cost=5.0)
    policy.record_remove("a")
    assert policy.clock == 0.0


def test_cost_aware_clock_never_decreases():
    policy = CostAwarePolicy()
    policy.record_insert("low", 1, cost=1.0)
    policy.record_insert("high", 1, cost=9.0)
    policy.record_evict("high")  # evicted out of order (e.g. chosen past a skip)
    policy.record_evict("low")
    assert policy.clock == 9.0


def test_cost_aware_access_recomputes_with_current_clock():
    policy = CostAwarePolicy()
    policy.record_insert("a", 1, cost=1.0)
    policy.record_insert("b", 1, cost=4.0)
    policy.record_insert("c", 1, cost=1.0)
    policy.record_evict("a")  # L = 1
    policy.record_access("c")  # H = 1 + 2 * 1 = 3 < H(b) = 4
    assert policy.priority("c") == 3.0
    assert policy.choose_victim() == "c"


def test_cost_aware_heap_stays_bounded():
    policy = CostAwarePolicy()
    fill(policy, "a", "b", "c")
    for i in range(10_000):
        policy.record_access("abc"[i % 3])
    assert len(policy._heap) <= 2 * len(policy) + CostAwarePolicy._COMPACT_SLACK + 1
    assert drain(policy) == ["b", "c", "a"]  # a was used once more; b and c tie, b older


# ----------------------------------------------------------------- make_policy
@pytest.mark.parametrize("name, cls", [("lru", LRUPolicy), ("lfu", LFUPolicy), ("cost", CostAwarePolicy),
                                       ("gdsf", CostAwarePolicy), ("cost-aware", CostAwarePolicy),
                                       ("LRU", LRUPolicy)])
def test_make_policy_by_name(name, cls):
    first, second = make_policy(name), make_policy(name)
    assert type(first) is cls and first is not second


def test_make_policy_from_factory():
    assert type(make_policy(LFUPolicy)) is LFUPolicy
    made = CostAwarePolicy()
    assert make_policy(lambda: made) is made


@pytest.mark.parametrize("spec", ["fifo", "", 42, None])
def test_make_policy_rejects_unknown_specs_listing_names(spec):
    with pytest.raises(InvalidArgument) as info:
        make_policy(spec)
    for name in POLICY_NAMES:
        assert repr(name) in str(info.value)


def test_make_policy_rejects_an_instance_with_a_hint():
    with pytest.raises(InvalidArgument, match="factory"):
        make_policy(LRUPolicy())


def test_make_policy_rejects_factory_returning_non_policy():
    with pytest.raises(InvalidType, match="record_insert"):
        make_policy(dict)


def test_policy_and_tier_modules_import_without_torch():
    code = ("import sys, tierstore.tiers, tierstore.tiers.policy, tierstore.tiers.gpu; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------- model-checked walk
KEYS = [f"k{i}" for i in range(6)]
COSTS = st.one_of(st.sampled_from([0.0, 1.0, 2.0, 10.0]),
                  st.floats(min_value=0.0, max_value=100.0, allow_nan=False, allow_infinity=False))


class PolicyModel:
    """A slow, obviously correct model of all three policies' victim order."""

    def __init__(self, kind):
        self.kind = kind
        self.entries = {}  # key -> dict(freq, size, cost, tick, priority)
        self.clock = 0.0
        self.tick = 0

    def touch(self, key):
        e = self.entries[key]
        e["freq"] += 1
        e["priority"] = self.clock + e["freq"] * e["cost"] / max(e["size"], 1)
        self.tick += 1
        e["tick"] = self.tick

    def insert(self, key, size, cost):
        e = self.entries.setdefault(key, {"freq": 0})
        e.update(size=size, cost=float(cost))
        self.touch(key)

    def evict(self, key):
        e = self.entries.pop(key, None)
        if e is not None and self.kind is CostAwarePolicy:
            self.clock = max(self.clock, e["priority"])

    def rank(self, key):
        e = self.entries[key]
        if self.kind is LRUPolicy:
            return (e["tick"],)
        if self.kind is LFUPolicy:
            return (e["freq"], e["tick"])
        return (e["priority"], e["tick"])

    def victim(self, skip):
        candidates = [k for k in self.entries if k not in skip]
        return min(candidates, key=self.rank) if candidates else None


def make_machine(cls):
    class PolicyMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.policy = cls()
            self.model = PolicyModel(cls)

        @rule(key=st.sampled_from(KEYS), size=st.integers(0, 1000), cost=COSTS)
        def insert(self, key, size, cost):
            self.policy.record_insert(key, size, cost)
            self.model.insert(key, size, cost)

        @rule(key=st.sampled_from(KEYS))
        def access(self, key):
            self.policy.record_access(key)
            if key in self.model.entries:
                self.model.touch(key)

        @rule(key=st.sampled_from(KEYS))
        def remove(self, key):
            self.policy.record_remove(key)
            self.model.entries.pop(key, None)

        @rule(key=st.sampled_from(KEYS))
        def evict_any(self, key):
            self.policy.record_evict(key)
            self.model.evict(key)

        @rule(skip=st.frozensets(st.sampled_from(KEYS)), evict=st.booleans())
        def choose(self, skip, evict):
            victim = self.policy.choose_victim(skip)
            assert victim == self.model.victim(skip)
            if victim is None:
                assert set(self.model.entries) <= skip
            else:
                assert victim in self.policy and victim not in skip
                if evict:
                    self.policy.record_evict(victim)
                    self.model.evict(victim)

        @invariant()
        def membership_matches(self):
            assert len(self.policy) == len(self.model.entries)
            for key in KEYS:
                assert (key in self.policy) == (key in self.model.entries)
            if cls is CostAwarePolicy:
                assert self.policy.clock == self.model.clock

    PolicyMachine.__name__ = f"{cls.__name__}Machine"
    PolicyMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                               suppress_health_check=[HealthCheck.too_slow])
    return PolicyMachine


TestLRUMachine = make_machine(LRUPolicy).TestCase
TestLFUMachine = make_machine(LFUPolicy).TestCase
TestCostAwareMachine = make_machine(CostAwarePolicy).TestCase
