"""Soak: mixed search, ingest, delete and KV traffic on one database; memory, files and threads stay flat.

    python bench/soak.py [--minutes 30] [--tier lmdb|file|s3] [--json PATH] [--sample-seconds N]
                         [--writes-per-second N] [--malloc-trim]

Not run in CI at this length: tests/reliability/test_soak.py runs :func:`run_soak` for a
minute or two and asserts the same bounds. ``--tier s3`` starts moto's S3 server itself.

**Workload** (threads on one database, one collection and one KV-cache store):

- writer: adds batches of new ids (64 rows, paced), deletes the oldest batch so the
  collection keeps about ``LIVE_BATCHES`` batches, upserts a live batch every 4th round,
  and adds/deletes rows of 8 tenants (16 rows a call). Checkpoints happen on their own
  (``flush_rows``). After each write it checks that a search finds a vector just added
  and that ``count()`` is exactly what it should be.
- searchers: plain, filtered and tenant searches (8 queries each), from a thread and
  through the asyncio client (``tierstore.client.aio.AsyncCollection``, 4 in flight);
  every returned id must match the filter or belong to the tenant.
- kv: puts 64-token fp16 sequences (2 chunks, 4 layers), reads the new one back and an
  older one (whole and by layer range, compared exactly with the tensors put), checks a
  deleted one misses, deletes the oldest past ``KV_WINDOW``; a 4 MiB memory level (in
  pinned buffers when CUDA is up, with an 8 MiB GPU cache that half the reads go through).
- indexer: ``build_index`` every ``index_seconds`` (this also compacts deleted rows:
  without it the row table grows by design) and the stats calls.

**Samples** every ``sample_seconds`` after ``gc.collect()``, from /proc/self (Linux; no
psutil needed): RSS (VmRSS; its anonymous and file-backed parts, the latter mostly LMDB's
map), pinned host memory (torch's CUDA host allocator when CUDA is up; otherwise the
kernel's VmLck + VmPin, which is what page-locking without CUDA would show), GPU memory
allocated by torch (CUDA only), open file descriptors, OS threads and Python threads; and
the blobs in the tier (keys; for LMDB the bytes stored and the map's high-water mark), which
must stay bounded too, or memory could grow by right. ``--malloc-trim`` hands glibc's free
heap back before each sample: growth that it removes is allocator retention, not a leak.

**Verdict** (:func:`growth_verdict`): the first 20% of samples are warm-up; the median of
the next 20% is the baseline, compared with the median of the last 25% (for fds and
threads the minimum of each: thread pools and OpenMP teams come and go, a leak raises the
floor; on 16 cores one team is 15 threads). Growth beyond
the :class:`Bounds` (RSS: 10% or 64 MiB, whichever is larger; fds +8; threads +4;
pinned +16 MiB; GPU +64 MiB; keys: 50% or 64) fails, and so does any error or failed
check. Exit 1 then.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

import tierstore  # noqa: E402
from _common import bench_meta, format_table, median, write_report  # noqa: E402

__all__ = ["Bounds", "read_resources", "growth_verdict", "run_soak", "main"]

MiB = 1 << 20
DIM = 32
BATCH = 64  # rows per writer add
LIVE_BATCHES = 80  # plain batches kept live: about 5,000 rows
TENANTS = 8
TENANT_BATCH = 16
TENANT_BATCHES = 6  # live batches per tenant
TENANT_BASE = 1 << 40  # tenant t's ids: TENANT_BASE + (t << 32) + n
LANGS = ("en", "de", "fr")
KV_LAYOUT = {"layers": 4, "kv_heads": 2, "head_dim": 32}
KV_TOKENS, KV_CHUNK, KV_WINDOW = 64, 32, 48
FILTERS = ({"group": {"$lt": 3}}, {"lang": "de"}, {"group": {"$gte": 5}, "lang": {"$in": ["en", "fr"]}})
_KEPT_MESSAGES = 20


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bounds:
    """How much each resource may grow from the baseline to the end (see the module docstring)."""

    rss_fraction: float = 0.10
    rss_bytes: int = 64 * MiB
    pinned_bytes: int = 16 * MiB
    gpu_bytes: int = 64 * MiB
    fds: int = 8
    threads: int = 4
    keys_fraction: float = 0.5  # blobs in the tier: the data must stay bounded, or memory may grow by right
    keys: int = 64
    warmup: float = 0.20
    tail: float = 0.25

    def __post_init__(self) -> None:
        if not (0 < self.warmup and 0 < self.tail and 2 * self.warmup + self.tail <= 1):
            raise ValueError(f"warmup {self.warmup} and tail {self.tail} leave no baseline: need 2*warmup+tail <= 1")

    def allowed(self, resource: str, baseline: float) -> float:
        if resource == "rss":
            return max(float(self.rss_bytes), self.rss_fraction * baseline)
        if resource == "keys":
            return max(float(self.keys), self.keys_fraction * baseline)
        return float({"pinned": self.pinned_bytes, "gpu": self.gpu_bytes, "fds": self.fds,
                      "threads": self.threads}[resource])


# ------------------------------------------------------------------ resources
def _proc_status() -> dict[str, str]:
    with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
        return dict(line.split(":", 1) for line in handle if ":" in line)


def _kib(status: dict[str, str], field: str) -> int:
    value = status.get(field)
    return int(value.split()[0]) * 1024 if value else 0


def _cuda_torch():
    """torch, when it is already imported and CUDA is up (the soak never imports it for this)."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.cuda.is_available() else None


def read_resources() -> dict[str, Any]:
    """This process's memory, pinned memory, open files and threads now (Linux /proc)."""
    if not os.path.exists("/proc/self/status"):
        raise RuntimeError("the soak reads /proc/self (Linux); this system has none")
    status = _proc_status()
    out: dict[str, Any] = {
        "rss": _kib(status, "VmRSS"), "rss_anon": _kib(status, "RssAnon"), "rss_file": _kib(status, "RssFile"),
        "fds": len(os.listdir("/proc/self/fd")), "threads": int(status["Threads"]),
        "py_threads": threading.active_count(), "gpu": None,
    }
    torch = _cuda_torch()
    if torch is not None:
        out["pinned"], out["pinned_source"] = _pinned_host_bytes(torch.cuda.host_memory_stats())
        out["gpu"] = int(torch.cuda.memory_allocated())
    else:
        out["pinned"], out["pinned_source"] = _kib(status, "VmLck") + _kib(status, "VmPin"), "VmLck+VmPin (no CUDA)"
    return out


def _pinned_host_bytes(stats: dict[str, Any]) -> tuple[int, str]:
    """Bytes of pinned blocks torch's caching host allocator owns (handed out or cached).

    The key has moved between torch versions; the first present of the known names wins.
    """
    for key in ("allocated_bytes.current", "allocated_bytes.all.current", "reserved_bytes.current"):
        if key in stats:
            return int(stats[key]), f"torch.cuda.host_memory_stats()[{key!r}]"
    found = sorted(k for k in stats if "bytes" in k and k.endswith(".current"))
    if found:
        return int(stats[found[0]]), f"torch.cuda.host_memory_stats()[{found[0]!r}]"
    return 0, f"torch.cuda.host_memory_stats() has no byte count (keys: {sorted(stats)[:6]})"


# ------------------------------------------------------------------ verdict
def growth_verdict(samples: list[dict[str, Any]], bounds: Bounds = Bounds()) -> list[dict[str, Any]]:
    """Per resource: baseline (median just after warm-up), end (median of the tail), growth, allowed, ok."""
    n = len(samples)
    if n < 5:
        raise ValueError(f"{n} samples are too few for a verdict; run longer or sample more often")
    warm = max(1, round(n * bounds.warmup))
    baseline_samples = samples[warm:warm + warm]
    end_samples = samples[n - max(1, round(n * bounds.tail)):]
    rows = []
    for resource in ("rss", "pinned", "gpu", "fds", "threads", "keys"):
        if any(s.get(resource) is None for s in samples):
            continue
        # Counts of fds and threads compare floors: pools and OpenMP teams come and go (a
        # team is cpu_count - 1 threads), while a leak raises the floor. Bytes and keys: medians.
        statistic = min if resource in ("fds", "threads") else median
        baseline = float(statistic([float(s[resource]) for s in baseline_samples]))
        end = float(statistic([float(s[resource]) for s in end_samples]))
        allowed = bounds.allowed(resource, baseline)
        rows.append({"resource": resource, "statistic": statistic.__name__, "start": float(samples[0][resource]),
                     "baseline": baseline, "end": end, "growth": end - baseline, "allowed": allowed,
                     "ok": end - baseline <= allowed})
    after = samples[warm:]
    if len(after) >= 2:  # RSS trend after warm-up, for the record (the verdict uses the medians)
        t = np.array([s["t"] for s in after]) / 60.0
        rss = np.array([s["rss"] for s in after], dtype=np.float64) / MiB
        rows[0]["slope_mib_per_min"] = float(np.polyfit(t, rss, 1)[0]) if np.ptp(t) > 0 else 0.0
    return rows


# ------------------------------------------------------------------ workload
def _vectors(seed: list[int], rows: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)


def _attributes(ids: np.ndarray) -> list[dict[str, Any]]:
    return [{"group": int(i % 10), "lang": LANGS[int(i % 3)]} for i in ids.tolist()]


def _matches(ids: np.ndarray, spec: dict) -> np.ndarray:
    """Whether each id satisfies one of :data:`FILTERS` (attributes are a function of the id)."""
    group, lang = ids % 10, np.array(LANGS)[ids % 3]
    ok = np.ones(ids.shape, bool)
    if "group" in spec:
        ok &= group < 3 if "$lt" in spec["group"] else group >= 5
    if "lang" in spec:
        ok &= np.isin(lang, spec["lang"]["$in"]) if isinstance(spec["lang"], dict) else lang == spec["lang"]
    return ok


class _Soak:
    """Worker threads on one database, their counters and their failures."""

    def __init__(self, db, *, writes_per_second: float, index_seconds: float, cuda: bool) -> None:
        self.db = db
        self.col = db.create_collection("soak", dim=DIM, metric="l2", attributes={"group": "int", "lang": "keyword"})
        kv_options = {"codec": "fp16", "chunk_tokens": KV_CHUNK, "dtype": "float16", **KV_LAYOUT}
        self._pinned_level = None
        if cuda:  # the memory level in page-locked buffers, so that pinned memory is exercised too
            from tierstore.store.kvcache import KVCacheStore
            from tierstore.tiers import MemoryTier, TieredStore

            self._pinned_level = TieredStore([MemoryTier(4 * MiB, pinned=True), db.tier], policy="cost",
                                             borrowed=(db.tier,))
            self.kv = KVCacheStore(self._pinned_level, model="soak/model", revision="r1", gpu_cache=8 * MiB,
                                   **kv_options)
        else:
            self.kv = db.kv_cache("soak/model", "r1", memory_cache=4 * MiB, **kv_options)
        self.writes_per_second, self.index_seconds, self.cuda = writes_per_second, index_seconds, cuda
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.ops: dict[str, int] = {}
        self.errors = 0
        self.messages: list[str] = []
        self._plain: list[int] = []  # live plain batches, oldest first
        self._versions: dict[int, int] = {}
        self._tenant: list[list[int]] = [[] for _ in range(TENANTS)]
        self._next_batch = 0
        self._tenant_seq = [0] * TENANTS

    # ---------------------------------------------------------- bookkeeping
    def count(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self.ops[kind] = self.ops.get(kind, 0) + n

    def fail(self, where: str, message: str) -> None:
        with self._lock:
            self.errors += 1
            if len(self.messages) < _KEPT_MESSAGES:
                self.messages.append(f"{where}: {message}")

    def snapshot(self) -> tuple[dict[str, int], int]:
        with self._lock:
            return dict(self.ops), self.errors

    def _loop(self, name: str, step: Callable[[int], None]) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                step(i)
            except Exception as exc:  # the soak counts every failure; it never hides one
                self.fail(name, f"{type(exc).__name__}: {exc}")
                self.stop.wait(0.1)
            i += 1

    # ---------------------------------------------------------- writer
    def _plain_ids(self, batch: int) -> np.ndarray:
        return np.arange(batch * BATCH, (batch + 1) * BATCH, dtype=np.int64)

    def _tenant_ids(self, tenant: int, seq: int) -> np.ndarray:
        return TENANT_BASE + (tenant << 32) + np.arange(seq * TENANT_BATCH, (seq + 1) * TENANT_BATCH, dtype=np.int64)

    def expected_count(self) -> int:
        return len(self._plain) * BATCH + sum(len(t) for t in self._tenant) * TENANT_BATCH

    def add_plain(self) -> None:
        batch = self._next_batch
        self._next_batch += 1
        ids = self._plain_ids(batch)
        x = _vectors([1, batch, 0], BATCH)
        self.col.add(ids, x, _attributes(ids))
        self._plain.append(batch)
        self._versions[batch] = 0
        self.count("add")
        self._check_found(ids[::16], x[::16], "add")

    def seed(self) -> None:
        """Fill the collection and the tenants to their steady size, then build the index.

        Failed checks count; operations do not (the counts are of the soak itself).
        """
        for _ in range(LIVE_BATCHES):
            self.add_plain()
        for tenant in range(TENANTS):
            for _ in range(TENANT_BATCHES):
                self._tenant_add(tenant)
        self.col.build_index()
        with self._lock:
            self.ops.clear()

    def _check_found(self, ids: np.ndarray, x: np.ndarray, where: str) -> None:
        found = self.col.search(x, k=10).ids
        self.count("search_check")
        for i, row in zip(ids.tolist(), found):
            if i not in row.tolist():
                self.fail(where, f"id {i} just written is not among its own vector's 10 nearest")

    def _tenant_add(self, tenant: int) -> None:
        seq = self._tenant_seq[tenant]
        self._tenant_seq[tenant] += 1
        ids = self._tenant_ids(tenant, seq)
        self.col.tenant(f"t{tenant}").add(ids, _vectors([2, tenant, seq], TENANT_BATCH), _attributes(ids))
        self._tenant[tenant].append(seq)
        self.count("tenant_add")

    def write_step(self, i: int) -> None:
        started = time.monotonic()
        self.add_plain()
        while len(self._plain) > LIVE_BATCHES:
            batch = self._plain.pop(0)
            self._versions.pop(batch)
            if self.col.delete(self._plain_ids(batch)) != BATCH:
                self.fail("delete", f"batch {batch} did not delete {BATCH} rows")
            self.count("delete")
        if i % 4 == 3:  # upsert: new vectors for a live batch
            batch = self._plain[(i * 7919) % len(self._plain)]
            self._versions[batch] += 1
            ids, x = self._plain_ids(batch), _vectors([1, batch, self._versions[batch]], BATCH)
            self.col.add(ids, x, _attributes(ids))
            self.count("upsert")
            self._check_found(ids[::32], x[::32], "upsert")
        tenant = i % TENANTS
        self._tenant_add(tenant)
        seq = self._tenant[tenant].pop(0)
        if self.col.tenant(f"t{tenant}").delete(self._tenant_ids(tenant, seq)) != TENANT_BATCH:
            self.fail("tenant_delete", f"tenant t{tenant} batch {seq} did not delete {TENANT_BATCH} rows")
        self.count("tenant_delete")
        got, want = self.col.count(), self.expected_count()
        if got != want:
            self.fail("count", f"count() is {got}, expected {want}")
        self.stop.wait(max(0.0, 1.0 / self.writes_per_second - (time.monotonic() - started)))

    # ---------------------------------------------------------- searchers
    @staticmethod
    def _search_plan(i: int, rng: np.random.Generator) -> tuple[str, np.ndarray, int, dict | None, int | None]:
        """Search ``i``: its kind, 8 queries, k, filter and tenant (plain, filtered and tenant in turn)."""
        xq = rng.standard_normal((8, DIM)).astype(np.float32)
        if i % 3 == 0:
            return "search", xq, 10, None, None
        if i % 3 == 1:
            return "filtered_search", xq, 10, FILTERS[i % len(FILTERS)], None
        return "tenant_search", xq, 5, FILTERS[i % len(FILTERS)] if i % 2 else None, int(rng.integers(TENANTS))

    def _check_search(self, kind: str, spec: dict | None, tenant: int | None, ids: np.ndarray) -> None:
        if kind == "search" and (ids[:, 0] < 0).any():
            self.fail(kind, "a search of a 5,000-row collection found nothing")
        found = ids[ids >= 0]
        if spec is not None and not _matches(found, spec).all():
            self.fail(kind, f"ids {found[~_matches(found, spec)][:3].tolist()} do not match {spec}")
        if tenant is not None and (not found.size or ((found - TENANT_BASE) >> 32 != tenant).any()):
            self.fail(kind, f"tenant t{tenant} (filter {spec}) got ids {found[:5].tolist()}")
        self.count(kind)

    def search_step(self, i: int, rng: np.random.Generator) -> None:
        kind, xq, k, spec, tenant = self._search_plan(i, rng)
        target = self.col if tenant is None else self.col.tenant(f"t{tenant}")
        self._check_search(kind, spec, tenant, target.search(xq, k=k, filter=spec).ids)
        self.stop.wait(0.002)  # leave the writer and the KV thread their share of the GIL on 2 cores

    def async_searches(self) -> None:
        """Searches through tierstore's asyncio client (:class:`AsyncCollection` over the same
        collection, its own pool of 4), 4 in flight at a time, on an event loop of this thread."""
        from tierstore.client.aio import AsyncCollection

        rng = np.random.default_rng(1)

        async def one(col: AsyncCollection, i: int) -> None:
            kind, xq, k, spec, tenant = self._search_plan(i, rng)
            target = col if tenant is None else col.tenant(f"t{tenant}")
            self._check_search(kind, spec, tenant, (await target.search(xq, k=k, filter=spec)).ids)

        async def run(col: AsyncCollection) -> None:
            i = 0
            while not self.stop.is_set():
                try:
                    await asyncio.gather(*(one(col, i + j) for j in range(4)))
                except Exception as exc:  # counted, as in the threads
                    self.fail("async-search", f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.1)
                i += 4
                await asyncio.sleep(0.008)

        with ThreadPoolExecutor(4, thread_name_prefix="soak-aio") as pool:
            asyncio.run(run(AsyncCollection(self.col, pool)))

    # ---------------------------------------------------------- kv
    def _kv_sequence(self, n: int):
        import torch

        tokens = np.random.default_rng([7, n]).integers(0, 32_000, KV_TOKENS)
        gen = torch.Generator().manual_seed(n)
        shape = (KV_LAYOUT["kv_heads"], KV_TOKENS, KV_LAYOUT["head_dim"])
        pairs = [(torch.randn(shape, generator=gen).half(), torch.randn(shape, generator=gen).half())
                 for _ in range(KV_LAYOUT["layers"])]
        return tokens, pairs

    def _kv_check(self, n: int, got, layers: list[int] | None = None) -> None:
        import torch

        _, want = self._kv_sequence(n)
        want = want if layers is None else [want[i] for i in layers]
        if got is None or len(got) != len(want) or not all(
                torch.equal(gk.cpu(), wk) and torch.equal(gv.cpu(), wv) for (gk, gv), (wk, wv) in zip(got, want)):
            self.fail("kv_get", f"sequence {n} came back {'missing' if got is None else 'different'}")

    def kv_step(self, n: int) -> None:
        tokens, pairs = self._kv_sequence(n)
        if self.kv.put(tokens, pairs) != KV_TOKENS // KV_CHUNK:
            self.fail("kv_put", f"sequence {n} was not written as {KV_TOKENS // KV_CHUNK} new chunks")
        self.count("kv_put")
        device = "cuda" if self.cuda and n % 2 else None  # half the reads through the GPU cache
        self._kv_check(n, self.kv.get(tokens, device=device))
        older = max(0, n - 1 - (7 * n) % (KV_WINDOW - 1))  # a sequence still in the window
        self._kv_check(older, self.kv.get(self._kv_sequence(older)[0]))
        self._kv_check(older, self.kv.get_layers(self._kv_sequence(older)[0], [0, 2]), [0, 2])
        self.count("kv_get", 3)
        if self.kv.lookup_prefix(tokens) != KV_TOKENS:
            self.fail("kv_lookup", f"sequence {n} is not cached right after its put")
        if n >= KV_WINDOW:
            gone = self._kv_sequence(n - KV_WINDOW)[0]
            self.kv.delete(gone)
            self.count("kv_delete")
            if self.kv.get(gone) is not None:
                self.fail("kv_get", f"sequence {n - KV_WINDOW} is still there after its delete")
            self.count("kv_get")

    # ---------------------------------------------------------- indexer
    def index_step(self, i: int) -> None:
        if self.stop.wait(self.index_seconds):
            return
        self.col.build_index()
        self.count("build_index")
        self.col.stats()
        self.kv.stats()

    def close(self) -> None:
        """Close what the database does not: the KV store on the pinned level, and that level."""
        if self._pinned_level is not None:
            self.kv.close()
            self._pinned_level.close()

    def threads(self) -> list[threading.Thread]:
        rng = np.random.default_rng(0)
        targets = {"writer": lambda: self._loop("writer", self.write_step),
                   "search": lambda: self._loop("search", lambda i: self.search_step(i, rng)),
                   "async-search": self.async_searches,
                   "kv": lambda: self._loop("kv", self.kv_step),
                   "indexer": lambda: self._loop("indexer", self.index_step)}
        return [threading.Thread(target=fn, name=f"soak-{name}", daemon=True) for name, fn in targets.items()]


# ------------------------------------------------------------------ the run
def _open_database(stack: ExitStack, tier: str, workdir: str, endpoint_url: str | None, bucket: str | None,
                   options: dict[str, Any]):
    if tier == "lmdb":
        return tierstore.connect(os.path.join(workdir, "db"), **options)
    if tier == "file":
        from tierstore.tiers.file import FileTier

        file_tier = stack.enter_context(FileTier(os.path.join(workdir, "files")))
        return tierstore.connect(os.path.join(workdir, "db"), tier=file_tier, **options)
    if tier == "s3":
        if endpoint_url is None:
            from tierstore.testing import MotoServer

            server = stack.enter_context(MotoServer())
            bucket = bucket or "tierstore-soak"
            server.client().create_bucket(Bucket=bucket)
            endpoint_url = server.endpoint_url
        if not bucket:
            raise ValueError("give the bucket that exists at endpoint_url")
        return tierstore.connect(f"s3://{bucket}/soak-{uuid.uuid4().hex[:8]}", endpoint_url=endpoint_url, **options)
    raise ValueError(f"tier must be lmdb, file or s3, got {tier!r}")


def run_soak(seconds: float, tier: str = "lmdb", workdir: str | None = None, *, sample_seconds: float = 5.0,
             endpoint_url: str | None = None, bucket: str | None = None, bounds: Bounds = Bounds(),
             writes_per_second: float = 10.0, index_seconds: float | None = None, malloc_trim: bool = False,
             on_sample: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the mixed workload for ``seconds`` (after seeding) and return the report.

    The report holds ``samples`` (resources and cumulative ops at each sample), ``ops``
    (totals), ``rates`` (ops/s), ``errors`` and ``messages`` (the first few failures),
    ``verdict`` (:func:`growth_verdict`), ``after_close`` (resources once the database is
    closed) and ``ok`` (no error and every resource within bounds). ``endpoint_url`` and
    ``bucket`` name an S3 endpoint for ``tier="s3"``; without them a moto server is started.
    ``malloc_trim``: hand glibc's free heap back to the system before each sample, so
    that growth which remains is held memory, not the allocator's retention.
    """
    cuda = _cuda_torch() is not None or _torch_has_cuda()
    # Checkpoints every ~16 writer rounds; indexes only from the explicit builds (one after seeding).
    options: dict[str, Any] = {"flush_rows": 1000, "auto_index_rows": 1 << 30}
    with ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tierstore-soak-"))
        db = _open_database(stack, tier, workdir, endpoint_url, bucket, options)
        stack.callback(db.close)
        soak = _Soak(db, writes_per_second=writes_per_second, cuda=cuda,
                     index_seconds=index_seconds if index_seconds is not None else min(20.0, max(2.0, seconds / 8)))
        stack.callback(soak.close)  # before the database closes
        seed_started = time.monotonic()
        soak.seed()
        seed_s = time.monotonic() - seed_started
        workers = soak.threads()
        started = time.monotonic()
        for worker in workers:
            worker.start()
        samples: list[dict[str, Any]] = []
        due = 0.0
        try:
            while True:
                time.sleep(max(0.0, due - (time.monotonic() - started)))
                gc.collect()
                if malloc_trim:
                    _malloc_trim()
                ops, errors = soak.snapshot()
                sample = {"t": time.monotonic() - started, **read_resources(), **_tier_usage(db.tier),
                          "ops": ops, "errors": errors}
                samples.append(sample)
                if on_sample is not None:
                    on_sample(sample)
                if due >= seconds:
                    break
                due = min(due + sample_seconds, seconds)
        finally:
            soak.stop.set()
            for worker in workers:
                worker.join(timeout=120)
                if worker.is_alive():
                    soak.fail(worker.name, "did not stop within 120 s")
        elapsed = time.monotonic() - started
        checkpoints = soak.col.stats()["manifest_version"]
    gc.collect()
    ops, errors = soak.snapshot()
    verdict = growth_verdict(samples, bounds)
    return {"tier": tier, "seconds": elapsed, "seed_s": seed_s, "sample_seconds": sample_seconds, "cuda": cuda,
            "pinned_source": samples[0]["pinned_source"], "ops": ops,
            "rates": {kind: n / elapsed for kind, n in sorted(ops.items())}, "manifest_versions": checkpoints,
            "errors": errors, "messages": list(soak.messages), "samples": samples, "verdict": verdict,
            "after_close": read_resources(), "bounds": dataclasses.asdict(bounds),
            "ok": errors == 0 and all(row["ok"] for row in verdict)}


def _tier_usage(tier) -> dict[str, Any]:
    """Blobs in the database's tier; for LMDB also the bytes they hold and the map's high-water mark."""
    stats = tier.stats()
    return {"keys": stats.items if stats.items is not None else len(tier.list("")),
            "stored": stats.bytes_stored, "map_used": stats.extra.get("used_bytes")}


def _malloc_trim() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        return


def _torch_has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# ------------------------------------------------------------------ CLI
def _sample_row(sample: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    ops = sum(sample["ops"].values())
    if previous is not None and sample["t"] > previous["t"]:
        rate = (ops - sum(previous["ops"].values())) / (sample["t"] - previous["t"])
    else:
        rate = None
    return {"t": sample["t"], "rss": sample["rss"] / MiB, "anon": sample["rss_anon"] / MiB,
            "file": sample["rss_file"] / MiB, "pinned": sample["pinned"] / MiB,
            "gpu": None if sample["gpu"] is None else sample["gpu"] / MiB, "fds": sample["fds"],
            "threads": sample["threads"], "py": sample["py_threads"], "keys": sample["keys"],
            "stored": None if sample["stored"] is None else sample["stored"] / MiB,
            "map": None if sample["map_used"] is None else sample["map_used"] / MiB, "rate": rate,
            "errors": sample["errors"]}


_SAMPLE_COLUMNS = [("t", "t (s)", ".0f"), ("rss", "RSS MiB", ".1f"), ("anon", "anon MiB", ".1f"),
                   ("file", "file MiB", ".1f"), ("pinned", "pinned MiB", ".1f"), ("gpu", "GPU MiB", ".1f"),
                   ("fds", "fds", "d"), ("threads", "threads", "d"), ("py", "py threads", "d"), ("keys", "keys", "d"),
                   ("stored", "stored MiB", ".1f"), ("map", "LMDB map MiB", ".1f"), ("rate", "ops/s", ".0f"),
                   ("errors", "errors", "d")]


def _scaled(row: dict[str, Any]) -> dict[str, Any]:
    scale = MiB if row["resource"] in ("rss", "pinned", "gpu") else 1
    return {**row, **{k: row[k] / scale for k in ("start", "baseline", "end", "growth", "allowed")},
            "unit": "MiB" if scale == MiB else "", "verdict": "ok" if row["ok"] else "GREW"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--tier", choices=("lmdb", "file", "s3"), default="lmdb")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--sample-seconds", type=float, default=None,
                        help="seconds between samples (default: about 60 samples, 2 to 30 s apart)")
    parser.add_argument("--writes-per-second", type=float, default=10.0, help="writer rounds per second")
    parser.add_argument("--malloc-trim", action="store_true",
                        help="return glibc's free heap to the system before each sample (tells a leak from retention)")
    args = parser.parse_args(argv)
    seconds = args.minutes * 60
    sample_seconds = args.sample_seconds or min(30.0, max(2.0, seconds / 60))
    print(f"soak: {args.minutes:g} min on {args.tier}, a sample every {sample_seconds:g} s", flush=True)
    previous: list[dict[str, Any]] = []

    def progress(sample: dict[str, Any]) -> None:
        row = _sample_row(sample, previous[-1] if previous else None)
        previous.append(sample)
        print(f"  t={row['t']:6.0f}s rss={row['rss']:7.1f} MiB fds={row['fds']:4d} threads={row['threads']:3d} "
              f"keys={row['keys']} errors={row['errors']}", file=sys.stderr, flush=True)

    report = run_soak(seconds, args.tier, sample_seconds=sample_seconds, writes_per_second=args.writes_per_second,
                      malloc_trim=args.malloc_trim, on_sample=progress)
    samples = report["samples"]
    rows = [_sample_row(s, samples[i - 1] if i else None) for i, s in enumerate(samples)]
    stride = max(1, -(-len(rows) // 40))
    print(format_table(rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else []), _SAMPLE_COLUMNS))
    print(f"pinned: {report['pinned_source']}; anon/file: RSS of the heap / of mapped files (LMDB's map); "
          f"keys, stored: blobs in the tier{'; glibc heap trimmed before each sample' if args.malloc_trim else ''}")
    print()
    print(format_table([{"kind": kind, "ops": report["ops"][kind], "rate": rate}
                        for kind, rate in report["rates"].items()],
                       [("kind", "operation", "s"), ("ops", "calls", "d"), ("rate", "per s", ".1f")]))
    print(f"seeded in {report['seed_s']:.1f} s; {report['manifest_versions']} manifest versions "
          f"(checkpoints and builds); writes of {BATCH} rows, tenant writes of {TENANT_BATCH}")
    print()
    print(format_table([_scaled(row) for row in report["verdict"]],
                       [("resource", "resource", "s"), ("unit", "unit", "s"), ("statistic", "of", "s"),
                        ("start", "first", ".1f"),
                        ("baseline", "after warm-up", ".1f"), ("end", "end", ".1f"), ("growth", "growth", "+.1f"),
                        ("allowed", "allowed", ".1f"), ("verdict", "verdict", "s")]))
    slope = report["verdict"][0].get("slope_mib_per_min")
    closed = report["after_close"]
    print(f"RSS trend after warm-up {slope:+.2f} MiB/min; after close: fds {closed['fds']}, "
          f"threads {closed['threads']}, RSS {closed['rss'] / MiB:.1f} MiB")
    for message in report["messages"]:
        print(f"error: {message}")
    print(f"{report['errors']} errors; verdict: {'flat' if report['ok'] else 'FAILED'}")
    if args.json:
        summary = {k: v for k, v in report.items() if k not in ("samples", "verdict")}
        write_report(args.json, bench_meta(bench="soak", tier=args.tier, minutes=args.minutes,
                                           malloc_trim=args.malloc_trim),
                     summary=summary, verdict=report["verdict"], samples=samples)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
