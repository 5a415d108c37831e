"""A search worker: loads its partitions once, scans them, invokes its sub-trees, merges.

One :class:`Worker` is one container's state (the Lambda handler keeps one per warm
container; :class:`~tierstore.serverless.InProcessInvoker` shares one among threads;
each process of :class:`~tierstore.serverless.ProcessInvoker` holds its own). It keeps:

* the index's resident state (codec, centroids, posting directory), read once from
  ``index`` (one GET) and checked against the event's ``digest``;
* per partition, a scanner holding the partition's posting lists, fetched once with one
  ranged GET per segment run (:func:`~tierstore.index.postings.fetch_lists`, checksums
  verified) and kept in memory and, with ``cache_dir``, on disk (Lambda's ``/tmp``). A
  warm worker does no S3 GET for partitions it holds.

Scanning is the same faiss call as ``col.search``: the partition's scanner gets the
query's full probe arrays (``lists``, ``coarse``) and holds only its own lists, so the
look-up tables, and therefore every code score, are bit-identical to a local scan.

A worker only reads under its configured ``bucket``/``prefix``; an event naming any
other bucket or prefix, or a key with ``..``, is an :class:`~tierstore.errors.EventError`.
So is an event whose arrays do not fit the index it names (queries of another ``dim``, a
``selection`` over fewer rows than the lists hold): faiss reads those buffers unchecked.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from xxhash import xxh3_64_intdigest

from ..errors import ConfigError, EventError, InvalidArgument, NotFound, WorkerError
from ..index.postings import fetch_lists, plan_reads
from ..index.spann import SpannIndex
from ..tiers.keys import validate_key
from .candidates import Candidates, gather_children
from .events import child_event, decode_array, parse_event
from .plan import PartitionPlan, build_plan, directory_digest
from .tree import call_children, subtree_partitions

__all__ = ["WorkerConfig", "Worker"]

# S3's bucket names (legacy ones included): one path segment, never '.' or '..'.
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{2,254}")


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """Where a worker may read, and how.

    :param bucket: the S3 bucket of the database (``s3://bucket/prefix``); an S3 bucket name.
    :param prefix: the database's prefix; the worker reads nothing outside it. Checked like a
        key (:func:`~tierstore.tiers.validate_key`: no ``..`` segment, backslash or NUL), else
        :class:`~tierstore.errors.ConfigError`.
    :param endpoint_url: an S3-compatible endpoint (moto, MinIO); ``None`` for AWS.
    :param region_name: the S3 region (default: boto3's chain, else us-east-1).
    :param cache_dir: keep fetched partitions and index state here too (``/tmp/...`` on
        Lambda); ``None``: memory only.
    :param s3_get_delay: seconds slept per round of S3 GETs (benchmarks: a stand-in for
        S3's first-byte latency on a local S3 server).
    :param coalesce_gap: byte gap under which ranged reads of a partition merge.
    """

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region_name: str | None = None
    cache_dir: str | None = None
    s3_get_delay: float = 0.0
    coalesce_gap: int = 1 << 20

    def __post_init__(self) -> None:
        if not isinstance(self.bucket, str) or not _BUCKET.fullmatch(self.bucket):
            raise ConfigError(f"bucket must be an S3 bucket name (3-255 letters, digits, '.', '-' or '_', "
                              f"starting with a letter or digit), got {self.bucket!r}")
        if not isinstance(self.prefix, str):
            raise ConfigError(f"prefix must be a str, got {self.prefix!r}")
        object.__setattr__(self, "prefix", self.prefix.strip("/"))
        if self.prefix:
            try:  # the worker reads only under it: no '..' segment, backslash, NUL, ...
                validate_key(self.prefix)
            except InvalidArgument as exc:
                raise ConfigError(f"prefix {self.prefix!r} is not usable: {exc}") from exc
        if isinstance(self.s3_get_delay, bool) or not isinstance(self.s3_get_delay, (int, float)) \
                or self.s3_get_delay < 0:
            raise ConfigError(f"s3_get_delay must be seconds >= 0, got {self.s3_get_delay!r}")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "WorkerConfig":
        """The Lambda configuration: ``TIERSTORE_BUCKET``, ``TIERSTORE_PREFIX``, ``TIERSTORE_S3_ENDPOINT``,
        ``TIERSTORE_CACHE_DIR`` (default ``/tmp/tierstore``)."""
        env = os.environ if env is None else env
        bucket = env.get("TIERSTORE_BUCKET")
        if not bucket:
            raise ConfigError("the worker needs TIERSTORE_BUCKET (and TIERSTORE_PREFIX) in its environment")
        return cls(bucket=bucket, prefix=env.get("TIERSTORE_PREFIX", ""),
                   endpoint_url=env.get("TIERSTORE_S3_ENDPOINT") or None,
                   region_name=env.get("AWS_REGION") or None,
                   cache_dir=env.get("TIERSTORE_CACHE_DIR", "/tmp/tierstore") or None)


class _OneValue:
    """A read-only source of one key (the index state read from the disk cache)."""

    def __init__(self, key: str, value: bytes) -> None:
        self.key, self.value = key, value

    def get(self, key: str) -> bytes:
        if key != self.key:
            raise NotFound(f"{key!r} is not cached")
        return self.value


class _Partition:
    """One partition's lists in a scanner of their own (scanned under a lock: faiss sets nprobe)."""

    def __init__(self, scanner, nbytes: int, rows: int) -> None:
        self.scanner = scanner
        self.nbytes = nbytes
        self.rows = rows  # 1 + the largest row its lists hold: a selection must cover them
        self.lock = threading.Lock()


class Worker:
    """One container's worker state; :meth:`handle` serves one search event (see module docstring).

    ``child_invoker`` invokes sub-trees (an :class:`~tierstore.serverless.invokers.Invoker`);
    ``tier`` injects a ready tier for the configured bucket/prefix (tests, in-process use).
    """

    def __init__(self, config: WorkerConfig, *, child_invoker=None, tier=None) -> None:
        self.config = config
        self.child_invoker = child_invoker
        self._tier = tier
        self._lock = threading.Lock()
        self._indexes: dict[tuple[str, str], SpannIndex] = {}
        self._plans: dict[tuple[str, str, int], PartitionPlan] = {}
        self._partitions: dict[tuple[str, str, int, int], _Partition] = {}
        self._loading: dict[tuple, threading.Lock] = {}
        self.invocations = 0

    # ------------------------------------------------------------------ state
    def _s3(self):
        with self._lock:
            if self._tier is None:
                from ..tiers.s3 import S3Tier

                cfg = self.config
                self._tier = S3Tier(cfg.bucket, cfg.prefix, cfg.endpoint_url, region_name=cfg.region_name,
                                    check_bucket=False, max_concurrency=16)
            return self._tier

    def _key_lock(self, key: tuple) -> threading.Lock:
        with self._lock:
            return self._loading.setdefault(key, threading.Lock())

    def _disk_path(self, *parts: str) -> str | None:
        if self.config.cache_dir is None:
            return None
        name = hashlib.sha256("\x00".join((self.config.bucket, self.config.prefix, *parts)).encode()).hexdigest()
        return os.path.join(self.config.cache_dir, name[:40])

    def _disk_read(self, path: str | None) -> bytes | None:
        if path is None or not os.path.exists(path):
            return None
        with open(path, "rb") as fh:
            return fh.read()

    def _disk_write(self, path: str | None, data: bytes) -> None:
        if path is None:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError:  # a full /tmp only costs the next cold start its GETs
            if os.path.exists(tmp):
                os.remove(tmp)

    def _index(self, key: str, digest: str, counters: dict) -> SpannIndex:
        found = self._indexes.get((key, digest))
        if found is not None:
            return found
        with self._key_lock(("index", key, digest)):
            found = self._indexes.get((key, digest))
            if found is not None:
                return found
            path = self._disk_path("index", key)
            value = self._disk_read(path)
            if value is None:
                self._delay()
                value = self._s3().get(key)
                counters["s3_gets"] += 1
                counters["s3_bytes"] += len(value)
                self._disk_write(path, value)
            index = SpannIndex.open(_OneValue(key, value), key, cache_bytes=1 << 62)
            if directory_digest(index.directory) != digest:
                raise EventError(f"event field 'digest' ({digest}) does not match the index at {key!r}: the "
                                 "collection changed under the search plan; re-plan from the current manifest")
            with self._lock:
                # A new index version replaces the old ones (a container serves one collection state).
                for old in [k for k in self._indexes if k[0] != key or k[1] != digest]:
                    del self._indexes[old]
                    self._partitions = {k: v for k, v in self._partitions.items() if k[:2] != old}
                self._indexes[(key, digest)] = index
            return index

    def _plan(self, key: str, digest: str, index: SpannIndex, partitions: int) -> PartitionPlan:
        plan = self._plans.get((key, digest, partitions))
        if plan is None:
            plan = build_plan(index.directory, partitions)
            if plan.partitions != partitions:
                raise EventError(f"event field 'partitions' is {partitions} but the index has only "
                                 f"{plan.partitions} stored lists")
            self._plans[(key, digest, partitions)] = plan
        return plan

    def _partition(self, key: str, digest: str, index: SpannIndex, plan: PartitionPlan, part: int,
                   counters: dict) -> _Partition:
        ident = (key, digest, plan.partitions, part)
        found = self._partitions.get(ident)
        if found is not None:
            return found
        with self._key_lock(("part", *ident)):
            found = self._partitions.get(ident)
            if found is not None:
                return found
            lists = plan.lists[part]
            directory = index.directory
            path = self._disk_path("partition", key, digest, str(plan.partitions), str(part))
            cached = self._disk_read(path)
            fetched = _split_cached(cached, directory, lists) if cached is not None else None
            if fetched is None:
                self._delay()
                reads = plan_reads(directory, lists, coalesce_gap=self.config.coalesce_gap)
                fetched, _ = fetch_lists(self._s3(), directory, lists, coalesce_gap=self.config.coalesce_gap)
                part_size = getattr(self._s3(), "part_size", 1 << 62)
                counters["s3_gets"] += sum(-(-(end - start) // part_size) for _, start, end in reads.requests)
                counters["s3_bytes"] += reads.bytes
                self._disk_write(path, b"".join(ids.tobytes() + codes.tobytes()
                                                for ids, codes in (fetched[int(n)] for n in lists)))
            scanner = index.codes.new_scanner()
            scanner.attach_coarse(index._slot_coarse)  # what SpannIndex._new_scanner does
            rows = 0
            for list_no in lists.tolist():
                ids, codes = fetched[list_no]
                if ids.size:
                    rows = max(rows, int(ids.max()) + 1)
                scanner.load_list(list_no, np.ascontiguousarray(ids), np.ascontiguousarray(codes))
            held = _Partition(scanner, int(directory.length[lists].sum()), rows)
            with self._lock:
                self._partitions[ident] = held
            return held

    def _delay(self) -> None:
        if self.config.s3_get_delay:
            time.sleep(self.config.s3_get_delay)

    # ---------------------------------------------------------------- serving
    def handle(self, event: Any) -> dict:
        """Serve one search event; returns the response dict (see :mod:`.events`)."""
        started = time.perf_counter()
        with self._lock:
            cold = self.invocations == 0
            self.invocations += 1
        ev = parse_event(event)
        cfg = self.config
        if ev.bucket != cfg.bucket or ev.prefix.strip("/") != cfg.prefix:
            raise EventError(f"event fields 'bucket'/'prefix' name s3://{ev.bucket}/{ev.prefix}; this worker reads "
                             f"only s3://{cfg.bucket}/{cfg.prefix}")
        counters = {"s3_gets": 0, "s3_bytes": 0}
        failed: list[int] = []
        spawn = None
        if ev.children:
            if self.child_invoker is None:
                raise ConfigError("this worker has sub-trees to invoke but no child invoker")
            events = [child_event(ev, spec) for spec in ev.children]
            parts = [subtree_partitions(spec, _scan_partitions) for spec in ev.children]
            result: dict = {}

            def run() -> None:
                try:
                    result["calls"] = call_children(self.child_invoker, events, parts, retries=ev.retries,
                                                    partial=ev.partial)
                except WorkerError as exc:
                    result["error"] = exc

            spawn = threading.Thread(target=run, daemon=True)
            spawn.start()
        load_start = time.perf_counter()
        held, l2 = [], True
        if ev.scan:  # a node with only sub-trees to call needs no index state
            index = self._index(ev.index, ev.digest, counters)
            if ev.dim != index.dim:  # faiss would read dim floats per query from a shorter buffer
                raise EventError(f"event field 'dim' is {ev.dim} but the index at {ev.index!r} holds "
                                 f"{index.dim}-dimensional vectors; send queries of that dimension")
            slots = index.directory.nlist
            if ev.lists.size and (int(ev.lists.min()) < -1 or int(ev.lists.max()) >= slots):
                # faiss reads list numbers unchecked: one out of range would crash the container
                raise EventError(f"event field 'lists' holds list numbers outside [-1, {slots}) of the index at "
                                 f"{ev.index!r}; re-plan from the current manifest")
            plan = self._plan(ev.index, ev.digest, index, ev.partitions)
            held = [(self._partition(ev.index, ev.digest, index, plan, part, counters), queries)
                    for part, queries in ev.scan]
            needed = max((partition.rows for partition, _ in held), default=0)
            if ev.selection is not None and ev.selection.size < needed:
                # faiss's bitmap selector would read past the bitmap for the rows beyond it
                raise EventError(f"event field 'selection.size' is {ev.selection.size} but the lists scanned hold "
                                 f"rows up to {needed - 1}; send a selection over every indexed row")
            l2 = index.metric == "l2"
        scan_start = time.perf_counter()
        sources = []
        for partition, queries in held:
            if not queries.size:
                continue
            xq = np.ascontiguousarray(ev.queries[queries])
            with partition.lock:
                scores, rows = partition.scanner.search_preassigned(
                    xq, np.ascontiguousarray(ev.lists[queries]), np.ascontiguousarray(ev.coarse[queries]),
                    ev.keep, ev.selection)
            distances = scores if l2 else -scores
            distances = np.where(rows >= 0, distances, np.inf).astype(np.float32)
            sources.append((Candidates.from_topk(distances, rows, ev.keep), queries))
        scan_ms = (time.perf_counter() - scan_start) * 1e3
        nodes: list[dict] = []
        if spawn is not None:
            spawn.join()
            if "error" in result:
                exc = result["error"]
                return {"v": 1, "error": {"type": "WorkerError", "message": str(exc),
                                          "partitions": list(exc.partitions)}}
            calls, failed = result["calls"]
            takes = [decode_array(spec["take"], "<i4", "children[].take") for spec in ev.children]
            child_sources, nodes, reported = gather_children(calls, takes)
            sources.extend(child_sources)
            failed.extend(reported)
        merged = Candidates.merge(sources, ev.nq, ev.keep)
        me = {"level": ev.level, "partitions": [part for part, _ in ev.scan], "cold": cold,
              "s3_gets": counters["s3_gets"], "s3_bytes": counters["s3_bytes"],
              "load_ms": (scan_start - load_start) * 1e3, "scan_ms": scan_ms,
              "handler_ms": (time.perf_counter() - started) * 1e3}
        return {"v": 1, "nq": ev.nq, **merged.to_json(), "failed": sorted(set(failed)),
                "stats": {"nodes": [me, *nodes]}}

    def held_partitions(self) -> list[tuple[str, int, int]]:
        """``(index key, partitions, partition)`` of every partition this worker holds."""
        with self._lock:
            return sorted((key, count, part) for key, _, count, part in self._partitions)


def _scan_partitions(scan: list) -> list[int]:
    return [int(item["partition"]) for item in scan]


def _split_cached(data: bytes, directory, lists: np.ndarray):
    """Lists from the disk cache, each checked against the directory; ``None`` if stale or damaged."""
    lengths = directory.length[lists]
    if len(data) != int(lengths.sum()):
        return None
    out, start = {}, 0
    buf = memoryview(data)
    for list_no, length in zip(lists.tolist(), lengths.tolist()):
        view = buf[start:start + length]
        start += length
        if xxh3_64_intdigest(view) != int(directory.checksum[list_no]):
            return None  # a damaged cache file: fetch from S3 again
        count = int(directory.count[list_no])
        arr = np.frombuffer(view, dtype=np.uint8)
        out[list_no] = (arr[:count * 8].view("<i8"), arr[count * 8:])
    return out

