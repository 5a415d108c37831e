"""tierstore's SPANN collections as systems of bench/ann.py, one per tier layout.

==================  ==========================================================================
system              what is measured
==================  ==========================================================================
tierstore-mem       ``memory_cache=None``: posting lists and vectors resident; timed in the
                    bench process, interleaved with the faiss baselines, like them
tierstore-lmdb-cold ``memory_cache=0`` on the local LMDB path: a fresh process reopens the
                    database for each setting (cold caches) and times single queries
tierstore-s3        the same collection in S3 (a moto server on 127.0.0.1 started by the
                    bench), ``memory_cache=0``, a fresh process per pass
tierstore-s3-60ms   the same again through :class:`latency_proxy.LatencyProxy`, which adds
                    ``--s3-latency-ms`` (60) to every S3 request: what S3's first-byte
                    latency does to a cold query
==================  ==========================================================================

**One build.** The collection is built once per run, in memory mode on LMDB in a
temporary directory (``--workdir``): vectors added in batches of 50,000 (each one a WAL
record; no flush or automatic index before the build), then
``build_index(quantizer=..., target_list_size=100)``. tierstore-mem searches that very
collection. The cold system reopens the same LMDB path in its own process; the S3
systems copy its blobs (same keys) into a bucket on moto. Each system's ``build s``
counts the whole build as if it had been alone (plus the upload for S3), as ann.py
counts a shared coarse quantizer.

**Cold passes** (:func:`measure_main`, run as ``python bench/_tierstore_systems.py
measure`` with a JSON spec on stdin and its JSON result on stdout): for each setting,
connect and open the collection afresh (timed, with its reads), then search the first
``n`` queries one per call, single thread (faiss OpenMP at 1; S3 reads still go out in
parallel on the tier's pool). Per query it records the latency, the tier read calls
made during the search (each call is one dependent round trip: posting lists are
fetched in one ``get_ranges`` call, rerank vectors in another), split by what the keys
hold (``post``: posting segments, ``rr``: vector chunks read for the rerank, ``other``),
with their ranged reads, the bytes returned and, on S3, the HTTP GETs sent; and the
posting-list figures of ``SearchResult.stats`` and the stored size of the probed lists,
for comparison. (The counting wrapper runs inside the timed search: some microseconds
per query.) On loopback moto a GET costs a few milliseconds of moto's own Python, so
the 0 ms S3 pass mostly shows moto; the delayed pass adds what each dependent round
would cost on S3. The LMDB pass then
searches every recall query in batches of 100 for recall@10 over the same queries as
the other systems and a one-pass batch QPS; the S3 passes report recall over their few
timed queries. Every pass's ids are compared with the in-memory collection's for the
same setting (``agrees_with_memory``: the tiers must not change results).

Memory: ``resident_bytes`` is ``Collection.stats()["resident_bytes"]`` after the pass
(centroids, posting directory, cached lists, row table; plus every vector in memory
mode), against the raw float32 vectors (``n * d * 4``); the process's VmRSS, RssAnon
and RssFile are read from /proc before connecting (the interpreter with numpy, faiss
and tierstore imported) and after the pass. LMDB reads go through a memory map, so the
pages a cold pass touched show up in RssFile (page cache shared with the OS), not in
RssAnon. The OS page cache itself stays warm between passes: "cold" here means a new
process with empty tierstore caches, not an empty page cache.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(_HERE))  # run from a checkout

COLLECTION = "ann"
ADD_BATCH = 50_000
TARGET_LIST_SIZE = None  # the library's default: sqrt(n) vectors per list
BUCKET = "tierstore-bench"
S3_PREFIX = "ann"
K = 10
BATCH = 100
_READ_METHODS = ("get", "get_range", "get_many", "get_ranges", "contains", "size", "list")


def _grid(nprobes: Sequence[int], reranks: Sequence[int]) -> tuple[dict[str, int], ...]:
    return tuple({"nprobe": p, "rerank": r} for r in reranks for p in nprobes)


def memory_settings(quick: bool) -> tuple[dict[str, int], ...]:
    return _grid((8, 12, 16, 24), (3, 4)) if quick else _grid((6, 8, 10, 12, 14, 16, 20, 24, 32), (2, 3, 4))


def cold_settings(quick: bool) -> tuple[dict[str, int], ...]:
    return _grid((12, 16), (3, 4)) if quick else _grid((8, 12, 16, 24), (3, 4))


def s3_settings(quick: bool) -> tuple[dict[str, int], ...]:
    return _grid((16,), (4,)) if quick else _grid((12, 16), (4,))


# --------------------------------------------------------------------------- the shared build

class SharedBuild:
    """One LMDB database holding the benchmark collection, built on first use.

    Users call :meth:`acquire` (which builds when needed) and :meth:`release`; the last
    release closes the database and deletes the temporary directory.
    """

    def __init__(self, *, quantizer: str, workdir: str | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.quantizer = quantizer
        self.parent_dir = workdir
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.workdir: str | None = None
        self.db: Any = None
        self.col: Any = None
        self.build_s = 0.0
        self.add_s = 0.0
        self.info: dict[str, Any] = {}
        self.n = self.dim = 0
        self._users = 0
        self._files: dict[str, str] = {}

    @property
    def path(self) -> str:
        assert self.workdir is not None
        return os.path.join(self.workdir, "db")

    def acquire(self, dataset: Any) -> float:
        """Build on first use; returns the build seconds this caller reuses (0 for the builder)."""
        self._users += 1
        if self.db is not None:
            return self.build_s
        try:
            self._build(dataset)
        except BaseException:
            self.release()
            raise
        return 0.0

    def _build(self, dataset: Any) -> None:
        import tierstore

        started = time.perf_counter()
        if self.parent_dir:
            os.makedirs(self.parent_dir, exist_ok=True)
        self.workdir = tempfile.mkdtemp(prefix="tierstore-ann-", dir=self.parent_dir)
        n, d = dataset.base.shape
        self.n, self.dim = n, d
        raw = n * d * 4
        # No flush or automatic index before build_index: the vectors wait in the WAL and
        # the exact delta, then the build writes them once (as vector chunks) and indexes them.
        self.db = tierstore.connect(self.path, memory_cache=None, flush_rows=n + 1, auto_index_rows=n + 1,
                                    map_size=max(1 << 30, 4 * raw))
        col = self.db.create_collection(COLLECTION, dim=d, metric=dataset.metric)
        for start in range(0, n, ADD_BATCH):
            stop = min(n, start + ADD_BATCH)
            col.add(ids=np.arange(start, stop, dtype=np.int64), vectors=dataset.base[start:stop])
        self.add_s = time.perf_counter() - started
        params = {} if TARGET_LIST_SIZE is None else {"target_list_size": TARGET_LIST_SIZE}
        self.info = dict(col.build_index(quantizer=self.quantizer, **params))
        self.col = col
        self.build_s = time.perf_counter() - started
        self.log(f"tierstore: built {n:,} x {d} ({self.quantizer}, {self.info.get('lists')} lists, "
                 f"{self.info.get('list_bytes', 0) / 2**20:.1f} MiB of lists) in {self.build_s:.1f} s "
                 f"(adding {self.add_s:.1f} s) under {self.workdir}")

    def release(self) -> None:
        self._users -= 1
        if self._users > 0:
            return
        db, self.db, self.col = self.db, None, None
        try:
            if db is not None:
                db.close()
        finally:
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
            self._files.clear()

    def array_file(self, name: str, array: np.ndarray) -> str:
        """``array`` saved as ``<workdir>/<name>.npy`` (once per name) for the measuring processes."""
        if name not in self._files:
            path = os.path.join(self.workdir or tempfile.gettempdir(), f"{name}.npy")
            np.save(path, np.ascontiguousarray(array))
            self._files[name] = path
        return self._files[name]

    def memory_ids(self, queries: np.ndarray, setting: Mapping[str, Any]) -> np.ndarray:
        """The in-memory collection's answer (the reference every tier must reproduce)."""
        return self.col.search(queries, K, **setting).ids


class S3Copy:
    """The built collection copied into a bucket on a moto server started here.

    With ``delay_s`` a :class:`~latency_proxy.LatencyProxy` in front of moto is started
    too (one per delay). Shared by the S3 systems; the last release stops everything.
    """

    def __init__(self, shared: SharedBuild) -> None:
        self.shared = shared
        self.server: Any = None
        self.upload_s = 0.0
        self.upload_bytes = 0
        self.objects = 0
        self.proxies: dict[float, Any] = {}
        self._users = 0

    @property
    def uri(self) -> str:
        return f"s3://{BUCKET}/{S3_PREFIX}"

    def acquire(self, dataset: Any) -> float:
        """Build (shared) and upload on first use; the build + upload seconds this caller reuses."""
        reused = self.shared.acquire(dataset)
        self._users += 1
        if self.server is not None:
            return reused + self.upload_s
        try:
            self._upload()
        except BaseException:
            self.release()
            raise
        return reused

    def _upload(self) -> None:
        import tierstore
        from tierstore.testing import MotoServer

        started = time.perf_counter()
        self.server = MotoServer().start()
        self.server.client().create_bucket(Bucket=BUCKET)
        source = self.shared.db.tier
        keys = source.list("")
        target = tierstore.connect(self.uri, endpoint_url=self.server.endpoint_url, memory_cache=0)
        try:
            batch: list[tuple[str, bytes]] = []
            size = 0
            for key in keys:
                value = source.get(key)
                batch.append((key, value))
                size += len(value)
                self.upload_bytes += len(value)
                if size >= 64 << 20:
                    target.tier.put_many(batch)
                    batch, size = [], 0
            if batch:
                target.tier.put_many(batch)
        finally:
            target.close()
        self.objects = len(keys)
        self.upload_s = time.perf_counter() - started
        self.shared.log(f"tierstore: copied {len(keys)} objects ({self.upload_bytes / 2**20:.1f} MiB) to "
                        f"{self.uri} on moto {self.server.endpoint_url} in {self.upload_s:.1f} s")

    def endpoint(self, delay_s: float) -> str:
        if delay_s <= 0:
            return self.server.endpoint_url
        if delay_s not in self.proxies:
            from latency_proxy import LatencyProxy

            self.proxies[delay_s] = LatencyProxy.for_url(self.server.endpoint_url, delay_s).start()
        return self.proxies[delay_s].endpoint_url

    def release(self) -> None:
        self._users -= 1
        if self._users <= 0:
            for proxy in self.proxies.values():
                proxy.stop()
            self.proxies.clear()
            if self.server is not None:
                self.server.stop()
                self.server = None
        self.shared.release()


# --------------------------------------------------------------------------- searchers

class MemorySearcher:
    """tierstore-mem: the built collection itself (memory mode), timed like faiss."""

    def __init__(self, shared: SharedBuild, reused_build_s: float) -> None:
        self.shared = shared
        self.col = shared.col
        self.reused_build_s = reused_build_s

    def search(self, queries: np.ndarray, k: int, **setting: Any) -> np.ndarray:
        return self.col.search(queries, k, **setting).ids

    def index_bytes(self) -> int:
        return int(self.col.stats()["resident_bytes"])

    def close(self) -> None:
        if self.col is not None:
            self.col = None
            self.shared.release()


class ColdSearcher:
    """A tiered layout measured in fresh processes (:meth:`measure`), not by ann.py's timing loop.

    ``endpoint`` (S3 only) is a function of nothing returning the endpoint URL to use.
    """

    def __init__(self, shared: SharedBuild, *, kind: str, uri: str, memory_cache: int, queries: int,
                 batch_recall: bool, reused_build_s: float, endpoint: Callable[[], str] | None = None,
                 release: Callable[[], None] | None = None, delay_ms: float = 0.0) -> None:
        self.shared = shared
        self.kind = kind
        self.uri = uri
        self.memory_cache = memory_cache
        self.queries = queries
        self.batch_recall = batch_recall
        self.reused_build_s = reused_build_s
        self.delay_ms = delay_ms
        self._endpoint = endpoint
        self._release = release or shared.release
        self._closed = False

    def search(self, queries: np.ndarray, k: int, **setting: Any) -> np.ndarray:
        raise NotImplementedError("a cold system is measured by measure(), in a fresh process")

    def index_bytes(self) -> int:
        """Resident bytes of the collection opened in this tiered mode (before any search)."""
        import tierstore

        endpoint = self._endpoint() if self._endpoint else None
        db = tierstore.connect(self.uri if self.kind != "lmdb" else self.shared.path, endpoint_url=endpoint,
                               memory_cache=self.memory_cache)
        try:
            return int(db.collection(COLLECTION).stats()["resident_bytes"])
        finally:
            db.close()

    def measure(self, settings: Sequence[Mapping[str, Any]], queries: np.ndarray, gt_ids: np.ndarray,
                log: Callable[[str], None]) -> list[dict[str, Any]]:
        """One fresh process runs every setting (each on a fresh connection); one record per setting."""
        n = min(self.queries, len(queries))
        spec = {"uri": self.shared.path if self.kind == "lmdb" else self.uri,
                "endpoint_url": self._endpoint() if self._endpoint else None,
                "memory_cache": self.memory_cache, "collection": COLLECTION, "k": K,
                "queries": self.shared.array_file(f"queries-{len(queries)}", queries),
                "gt_ids": self.shared.array_file(f"gt-{len(queries)}", gt_ids),
                "single_queries": n, "batch_recall": self.batch_recall,
                "settings": [dict(setting) for setting in settings]}
        started = time.perf_counter()
        result = run_measure(spec)
        log(f"measured {self.kind} ({len(settings)} settings x {n} single queries"
            f"{', + batch recall' if self.batch_recall else ''}) in a fresh process in "
            f"{time.perf_counter() - started:.1f} s")
        records = []
        for setting, out in zip(settings, result["settings"]):
            ids = np.asarray(out.pop("ids"), dtype=np.int64).reshape(n, K)
            reference = self.shared.memory_ids(queries[:n], setting)
            agrees = float(np.mean([set(a) == set(b) for a, b in zip(ids, reference)]))
            record = {**out, "single_agrees_with_batch": agrees, "agrees_with_memory": agrees,
                      "index_bytes": out["resident_bytes"], "tier": self.kind, "delay_ms": self.delay_ms,
                      "baseline_rss_bytes": result["baseline"]["rss"],
                      "baseline_rss_anon_bytes": result["baseline"]["rss_anon"],
                      "process_start_s": result["start_s"]}
            records.append(record)
        return records

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()


def tierstore_systems(dataset: Any, options: Any, system: Callable[..., Any]) -> list[Any]:
    """The tierstore systems for ``dataset`` as ``system(name, build, settings, description, aliases=...)``.

    ``options`` is ann.py's Options (quick, cold_queries, s3_queries, s3_latency_ms,
    workdir, tierstore_quantizer). Nothing is built until a system's ``build`` runs.
    """
    quick = options.quick
    quantizer = getattr(options, "tierstore_quantizer", "pq4fs")
    shared = SharedBuild(quantizer=quantizer, workdir=getattr(options, "workdir", None))
    s3 = S3Copy(shared)
    cold_queries = getattr(options, "cold_queries", None) or (200 if quick else 500)
    s3_queries = getattr(options, "s3_queries", None) or (20 if quick else 50)
    latency_ms = float(getattr(options, "s3_latency_ms", 60.0))
    size = "sqrt(n)" if TARGET_LIST_SIZE is None else TARGET_LIST_SIZE
    codes = f"SPANN,{quantizer},list~{size},rerank exact"

    def build_memory(data: Any) -> MemorySearcher:
        return MemorySearcher(shared, shared.acquire(data))

    def build_cold(data: Any) -> ColdSearcher:
        reused = shared.acquire(data)
        return ColdSearcher(shared, kind="lmdb", uri=shared.path, memory_cache=0, queries=cold_queries,
                            batch_recall=True, reused_build_s=reused)

    def build_s3(delay_ms: float) -> Callable[[Any], ColdSearcher]:
        def build(data: Any) -> ColdSearcher:
            reused = s3.acquire(data)
            return ColdSearcher(shared, kind="s3", uri=s3.uri, memory_cache=0, queries=s3_queries,
                                batch_recall=False, reused_build_s=reused, delay_ms=delay_ms,
                                endpoint=lambda: s3.endpoint(delay_ms / 1e3), release=s3.release)
        return build

    systems = [
        system("tierstore-mem", build_memory, memory_settings(quick),
               f"{codes}; memory_cache=None (lists + vectors resident)",
               aliases=("tierstore", "tierstore-quantizers")),
        system("tierstore-lmdb-cold", build_cold, cold_settings(quick),
               f"{codes}; LMDB, memory_cache=0, fresh process per pass ({cold_queries} single queries)",
               aliases=("tierstore", "tierstore-cold")),
        system("tierstore-s3", build_s3(0.0), s3_settings(quick),
               f"{codes}; S3 on moto (loopback), memory_cache=0, fresh process ({s3_queries} single queries)",
               aliases=("tierstore",)),
    ]
    if latency_ms > 0:
        systems.append(system(f"tierstore-s3-{latency_ms:g}ms", build_s3(latency_ms), s3_settings(quick),
                              f"{codes}; S3 on moto + {latency_ms:g} ms per request (latency proxy), "
                              f"memory_cache=0, fresh process ({s3_queries} single queries)",
                              aliases=("tierstore", "tierstore-s3")))
    # The other list codes, in memory, to compare formats in the same run (`--systems tierstore-quantizers`).
    from tierstore.index.quant import QUANTIZERS

    for other in QUANTIZERS:
        if other == quantizer:
            continue
        other_build = SharedBuild(quantizer=other, workdir=getattr(options, "workdir", None))

        def build_other(data: Any, other_build: SharedBuild = other_build) -> MemorySearcher:
            return MemorySearcher(other_build, other_build.acquire(data))

        systems.append(system(f"tierstore-mem-{other}", build_other, memory_settings(quick),
                              f"SPANN,{other},list~{size},rerank exact; memory_cache=None",
                              aliases=("tierstore-quantizers",)))
    return systems


# --------------------------------------------------------------------------- the measuring process

def run_measure(spec: Mapping[str, Any], *, timeout: float = 3600.0) -> dict[str, Any]:
    """Run :func:`measure_main` in a fresh interpreter; its JSON result."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(_HERE), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "measure"], input=json.dumps(spec),
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        how = f"exit {proc.returncode}"
        if proc.returncode < 0:
            how = f"killed by {signal.Signals(-proc.returncode).name}"
        raise RuntimeError(f"the measuring process failed ({how}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def _proc_memory() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process in bytes (zeros where /proc is absent)."""
    fields = {"VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file", "VmHWM": "rss_peak"}
    out = dict.fromkeys(fields.values(), 0)
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name in fields:
                    out[fields[name]] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _key_class(key: str) -> str:
    """What a stored key holds: ``post`` (posting-list segment), ``rr`` (vector chunk: rerank) or ``other``."""
    return "post" if "/seg/" in key else "rr" if "/vec/" in key else "other"


_CLASSES = ("post", "rr", "other")
_COUNTS = ("calls",) + tuple(f"{c}_{w}" for c in _CLASSES for w in ("rounds", "reads", "bytes", "gets"))


class _Reads:
    """Counts a tier's read calls, by what they read (instance attributes shadow the class's methods).

    Every call is one dependent round trip for a single-threaded search; its ranged or
    whole-key reads, the bytes they returned and (S3) the HTTP GETs sent while it ran are
    added to the class of the keys it read (posting segments, vector chunks, other).
    """

    def __init__(self, tier: Any) -> None:
        self.tier = tier
        self.counts = dict.fromkeys(_COUNTS, 0)
        self._s3 = getattr(tier, "kind", "") == "s3"
        self._wrap("get", lambda args, out: ([args[0]], [len(out)]))
        self._wrap("get_range", lambda args, out: ([args[0]], [len(out)]))
        self._wrap("get_many", lambda args, out: (args[0], [len(v) if v is not None else 0 for v in out]))
        self._wrap("get_ranges", lambda args, out: ([r[0] for r in args[0]], [len(v) for v in out]))
        for name in ("contains", "size", "list"):
            self._wrap(name, lambda args, out: ([args[0]], [0]))

    def _http_gets(self) -> int:
        if not self._s3:
            return 0
        return int(self.tier.stats().extra.get("requests_by_method", {}).get("GET", 0))

    def _wrap(self, name: str, describe: Callable[[tuple, Any], tuple[Sequence[str], Sequence[int]]]) -> None:
        method = getattr(self.tier, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            if args and not isinstance(args[0], (str, list)):
                args = (list(args[0]), *args[1:])  # an iterable of keys or ranges, read twice below
            gets = self._http_gets()
            out = method(*args, **kwargs)
            gets = self._http_gets() - gets
            keys, sizes = describe(args, out)
            seen: dict[str, list[int]] = {}
            for key, size in zip(keys, sizes):
                part = seen.setdefault(_key_class(key), [0, 0])
                part[0] += 1
                part[1] += size
            self.counts["calls"] += 1
            for cls, (reads, nbytes) in seen.items():
                self.counts[f"{cls}_rounds"] += 1
                self.counts[f"{cls}_reads"] += reads
                self.counts[f"{cls}_bytes"] += nbytes
            if seen:
                self.counts[f"{max(seen, key=lambda c: seen[c][0])}_gets"] += gets
            return out

        setattr(self.tier, name, counted)

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


def _summary(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "p50": float(np.percentile(array, 50)),
            "p95": float(np.percentile(array, 95)), "max": float(array.max())}


def _probed_list_bytes(col: Any, query: np.ndarray, setting: Mapping[str, Any]) -> int:
    """Stored bytes of the lists ``query`` probes under ``setting`` (what a fetch needs at least);
    -1 when the index's internals are not as expected."""
    try:
        index = col.index
        _, lists = index.probe(query, int(setting.get("nprobe", 24)), setting.get("prune_ratio"))
        lists = np.unique(lists[lists >= 0])
        return int(index.directory.length[lists].sum())
    except (AttributeError, TypeError, IndexError):
        return -1


def measure_main(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Time cold single queries per setting (see the module docstring); runs in a fresh process."""
    started = time.perf_counter()
    import faiss

    import tierstore
    import tierstore.client.database  # noqa: F401  (loaded lazily by tierstore.connect: load it before the baseline)

    faiss.omp_set_num_threads(1)
    sys.path.insert(0, _HERE)
    from datasets import recall_at_k

    queries = np.load(spec["queries"])
    gt_ids = np.load(spec["gt_ids"])
    k, n = int(spec["k"]), int(spec["single_queries"])
    gc.collect()
    baseline = _proc_memory()
    start_s = time.perf_counter() - started
    out = []
    for setting in spec["settings"]:
        t0 = time.perf_counter()
        db = tierstore.connect(spec["uri"], endpoint_url=spec.get("endpoint_url"),
                               memory_cache=spec["memory_cache"])
        reads = _Reads(db.tier)
        col = db.collection(spec["collection"])
        open_s = time.perf_counter() - t0
        opened = reads.snapshot()
        memory_open = _proc_memory()
        per_query: dict[str, list[float]] = {name: [] for name in (
            "latency", "calls", *_COUNTS[1:], "list_fetch_rounds", "list_requests", "list_bytes", "lists_probed",
            "probed_list_bytes")}
        ids = np.empty((n, k), dtype=np.int64)
        gc.collect()
        gc.disable()
        try:
            for i in range(n):
                query = queries[i:i + 1]
                before = reads.snapshot()
                t = time.perf_counter()
                result = col.search(query, k, **setting)
                per_query["latency"].append(time.perf_counter() - t)
                after = reads.snapshot()
                ids[i] = result.ids[0]
                for name in _COUNTS:
                    per_query[name].append(after[name] - before[name])
                for name in ("list_fetch_rounds", "list_requests", "list_bytes", "lists_probed"):
                    per_query[name].append(int(result.stats.get(name, 0)))
                per_query["probed_list_bytes"].append(_probed_list_bytes(col, query, setting))
        finally:
            gc.enable()
        col_stats = col.stats()
        memory_end = _proc_memory()
        q = {name: np.asarray(values, dtype=np.float64) for name, values in per_query.items()}
        latency_ms = q["latency"] * 1e3
        record: dict[str, Any] = {
            "recall_single": recall_at_k(ids, gt_ids[:n], k), "single_queries": n,
            "qps_single": n / float(q["latency"].sum()),
            "latency_ms": _summary(latency_ms), "first_query_ms": float(latency_ms[0]),
            "rounds": _summary(q["calls"]),
            "rounds_histogram": {str(int(v)): int(c) for v, c in zip(*np.unique(q["calls"], return_counts=True))},
            # The rounds the library's own figures imply: posting fetch rounds + 1 when rerank read anything.
            "expected_rounds": _summary(q["list_fetch_rounds"] + (q["rr_reads"] > 0)),
            "reads": _summary(q["post_reads"] + q["rr_reads"] + q["other_reads"]),
            "bytes": _summary(q["post_bytes"] + q["rr_bytes"] + q["other_bytes"]),
            "http_gets": _summary(q["post_gets"] + q["rr_gets"] + q["other_gets"]),
            **{name: _summary(q[name]) for name in _COUNTS[1:]},
            "stats_list_fetch_rounds": _summary(q["list_fetch_rounds"]),
            "stats_list_requests": _summary(q["list_requests"]),
            "stats_list_bytes": _summary(q["list_bytes"]),
            "lists_probed": _summary(q["lists_probed"]),
            "probed_list_bytes": _summary(q["probed_list_bytes"]) if q["probed_list_bytes"].min() >= 0 else None,
            "open_s": open_s, "open_rounds": opened["calls"],
            "open_reads": sum(opened[f"{c}_reads"] for c in _CLASSES),
            "open_bytes": sum(opened[f"{c}_bytes"] for c in _CLASSES),
            "open_http_gets": sum(opened[f"{c}_gets"] for c in _CLASSES),
            "resident_bytes": int(col_stats["resident_bytes"]), "raw_vector_bytes": int(col_stats["raw_vector_bytes"]),
            "index_resident_bytes": int(col_stats["index"]["resident_bytes"]) if col_stats["index"] else 0,
            "list_bytes_stored": int(col_stats["index"]["list_bytes"]) if col_stats["index"] else 0,
            "rss_open": memory_open, "rss_end": memory_end, "ids": ids.ravel().tolist()}
        if spec.get("batch_recall"):
            found = np.empty((len(queries), k), dtype=np.int64)
            t = time.perf_counter()
            for a in range(0, len(queries), BATCH):
                found[a:a + BATCH] = col.search(queries[a:a + BATCH], k, **setting).ids
            elapsed = time.perf_counter() - t
            record.update(recall_at_10=recall_at_k(found, gt_ids, k), recall_queries=len(queries),
                          qps_batch100=len(queries) / elapsed, batch_queries=len(queries))
        else:
            record.update(recall_at_10=record["recall_single"], recall_queries=n, qps_batch100=None,
                          batch_queries=0)
        db.close()
        out.append(record)
    return {"baseline": baseline, "start_s": start_s, "settings": out}


if __name__ == "__main__":
    if sys.argv[1:] != ["measure"]:
        raise SystemExit("usage: python bench/_tierstore_systems.py measure < spec.json > result.json")
    json.dump(measure_main(json.load(sys.stdin)), sys.stdout)
    sys.stdout.write("\n")
