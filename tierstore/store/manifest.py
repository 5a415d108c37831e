"""Versioned manifests: a collection's state as immutable, create-only commits.

A collection's state (settings, the blobs of its index, the WAL position it covers) is
a JSON object committed as a new *version*. Version ``n`` is one framed blob (see
:mod:`tierstore.store.blob`) at::

    "{prefix}/manifest/{n:020d}"      # zero padding: list() order is numeric order

header ``{"kind": "manifest", "format": 1, "version": n, "parent": n - 1 or null,
"created_at": unix seconds, "writer": str, "commit_id": hex, "parent_commit_id": hex or
null}``; payload the state as UTF-8 JSON (sorted keys, no NaN). Keys under
``{prefix}/manifest/`` whose last segment is not 20 digits are ignored, so a nested
prefix (``"{prefix}/manifest/x"``) cannot be mistaken for a version.

**Two writers never both win.** :meth:`ManifestLog.commit` names the version its change
was based on (``expected_version``) and writes ``expected + 1`` with ``mode="create"``;
the tier lets exactly one creator succeed (LMDB transaction, ``link`` on files,
``If-None-Match: *`` on S3). The loser gets :class:`~tierstore.errors.CommitConflict`
(an :class:`~tierstore.errors.AlreadyExists`) and nothing of its commit remains: it
reloads with :meth:`ManifestLog.latest`, reapplies its change and commits again. A
commit first lists the versions, so a base that is already stale fails at once without
writing; and after its put it lists again: a version above its own that was not built
on it (``parent_commit_id``) means that it created a slot that :meth:`ManifestLog.prune`
had freed under a stale base, and the commit deletes what it wrote and raises
:class:`CommitConflict` too. (Residual case: if, within that one round trip, others
commit on top of the new version *and* prune it, the commit reports a loss it did not
suffer; run ``prune`` from the writer only.)

**Snapshot isolation.** A :class:`Manifest` is immutable (its state is a deep read-only
copy) and a reader keeps the one it loaded, whatever is committed later. Blobs that a
manifest references must not be deleted while that manifest can still be read: delete
a blob only after every manifest naming it was pruned, and after readers have let go.

**Corruption.** Puts are atomic on every durable tier (LMDB commit, tmp + rename,
S3 PUT), so a torn manifest cannot exist: a manifest that fails its checksum is real
damage. :meth:`ManifestLog.latest` raises :class:`~tierstore.errors.CorruptData`
naming the key rather than falling back to an older version (which would silently
undo commits).
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import AlreadyExists, CommitConflict, CorruptData, InvalidArgument, InvalidType, NotFound
from ..tiers.base import BaseTier
from ._json import dumps_json, freeze_json, thaw_json
from ._layout import NUMBER_DIGITS, check_prefix, decode_numbered_blob, default_writer_id, parse_numbered
from ._steps import Steps, call, run_steps, run_steps_async
from .blob import encode_blob

__all__ = ["Manifest", "ManifestLog", "MANIFEST_FORMAT"]

MANIFEST_FORMAT = 1
_MAX_VERSION = 10**NUMBER_DIGITS - 1
_LATEST_ATTEMPTS = 5


@dataclass(frozen=True)
class Manifest:
    """One committed version of a collection's state; immutable.

    ``state`` is a deep read-only copy (mappings are ``MappingProxyType``, lists come
    back as tuples); :meth:`thawed_state` gives a mutable copy to edit and commit.
    ``parent`` is the version it was based on (``None`` for version 1); ``commit_id``
    is unique to this commit and ``parent_commit_id`` names the commit it was based on.
    """

    version: int
    parent: int | None
    created_at: float
    writer: str
    commit_id: str
    parent_commit_id: str | None
    state: Mapping[str, Any] = field(repr=False)
    key: str

    def thawed_state(self) -> dict[str, Any]:
        """A plain, mutable deep copy of :attr:`state` (dicts and lists)."""
        return thaw_json(self.state)


def _encode(manifest: Manifest, payload: bytes) -> bytes:
    header = {"kind": "manifest", "format": MANIFEST_FORMAT, "version": manifest.version,
              "parent": manifest.parent, "created_at": manifest.created_at, "writer": manifest.writer,
              "commit_id": manifest.commit_id, "parent_commit_id": manifest.parent_commit_id}
    return encode_blob(header, payload)


def _decode(data: bytes, key: str, version: int) -> Manifest:
    blob = decode_numbered_blob(data, key, kind="manifest", fmt=MANIFEST_FORMAT, number_field="version",
                                number=version, what="manifest")
    head = blob.header
    try:
        state = json.loads(str(blob.payload, "utf-8"))
        parent, created_at = head["parent"], float(head["created_at"])
        writer, commit_id, parent_commit_id = str(head["writer"]), str(head["commit_id"]), head["parent_commit_id"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CorruptData(f"manifest {key!r} has a malformed header or state ({exc}); the checksum matched, so "
                          "a different program wrote it") from exc
    if not isinstance(state, dict):
        raise CorruptData(f"manifest {key!r}: the state is a JSON {type(state).__name__}, not an object")
    return Manifest(version, parent, created_at, writer, commit_id, parent_commit_id, freeze_json(state), key)


class ManifestLog:
    """The versioned manifests of one collection under ``prefix`` in ``tier``.

    :param tier: any tier or :class:`~tierstore.tiers.TieredStore`; the log does not own
        it (closing the tier is the caller's business). Create-only puts always reach
        a TieredStore's durable bottom, so the race guarantee holds across processes.
        On an ``S3Tier`` with ``conditional_writes="emulated"`` it does not (the
        emulation is check-then-write).
    :param prefix: the collection's key prefix (``""`` for the root of the tier).
    :param writer: a name recorded in each commit (default ``host:pid:random``).

    Thread-safe: the log keeps no mutable state beside the tier. Each operation is one
    I/O-free protocol (a generator of tier calls) run by :func:`run_steps` or, for the
    ``*_async`` twins, by :func:`run_steps_async` through the tier's async methods.
    """

    def __init__(self, tier: BaseTier, prefix: str, *, writer: str | None = None) -> None:
        if not isinstance(tier, BaseTier):
            raise InvalidType(f"tier must be a tierstore tier, got {type(tier).__name__}")
        if writer is not None and not isinstance(writer, str):
            raise InvalidType(f"writer must be a str or None, got {type(writer).__name__}")
        self.tier = tier
        self.prefix = check_prefix(prefix)
        self.writer = writer or default_writer_id()
        self._dir = f"{self.prefix}/manifest/" if self.prefix else "manifest/"

    def __repr__(self) -> str:
        return f"<ManifestLog {self._dir!r} on {self.tier!r}>"

    def key(self, version: int) -> str:
        """The key of manifest ``version``."""
        return f"{self._dir}{_check_version(version, 'version'):0{NUMBER_DIGITS}d}"

    # ---------------------------------------------------------------- public surface
    def versions(self) -> list[int]:
        """Every version present, ascending (pruned ones are gone)."""
        return run_steps(self.tier, self._versions())

    def load(self, version: int) -> Manifest:
        """Manifest ``version``; :class:`NotFound` when it was pruned or never committed."""
        return run_steps(self.tier, self._load(version))

    def latest(self) -> Manifest | None:
        """The highest version, or ``None`` before the first commit.

        A newest manifest that fails its checksum raises :class:`CorruptData` naming its
        key; older versions are never used in its place.
        """
        return run_steps(self.tier, self._latest())

    def commit(self, state: Mapping[str, Any], *, expected_version: int | None) -> Manifest:
        """Commit ``state`` as version ``expected_version + 1`` (1 when ``None``).

        ``expected_version`` is the version the change was based on (``latest().version``,
        or ``None`` for the first commit). Raises :class:`CommitConflict` (an
        :class:`AlreadyExists`) when another writer committed since (reload with
        :meth:`latest`, reapply, retry; nothing of this commit is left behind) and
        :class:`InvalidArgument` when
        ``expected_version`` names a version newer than the latest, or the log is
        empty. ``state`` must be JSON-like (see :func:`freeze_json`); it is validated
        before anything is written. Costs two listings, a get of the parent and a put.
        """
        return run_steps(self.tier, self._commit(*self._pending(state, expected_version)))

    def prune(self, keep: int) -> list[int]:
        """Delete every version older than the newest ``keep`` (never the latest).

        Returns the versions deleted, oldest first. Prune from the writer process: a
        concurrent commit based on a version being pruned may be reported as lost.
        Blobs referenced only by pruned manifests may then be collected.
        """
        return run_steps(self.tier, self._prune(_check_keep(keep)))

    async def versions_async(self) -> list[int]:
        """Async :meth:`versions`."""
        return await run_steps_async(self.tier, self._versions())

    async def load_async(self, version: int) -> Manifest:
        """Async :meth:`load`."""
        return await run_steps_async(self.tier, self._load(version))

    async def latest_async(self) -> Manifest | None:
        """Async :meth:`latest`."""
        return await run_steps_async(self.tier, self._latest())

    async def commit_async(self, state: Mapping[str, Any], *, expected_version: int | None) -> Manifest:
        """Async :meth:`commit`."""
        return await run_steps_async(self.tier, self._commit(*self._pending(state, expected_version)))

    async def prune_async(self, keep: int) -> list[int]:
        """Async :meth:`prune`."""
        return await run_steps_async(self.tier, self._prune(_check_keep(keep)))

    # ---------------------------------------------------------------- protocols (no I/O)
    def _versions(self) -> Steps:
        return parse_numbered((yield call("list", self._dir)), self._dir)

    def _load(self, version: int) -> Steps:
        key = self.key(version)
        try:
            data = yield call("get", key)
        except NotFound:
            raise NotFound(f"manifest version {version} does not exist under {self._dir!r} (pruned or never "
                           "committed); versions() lists what exists") from None
        return _decode(data, key, version)

    def _latest(self) -> Steps:
        for _ in range(_LATEST_ATTEMPTS):
            versions = yield from self._versions()
            if not versions:
                return None
            try:
                return (yield from self._load(versions[-1]))
            except NotFound:
                continue  # pruned between list and get: a newer version exists, look again
        raise NotFound(f"the newest manifest under {self._dir!r} kept disappearing; is something deleting them?")

    def _commit(self, pending: Manifest, payload: bytes) -> Steps:
        self._check_base(pending, (yield from self._versions()))
        if pending.parent is not None:
            try:
                parent = yield from self._load(pending.parent)
            except NotFound:  # pruned since the listing, so a newer version exists
                raise _lost(pending) from None
            pending = dataclasses.replace(pending, parent_commit_id=parent.commit_id)
        blob = _encode(pending, payload)
        try:
            yield call("put", pending.key, blob, mode="create")
        except AlreadyExists as exc:
            try:  # a retried PUT whose first attempt landed finds its own bytes
                ours = (yield call("get", pending.key)) == blob
            except NotFound:
                ours = False
            if not ours:
                raise _lost(pending) from exc
        versions = yield from self._versions()
        above = next((v for v in versions if v > pending.version), None)
        if above is not None:  # rare: decide whether it was built on this commit
            try:
                child = yield from self._load(above)
            except NotFound:
                child = None
            if child is None or child.version != pending.version + 1 or child.parent_commit_id != pending.commit_id:
                yield call("delete", pending.key)  # it filled a slot freed by prune, under a stale base
                raise _lost(pending, versions[-1])
        return pending

    def _prune(self, keep: int) -> Steps:
        victims = (yield from self._versions())[:-keep]
        for version in victims:
            yield call("delete", self.key(version))
        return victims

    def _pending(self, state: object, expected_version: object) -> tuple[Manifest, bytes]:
        """Validate the arguments; return the manifest to write and its encoded state."""
        if not isinstance(state, Mapping):
            raise InvalidType(f"state must be a dict (a JSON object), got {type(state).__name__}")
        if expected_version is not None:
            expected_version = _check_version(expected_version, "expected_version")
            if expected_version >= _MAX_VERSION:
                raise InvalidArgument(f"expected_version {expected_version} is the last version "
                                      f"{NUMBER_DIGITS} digits can name; start a new log")
        version = 1 if expected_version is None else expected_version + 1
        frozen = freeze_json(state, "state")
        return (Manifest(version, expected_version, time.time(), self.writer, uuid.uuid4().hex, None, frozen,
                         self.key(version)), dumps_json(frozen))

    def _check_base(self, pending: Manifest, versions: list[int]) -> None:
        """Fail early, writing nothing, when the base version is not the latest."""
        latest = versions[-1] if versions else None
        expected = pending.parent
        if latest is not None and (expected is None or latest > expected):
            raise _lost(pending, latest)
        if expected is not None and latest is None:
            raise InvalidArgument(f"expected_version={expected} but the log under {self._dir!r} is empty; "
                                  "pass expected_version=None for the first commit")
        if expected is not None and latest < expected:
            raise InvalidArgument(f"expected_version={expected} is newer than the latest version {latest}; "
                                  "pass latest().version")


def _check_version(version: object, what: str) -> int:
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
        raise InvalidType(f"{what} must be an int, got {type(version).__name__}")
    version = int(version)
    if not 1 <= version <= _MAX_VERSION:
        raise InvalidArgument(f"{what} must be from 1 to {_MAX_VERSION}, got {version}")
    return version


def _check_keep(keep: object) -> int:
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise InvalidArgument(f"keep must be an int >= 1 (the latest version is always kept), got {keep!r}")
    return keep


def _lost(pending: Manifest, latest: int | None = None) -> CommitConflict:
    base = "None (a first commit)" if pending.parent is None else pending.parent
    now = f" (the latest is now {latest})" if latest is not None else ""
    return CommitConflict(f"another writer committed version {pending.version} of {pending.key.rsplit('/', 1)[0]!r} "
                          f"first{now}; this commit, based on version {base}, was not written: reload with latest(), "
                          "reapply the change and commit again")
