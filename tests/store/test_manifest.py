"""ManifestLog: versioned create-only commits over real LMDB, files, S3 (moto) and a TieredStore."""

from __future__ import annotations

import asyncio
import json
import math
import threading

import numpy as np
import pytest

from tests.store.conftest import flip_byte
from tierstore.errors import AlreadyExists, CommitConflict, CorruptData, InvalidArgument, InvalidType, NotFound
from tierstore.store._json import freeze_json, thaw_json
from tierstore.store._steps import run_steps
from tierstore.store.blob import decode_blob
from tierstore.store.manifest import Manifest, ManifestLog

STATE = {"dim": 384, "metric": "cosine", "lists": ["docs/list/0001", "docs/list/0002"],
         "wal": {"applied_lsn": 17}, "ratio": 0.25, "tags": [], "none": None, "ok": True, "name": "mañana ✓"}


# ------------------------------------------------------------------ round trips
def test_commit_and_load_round_trip(tier):
    log = ManifestLog(tier, "docs", writer="writer-a")
    assert log.latest() is None and log.versions() == []
    first = log.commit(STATE, expected_version=None)
    assert (first.version, first.parent, first.parent_commit_id) == (1, None, None)
    assert first.key == "docs/manifest/00000000000000000001" and first.writer == "writer-a"
    second = log.commit({**thaw_json(first.state), "wal": {"applied_lsn": 40}}, expected_version=1)
    assert (second.version, second.parent, second.parent_commit_id) == (2, 1, first.commit_id)
    assert log.versions() == [1, 2]
    latest = log.latest()
    assert latest == second
    assert thaw_json(latest.state) == {**STATE, "wal": {"applied_lsn": 40}}
    assert log.load(1) == first and thaw_json(log.load(1).state) == STATE
    with pytest.raises(NotFound, match="version 3 does not exist"):
        log.load(3)


def test_stored_format_is_a_framed_manifest_blob(tier):
    log = ManifestLog(tier, "docs", writer="w")
    manifest = log.commit({"b": 1, "a": [1.5, "x"]}, expected_version=None)
    blob = decode_blob(tier.get("docs/manifest/00000000000000000001"))
    assert blob.header == {"kind": "manifest", "format": 1, "version": 1, "parent": None,
                           "created_at": manifest.created_at, "writer": "w", "commit_id": manifest.commit_id,
                           "parent_commit_id": None}
    assert bytes(blob.payload) == b'{"a":[1.5,"x"],"b":1}'  # plain sorted JSON, nothing executable


def test_reopen_continues_versions(make_tier):
    log = ManifestLog(make_tier(), "c")
    for version in range(1, 4):
        log.commit({"n": version}, expected_version=version - 1 if version > 1 else None)
    log.tier.close()
    reopened = ManifestLog(make_tier(), "c")
    latest = reopened.latest()
    assert latest.version == 3 and latest.state == {"n": 3}
    assert reopened.commit({"n": 4}, expected_version=3).version == 4
    assert [reopened.load(v).state["n"] for v in reopened.versions()] == [1, 2, 3, 4]


def test_state_is_a_deep_read_only_snapshot(tier):
    log = ManifestLog(tier, "c")
    source = {"lists": [1, 2], "nested": {"k": [{"x": 1}]}}
    snapshot = log.commit(source, expected_version=None)
    source["lists"].append(3)  # the caller's dict is not aliased
    assert snapshot.state["lists"] == (1, 2)
    with pytest.raises(TypeError):
        snapshot.state["lists"] = []  # type: ignore[index]
    with pytest.raises(TypeError):
        snapshot.state["nested"]["k"][0]["x"] = 2  # type: ignore[index]
    reader = log.latest()
    log.commit({"lists": [9]}, expected_version=1)
    assert reader.version == 1 and reader.state["lists"] == (1, 2)  # a reader keeps its version
    edited = reader.thawed_state()
    edited["lists"].append(3)
    assert edited == {"lists": [1, 2, 3], "nested": {"k": [{"x": 1}]}}


def test_frozen_state_commits_back_unchanged(tier):
    log = ManifestLog(tier, "c")
    first = log.commit({"a": {"b": [1, {"c": None}]}, "np": np.int64(7), "f": np.float32(0.5)},
                       expected_version=None)
    assert first.state == {"a": {"b": (1, {"c": None})}, "np": 7, "f": 0.5}
    assert type(first.state["np"]) is int
    second = log.commit(first.state, expected_version=1)  # a MappingProxy state is accepted as is
    assert thaw_json(second.state) == thaw_json(first.state)


def test_nested_prefixes_do_not_see_each_other(tier):
    outer, inner = ManifestLog(tier, "a"), ManifestLog(tier, "a/manifest/x")
    inner.commit({"who": "inner"}, expected_version=None)
    assert outer.versions() == [] and outer.latest() is None
    outer.commit({"who": "outer"}, expected_version=None)
    assert outer.latest().state["who"] == "outer" and inner.latest().state["who"] == "inner"


# ------------------------------------------------------------------ conflicts
def test_stale_or_wrong_base_fails_without_writing(tier):
    log = ManifestLog(tier, "c")
    with pytest.raises(InvalidArgument, match="empty"):
        log.commit({"n": 1}, expected_version=1)
    log.commit({"n": 1}, expected_version=None)
    log.commit({"n": 2}, expected_version=1)
    keys_before = tier.list("c/")
    with pytest.raises(AlreadyExists, match="reload with latest") as lost:
        log.commit({"n": 0}, expected_version=None)
    assert type(lost.value) is CommitConflict
    with pytest.raises(CommitConflict, match="latest is now 2"):
        log.commit({"n": 3}, expected_version=1)
    with pytest.raises(InvalidArgument, match="newer than the latest"):
        log.commit({"n": 9}, expected_version=5)
    assert tier.list("c/") == keys_before
    assert log.latest().state == {"n": 2}


def test_racing_writers_exactly_one_wins_then_all_land(make_tier):
    """Writers with their own tier objects (own S3 clients) race read-modify-write commits."""
    writers = 6
    setup = ManifestLog(make_tier(), "race")
    setup.commit({"members": []}, expected_version=None)
    logs = [ManifestLog(make_tier(), "race", writer=f"w{i}") for i in range(writers)]
    barrier = threading.Barrier(writers)
    first_round: dict[int, object] = {}
    attempts = [0] * writers

    def work(i):
        log = logs[i]
        base = log.latest()
        barrier.wait()
        while True:
            attempts[i] += 1
            state = base.thawed_state()
            state["members"].append(f"w{i}")
            try:
                log.commit(state, expected_version=base.version)
            except AlreadyExists as exc:
                first_round.setdefault(i, exc)
                base = log.latest()
                continue
            first_round.setdefault(i, "won")
            return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert list(first_round.values()).count("won") == 1  # from one base, exactly one commit won
    assert all(isinstance(v, CommitConflict) or v == "won" for v in first_round.values())
    final = setup.latest()
    assert final.version == 1 + writers
    assert sorted(final.state["members"]) == sorted(f"w{i}" for i in range(writers))  # no lost update
    manifests = [setup.load(v) for v in setup.versions()]
    for parent, child in zip(manifests, manifests[1:]):
        assert child.parent == parent.version and child.parent_commit_id == parent.commit_id


def test_two_s3_tiers_on_one_prefix_race(s3_location):
    from tierstore.tiers import S3Tier

    tiers = [S3Tier(s3_location["bucket"], prefix=s3_location["prefix"], endpoint_url=s3_location["endpoint_url"])
             for _ in range(2)]
    try:
        logs = [ManifestLog(tier, "col", writer=f"s3-{i}") for i, tier in enumerate(tiers)]
        for trial in range(5):
            barrier, outcomes = threading.Barrier(2), [None, None]
            base = logs[0].latest()
            expected = base.version if base else None

            def commit(i):
                barrier.wait()
                try:
                    outcomes[i] = logs[i].commit({"trial": trial, "by": i}, expected_version=expected)
                except AlreadyExists as exc:
                    outcomes[i] = exc

            threads = [threading.Thread(target=commit, args=(i,)) for i in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            winners = [o for o in outcomes if isinstance(o, Manifest)]
            assert len(winners) == 1 and sum(isinstance(o, CommitConflict) for o in outcomes) == 1
            loser = outcomes.index(next(o for o in outcomes if isinstance(o, AlreadyExists)))
            assert logs[loser].latest() == winners[0]  # the loser reloads and sees the winner's commit
        assert logs[1].versions() == [1, 2, 3, 4, 5]
    finally:
        for tier in tiers:
            tier.close()


def test_commit_into_a_pruned_slot_is_rolled_back(tier):
    """A commit whose base listing went stale while prune freed its slot must not win."""
    log = ManifestLog(tier, "c")
    for version in range(1, 6):
        log.commit({"n": version}, expected_version=version - 1 or None)
    assert log.prune(keep=2) == [1, 2, 3] and log.versions() == [4, 5]
    with pytest.raises(CommitConflict):  # the ordinary case: the listing shows the base is stale
        log.commit({"n": "stale"}, expected_version=2)

    class StaleListing(ManifestLog):
        def _check_base(self, pending, versions):  # as if the listing predated the other commits
            pass

        def _load(self, version):  # ... and the parent was read then, before it was pruned
            if version == 2:
                return Manifest(2, 1, 0.0, "old", "c2", None, {}, self.key(2))
            return (yield from super()._load(version))

    with pytest.raises(CommitConflict, match="latest is now 5"):
        StaleListing(tier, "c").commit({"n": "stale"}, expected_version=2)
    assert log.versions() == [4, 5] and log.latest().state == {"n": 5}


def test_commit_survives_a_child_built_on_it_before_its_check(tier):
    """Interleave by hand: after our put, another writer commits on top; we still won."""
    log, other = ManifestLog(tier, "c"), ManifestLog(tier, "c")
    log.commit({"n": 1}, expected_version=None)
    steps = log._commit(*log._pending({"n": 2}, 1))
    request = steps.send(None)
    while request[0] != "put":
        request = steps.send(getattr(tier, request[0])(*request[1], **request[2]))
    steps_result = getattr(tier, "put")(*request[1], **request[2])
    child = other.commit({"n": 3}, expected_version=2)  # built on our version 2
    result = run_steps(tier, _resume(steps, steps_result))
    assert result.version == 2 and child.parent_commit_id == result.commit_id
    assert log.versions() == [1, 2, 3]


def test_retried_put_that_already_landed_counts_as_success(tier):
    """A PUT retried after a lost response finds its own bytes: not a conflict."""
    log = ManifestLog(tier, "c")
    steps = log._commit(*log._pending({"n": 1}, None))
    request = steps.send(None)
    while request[0] != "put":
        request = steps.send(getattr(tier, request[0])(*request[1], **request[2]))
    tier.put(*request[1], **request[2])  # the first attempt landed ...
    manifest = run_steps(tier, _resume(steps, error=AlreadyExists("412 on the retry")))  # ... the retry got 412
    assert manifest.version == 1 and log.latest() == manifest


def _resume(steps, value=None, error=None):
    """Continue a half-driven protocol under run_steps: deliver ``value`` (or throw ``error``) first."""
    while True:
        try:
            request = steps.throw(error) if error is not None else steps.send(value)
        except StopIteration as done:
            return done.value
        error = None
        try:
            value = yield request
        except Exception as exc:  # noqa: BLE001
            error = exc


# ------------------------------------------------------------------ prune, corruption, input
def test_prune_keeps_the_newest(tier):
    log = ManifestLog(tier, "c")
    for version in range(1, 5):
        log.commit({"n": version}, expected_version=version - 1 or None)
    assert log.prune(keep=10) == []
    assert log.prune(keep=3) == [1]
    assert log.prune(keep=1) == [2, 3]
    assert log.versions() == [4] and log.prune(keep=1) == []
    assert log.commit({"n": 5}, expected_version=4).version == 5
    with pytest.raises(InvalidArgument, match="keep must be an int >= 1"):
        log.prune(keep=0)


@pytest.mark.parametrize("where", ["header", "payload", "trailer"])
def test_corrupt_newest_manifest_raises_naming_the_key(tier, where):
    log = ManifestLog(tier, "c")
    log.commit({"n": 1}, expected_version=None)
    log.commit({"n": 2, "pad": "x" * 100}, expected_version=1)
    key = "c/manifest/00000000000000000002"
    flip_byte(tier, key, {"header": 40, "payload": -20, "trailer": -1}[where])
    with pytest.raises(CorruptData, match=key):
        log.latest()  # never silently falls back to version 1
    with pytest.raises(CorruptData, match=key):
        log.commit({"n": 3}, expected_version=2)
    assert log.load(1).state == {"n": 1}


def test_manifest_copied_to_another_version_is_corrupt(tier):
    log = ManifestLog(tier, "c")
    log.commit({"n": 1}, expected_version=None)
    tier.put("c/manifest/00000000000000000002", tier.get("c/manifest/00000000000000000001"))
    with pytest.raises(CorruptData, match="says it is version 1"):
        log.latest()


@pytest.mark.parametrize("state, error, match", [
    ([1, 2], InvalidType, "state must be a dict"),
    ({"x": math.nan}, InvalidArgument, r"state\['x'\] nan is not a finite"),
    ({"x": [1, {"y": math.inf}]}, InvalidArgument, r"state\['x'\]\[1\]\['y'\]"),
    ({1: "int key"}, InvalidType, "JSON object keys are str"),
    ({"x": {1, 2}}, InvalidType, r"state\['x'\] is a set"),
    ({"x": b"bytes"}, InvalidType, "is a bytes"),
    ({"x": np.zeros(3)}, InvalidType, "is a ndarray"),
    ({"x": "\ud800"}, InvalidArgument, "not valid UTF-8"),
])
def test_bad_state_is_rejected_before_writing(lmdb_tier, state, error, match):
    log = ManifestLog(lmdb_tier, "c")
    with pytest.raises(error, match=match):
        log.commit(state, expected_version=None)
    assert lmdb_tier.list("c/") == []


@pytest.mark.parametrize("expected, error", [(True, InvalidType), ("1", InvalidType), (1.0, InvalidType),
                                             (0, InvalidArgument), (-3, InvalidArgument)])
def test_bad_expected_version(lmdb_tier, expected, error):
    with pytest.raises(error):
        ManifestLog(lmdb_tier, "c").commit({}, expected_version=expected)
    assert lmdb_tier.list("c/") == []


def test_bad_constructor_arguments(lmdb_tier):
    with pytest.raises(InvalidType):
        ManifestLog(object(), "c")  # type: ignore[arg-type]
    with pytest.raises(InvalidType):
        ManifestLog(lmdb_tier, 3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        ManifestLog(lmdb_tier, "a/../b")


def test_self_referencing_state_is_rejected():
    state: dict = {}
    state["me"] = state
    with pytest.raises(InvalidArgument, match="nested too deeply"):
        freeze_json(state, "state")


# ------------------------------------------------------------------ async
@pytest.mark.parametrize("make_tier", ["lmdb", "s3", "memory+file"], indirect=True)  # one code path: 3 suffice
def test_async_twins(make_tier):
    log = ManifestLog(make_tier(), "c")

    async def main():
        assert await log.latest_async() is None
        first = await log.commit_async({"n": 1}, expected_version=None)
        results = await asyncio.gather(*(log.commit_async({"n": i}, expected_version=1) for i in range(4)),
                                       return_exceptions=True)
        assert sum(isinstance(r, Manifest) for r in results) == 1
        assert all(isinstance(r, (Manifest, CommitConflict)) for r in results)
        latest = await log.latest_async()
        assert latest.version == 2 and latest.parent_commit_id == first.commit_id
        assert await log.versions_async() == [1, 2] and (await log.load_async(1)) == first
        assert await log.prune_async(1) == [1]

    asyncio.run(main())
    assert ManifestLog(make_tier(), "c").versions() == [2]


def test_manifest_header_json_has_no_surprises(lmdb_tier):
    """Only JSON is ever parsed from storage: a state holding code-like text stays text."""
    tier = lmdb_tier
    log = ManifestLog(tier, "c")
    text = "__import__('os').system('echo pwned')"
    log.commit({"expr": text}, expected_version=None)
    assert log.latest().state["expr"] == text
    assert json.loads(bytes(decode_blob(tier.get(log.key(1))).payload)) == {"expr": text}
