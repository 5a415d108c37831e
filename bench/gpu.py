"""GPU benchmark: KV chunk loads onto the device and posting-list scans on it, each against raw torch in one run.

    python bench/gpu.py [--quick | --smoke] [--json PATH] [--sections kv,scan,tier]
                        [--device cuda|cpu] [--n ROWS] [--dir DIR]

Synthetic data only (no ``../shared`` needed). ``--device`` defaults to CUDA when torch
sees it, else the CPU; on the CPU every "device" figure is a CPU figure, which the table
header and ``meta.device_note`` say. A full run on one H100/H200 takes about two minutes
and a half (its time budget stops measuring at 170 s); ``--smoke`` (tests) about ten
seconds on a CPU.

1. ``kv``: ``KVCacheStore.get(tokens, device=dev)`` of single 256-token chunks, per
   layout (``llama3-8b``: 32 layers x 8 KV heads x 128, 32 MiB a chunk in fp16;
   ``bytelm-man``: 8 x 2 x 64, 1 MiB; seeded data from ``bench/kv.py``), codec and
   tier: ``memory``, ``lmdb`` (temp dir) and ``gpu_cache`` (``connect(gpu_cache=...)``
   over a memory tier: every timed load is a hit, one device-to-device copy). Chunks are
   put from device tensors (encoding on the device). The clock stops after
   ``torch.cuda.synchronize()``. Baselines, interleaved with the load: ``raw get``
   (``kv.tier.get(key)``, the stored bytes to the host) and ``raw load`` (that plus
   ``torch.frombuffer(...).to(dev, copy=True)``); per layout, ``h2d`` / ``h2d pinned``:
   ``torch.empty(..., device=dev).copy_(host)`` of the decoded fp16 bytes from pageable
   and pinned memory (pinned: CUDA only). GB/s are of decoded bytes;
   ``vs h2d = h2d ms / load ms`` (1.0: the load is as fast as copying the decoded KV to
   the device), ``vs raw = raw load ms / load ms``. Lossless codecs (fp16 on fp16 KV,
   bf16 on bf16 KV) are checked equal to the originals on every tier (a mismatch stops
   the run); quantized ones report the max abs error.
2. ``scan``: a collection of clustered unit vectors (``bench/datasets.py``'s generator
   at dim 384, centred and normalised: cosine), an sq8 index, searched with the default
   faiss CPU scan and with ``connect(scan_device=dev)`` (lists decoded into one device
   tensor, :mod:`tierstore.index.quant.torch_scanner`) at several ``nprobe``: single-query
   latency (median, p99) and QPS, batch QPS, recall@10 against faiss ``IndexFlatIP`` on
   the same data. Baseline: brute force on the device, ``(q @ x.T).topk(10)`` over all
   rows in the scanner's dtype (fp16 on CUDA). faiss uses every core.
3. ``tier``: ``bench/tiers.py``'s runner for its ``memory`` and ``gpu`` tiers (raw bytes
   get/put against torch copies); ``python bench/tiers.py --tiers gpu,memory`` runs it
   alone with more sizes and rounds.

Each measurement is bounded in time, and a run stops measuring (with a note) once it
passes its preset's budget; ``--json`` is rewritten after every section, so a killed
run keeps what it finished. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))  # run from a checkout: `python bench/gpu.py`
sys.path.insert(0, _HERE)

from _common import (bench_meta, calls_within, format_size, format_table, interleaved_rates,  # noqa: E402
                     median, write_report)
from _kv_quality import QUALITY_CODECS, single_thread  # noqa: E402
from datasets import exact_neighbours, generate_synthetic, recall_at_k  # noqa: E402
from kv import CHUNK_TOKENS, LAYOUTS, Layout, open_database, synthetic_chunk  # noqa: E402

ALL_SECTIONS = ("kv", "scan", "tier")
KV_TIERS = ("memory", "lmdb", "gpu_cache")
LOSSLESS = {"fp16": "float16", "bf16": "bfloat16"}  # codec -> the KV dtype it stores exactly
SCAN_DIM = 384
SCAN_K = 10
CPU_SCAN_ROWS = 20_000  # rows of the scan section on a CPU run (unless --n)


@dataclass(frozen=True)
class Settings:
    layouts: tuple[str, ...]
    codecs: tuple[str, ...]
    kv_chunks: dict[str, int]      # layout -> chunks per load measurement
    rounds: int
    pass_seconds: float            # one timed pass of a load or baseline
    scan_rows: int
    scan_queries: int
    nprobes: tuple[int, ...]
    single_queries: int            # single-query searches timed, at most ...
    single_seconds: float          # ... or this long, per backend and nprobe
    batch_seconds: float           # batch searches timed for about this long (at least one)
    tier_sizes: tuple[int, ...]
    budget_seconds: float          # stop measuring (with a note) past this


PRESETS = {
    "full": Settings(layouts=("bytelm-man", "llama3-8b"), codecs=("fp16", "bf16", "int8", "int4-g64"),
                     kv_chunks={"bytelm-man": 8, "llama3-8b": 4}, rounds=5, pass_seconds=0.15,
                     scan_rows=200_000, scan_queries=1000, nprobes=(1, 4, 16, 64), single_queries=300,
                     single_seconds=1.0, batch_seconds=1.0, tier_sizes=(4 << 10, 1 << 20, 32 << 20),
                     budget_seconds=170.0),
    "quick": Settings(layouts=("bytelm-man", "llama3-8b"), codecs=("fp16", "bf16", "int8", "int4-g64"),
                      kv_chunks={"bytelm-man": 4, "llama3-8b": 2}, rounds=3, pass_seconds=0.08,
                      scan_rows=100_000, scan_queries=500, nprobes=(1, 4, 16), single_queries=100,
                      single_seconds=0.4, batch_seconds=0.4, tier_sizes=(1 << 20, 32 << 20), budget_seconds=150.0),
    "smoke": Settings(layouts=("bytelm-man",), codecs=("fp16", "int8"), kv_chunks={"bytelm-man": 2}, rounds=1,
                      pass_seconds=0.01, scan_rows=5_000, scan_queries=50, nprobes=(8,), single_queries=10,
                      single_seconds=0.05, batch_seconds=0.0, tier_sizes=(4 << 10, 1 << 20), budget_seconds=60.0),
}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Budget:
    """Seconds left to the run; sections skip their remaining measurements once it is spent."""

    def __init__(self, seconds: float, notes: list[str]) -> None:
        self.deadline = time.perf_counter() + seconds
        self.seconds = seconds
        self.notes = notes

    def spent(self, what: str) -> bool:
        if time.perf_counter() < self.deadline:
            return False
        self.notes.append(f"time budget ({self.seconds:.0f} s) spent: skipped {what}")
        log(f"  budget spent: skipping {what}")
        return True


def synchronizer(device: Any) -> Callable[[], None]:
    """Waits for the device's queued work (a no-op on the CPU): call before stopping a clock."""
    import torch

    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def seconds_per_call(fns: list[Callable[[], Any]], rounds: int, pass_seconds: float) -> list[float]:
    """Median seconds per call of each fn, interleaved (N-way), each pass about ``pass_seconds``."""
    passes = []
    for fn in fns:
        calls = calls_within(lambda _i, fn=fn: fn(), 1000, pass_seconds)  # warm-up, and sizes the pass
        passes.append((lambda _i, fn=fn: fn(), calls))
    return [1.0 / median(rates) for rates in interleaved_rates(passes, rounds=rounds)]


def timed_calls(fn: Callable[[int], Any], max_calls: int, max_seconds: float) -> list[float]:
    """Seconds of each call ``fn(0), fn(1), ...`` (after one untimed warm-up call), until
    ``max_calls`` calls or ``max_seconds`` have passed; at least one."""
    fn(0)
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    for i in range(max_calls):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
        if start >= deadline:
            break
    return times


# ---------------------------------------------------------------------------- 1. kv
def _tokens(seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 7]).integers(0, 1 << 15, CHUNK_TOKENS, dtype=np.int64)


@contextlib.contextmanager
def open_kv_database(tier: str, workdir: str, device: Any, capacity: int) -> Iterator[Any]:
    """A fresh database: bench/kv.py's memory and lmdb ones, or ``gpu_cache`` over a memory tier."""
    if tier != "gpu_cache":
        with open_database(tier, workdir, None) as db:
            yield db
        return
    import tierstore
    from tierstore.tiers import MemoryTier

    memory = MemoryTier()
    db = tierstore.connect("memory", tier=memory, gpu_cache=capacity, gpu_device=device)
    try:
        yield db
    finally:
        db.close()
        memory.close()


def compare(got: list, want: list) -> tuple[bool, float]:
    """(equal, max abs error) of decoded layers against the originals (same device)."""
    import torch

    if len(got) != len(want):
        raise RuntimeError(f"a load returned {len(got)} layers, not {len(want)}")
    equal, worst = True, 0.0
    for (k2, v2), (k, v) in zip(got, want):
        for a, b in ((k2, k), (v2, v)):
            if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
                raise RuntimeError(f"a load returned {a.dtype}{list(a.shape)} on {a.device}, "
                                   f"not {b.dtype}{list(b.shape)} on {b.device}")
            equal = equal and bool(torch.equal(a, b))
            worst = max(worst, float((a.float() - b.float()).abs().max()))
    return equal, worst


def h2d_baselines(layout: Layout, device: Any, settings: Settings) -> dict[str, float | None]:
    """ms to copy one chunk's decoded fp16 bytes host -> device, from pageable and pinned memory."""
    import torch

    sync = synchronizer(device)
    host = torch.randn(layout.chunk_bytes // 2, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    target = torch.empty_like(host, device=device)

    def pageable():
        torch.empty_like(host, device=device).copy_(host)
        sync()

    fns = [pageable]
    if device.type == "cuda":
        pinned = host.pin_memory()

        def from_pinned():
            torch.empty_like(host, device=device).copy_(pinned, non_blocking=True)
            sync()
        fns.append(from_pinned)
    times = seconds_per_call(fns, settings.rounds, settings.pass_seconds)
    target.copy_(host)
    sync()
    if not torch.equal(target.cpu(), host):
        raise RuntimeError("the host-to-device baseline copy is not exact")
    return {"h2d_ms": times[0] * 1e3, "h2d_pinned_ms": times[1] * 1e3 if len(times) > 1 else None}


def measure_kv(db: Any, tier: str, layout: Layout, label: str, layers: list, device: Any, settings: Settings,
               baseline: dict[str, float | None], seed: int) -> dict[str, Any]:
    """Loads of one codec's chunks on one tier, against the raw get / raw load of their blobs."""
    import torch

    sync = synchronizer(device)
    name, options = QUALITY_CODECS[label]
    n = settings.kv_chunks[layout.name]
    dtype = LOSSLESS.get(label, "float16")
    kv = db.kv_cache(model=f"bench-{layout.name}", revision="v1", codec=name, codec_options=options,
                     chunk_tokens=CHUNK_TOKENS, dtype=dtype, layers=layout.layers, kv_heads=layout.kv_heads,
                     head_dim=layout.head_dim)
    try:
        seqs = [_tokens(seed + i) for i in range(n)]
        for s in seqs:
            kv.put(s, layers)
        keys = [kv.chunk_keys(s)[0] for s in seqs]
        stored = len(kv.tier.get(keys[0]))
        checks = [compare(kv.get(seqs[0], device=device), layers)]
        if tier == "gpu_cache":
            checks.append(compare(kv.get(seqs[0], device=device), layers))  # the hit, as timed below
        equal = all(ok for ok, _ in checks)
        if label in LOSSLESS and not equal:
            raise RuntimeError(f"{layout.name} {tier} {label}: a lossless chunk loaded to {device} "
                               "is not equal to the one put")

        def load():
            for s in seqs:
                kv.get(s, device=device)
                sync()

        def raw_get():
            for k in keys:
                kv.tier.get(k)

        def raw_load():
            for k in keys:
                torch.frombuffer(kv.tier.get(k), dtype=torch.uint8).to(device, copy=True)
                sync()

        load_s, raw_get_s, raw_load_s = (t / n for t in seconds_per_call([load, raw_get, raw_load], settings.rounds,
                                                                         settings.pass_seconds))
        cache = kv.stats()["gpu_cache"]
        for s in seqs:
            kv.delete(s)
    finally:
        kv.close()
    load_ms = load_s * 1e3
    return {"layout": layout.name, "tier": tier, "codec": label, "kv_dtype": dtype, "device": str(device),
            "chunks": n, "decoded_bytes": layout.chunk_bytes, "stored_bytes": stored,
            "compression_ratio": layout.chunk_bytes / stored, "load_ms": load_ms,
            "load_GBps": layout.chunk_bytes / load_s / 1e9, "raw_get_ms": raw_get_s * 1e3,
            "raw_load_ms": raw_load_s * 1e3, **baseline,
            "vs_h2d": baseline["h2d_ms"] / load_ms,
            "vs_h2d_pinned": baseline["h2d_pinned_ms"] / load_ms if baseline["h2d_pinned_ms"] else None,
            "vs_raw_load": raw_load_s / load_s, "lossless": label in LOSSLESS,
            "verified_equal": equal if label in LOSSLESS else None,
            "max_abs_err": max(err for _, err in checks),
            "gpu_cache_hits": None if cache is None else cache["hits"]}


def run_kv(device: Any, settings: Settings, workdir: str, budget: Budget) -> tuple[list[dict], dict]:
    import torch

    records: list[dict[str, Any]] = []
    baselines: dict[str, dict[str, float | None]] = {}
    with single_thread(), warnings.catch_warnings():
        # The raw load wraps the tier's read-only bytes with torch.frombuffer, which warns;
        # the wrapper is only read by the copy, so the warning does not apply.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        for index, name in enumerate(settings.layouts):
            if budget.spent(f"kv layout {name} and after"):
                break
            layout = LAYOUTS[name]
            baselines[name] = baseline = h2d_baselines(layout, device, settings)
            log(f"  kv {name}: h2d {baseline['h2d_ms']:.3f} ms"
                + (f", pinned {baseline['h2d_pinned_ms']:.3f} ms" if baseline["h2d_pinned_ms"] else ""))
            fp16 = [(k.to(device), v.to(device)) for k, v in synthetic_chunk(layout, seed=index)]
            capacity = 2 * settings.kv_chunks[name] * layout.chunk_bytes + (16 << 20)
            for tier in KV_TIERS:
                for label in settings.codecs:
                    if budget.spent(f"kv {name} {tier} {label} and after"):
                        return records, baselines
                    kv_dtype = getattr(torch, LOSSLESS.get(label, "float16"))
                    layers = fp16 if kv_dtype == torch.float16 else [(k.to(kv_dtype), v.to(kv_dtype)) for k, v in fp16]
                    with open_kv_database(tier, workdir, device, capacity) as db:
                        rec = measure_kv(db, tier, layout, label, layers, device, settings, baseline,
                                         seed=1000 * index)
                    records.append(rec)
                    log(f"  kv {name} {tier:9} {label:8}: {rec['load_ms']:8.3f} ms ({rec['load_GBps']:.2f} GB/s), "
                        f"vs h2d {rec['vs_h2d']:.2f}, vs raw load {rec['vs_raw_load']:.2f}")
    return records, baselines


def kv_table(records: list[dict[str, Any]]) -> str:
    rows = [{**r, "check": ("equal" if r["verified_equal"] else "DIFFERS") if r["lossless"]
             else f"max err {r['max_abs_err']:.3g}"} for r in records]
    return format_table(rows, [("layout", "layout", "s"), ("tier", "tier", "s"), ("codec", "codec", "s"),
                               ("stored_bytes", "stored B", ",d"), ("load_ms", "load ms", ".3f"),
                               ("load_GBps", "GB/s", ".2f"), ("raw_get_ms", "raw get ms", ".3f"),
                               ("raw_load_ms", "raw load ms", ".3f"), ("h2d_ms", "h2d ms", ".3f"),
                               ("h2d_pinned_ms", "pinned ms", ".3f"), ("vs_h2d", "vs h2d", ".2f"),
                               ("vs_h2d_pinned", "vs pinned", ".2f"), ("vs_raw_load", "vs raw", ".2f"),
                               ("check", "check", "s")])


# ---------------------------------------------------------------------------- 2. scan
def scan_data(rows: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors: the SIFT-like mixture of bench/datasets.py, centred and normalised."""
    base, query = (a.astype(np.float32) for a in generate_synthetic(rows, SCAN_DIM, queries, seed))
    centre = base.mean(axis=0)
    out = []
    for x in (base, query):
        x -= centre
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        out.append(np.ascontiguousarray(x))
    return out[0], out[1]


def search_timings(search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray, truth: np.ndarray,
                   settings: Settings) -> dict[str, float]:
    """Recall@10 (one batch search), single-query latency and QPS, batch QPS of ``search``."""
    found = search(queries)
    single = timed_calls(lambda i: search(queries[i % len(queries)][None, :]), settings.single_queries,
                         settings.single_seconds)
    batch = timed_calls(lambda _i: search(queries), 50, settings.batch_seconds)
    return {"recall_at_10": recall_at_k(found, truth, SCAN_K), "single_ms": median(single) * 1e3,
            "single_p99_ms": float(np.percentile(single, 99)) * 1e3, "single_qps": len(single) / sum(single),
            "single_queries": len(single), "batch_queries": len(queries), "batch_qps": len(queries) / median(batch),
            "batch_calls": len(batch)}


def brute_force(base: np.ndarray, device: Any) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """``(q @ x.T).topk`` over every row on ``device``, in the torch scanner's dtype there."""
    import torch

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x = torch.from_numpy(base).to(device, dtype)

    def search(xq: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            q = torch.from_numpy(xq).to(device, dtype)
            return (q @ x.T).topk(SCAN_K, dim=1).indices.cpu().numpy()
    return search, str(dtype).removeprefix("torch.")


def run_scan(device: Any, rows: int, settings: Settings, workdir: str, budget: Budget) -> tuple[list[dict], dict]:
    import faiss

    import tierstore

    info: dict[str, Any] = {"rows": rows, "dim": SCAN_DIM, "queries": settings.scan_queries, "metric": "cosine",
                            "quantizer": "sq8", "faiss_threads": faiss.omp_get_max_threads()}
    started = time.perf_counter()
    base, queries = scan_data(rows, settings.scan_queries)
    info["generate_s"] = time.perf_counter() - started
    started = time.perf_counter()
    truth = exact_neighbours(base, queries, SCAN_K, metric="ip")[1]
    info["ground_truth_s"] = time.perf_counter() - started
    log(f"  scan: {rows:,} x {SCAN_DIM} generated in {info['generate_s']:.1f} s, "
        f"exact top-{SCAN_K} in {info['ground_truth_s']:.1f} s")
    path = os.path.join(workdir, "scan-db")
    started = time.perf_counter()
    with tierstore.connect(path, auto_index_rows=1 << 62, flush_rows=1 << 62, map_size=8 << 30) as db:
        col = db.create_collection("vectors", dim=SCAN_DIM, metric="cosine")
        col.add(np.arange(rows), base)
        build = col.build_index(quantizer="sq8")
    info["build_s"] = time.perf_counter() - started
    info["lists"] = build.get("lists")
    log(f"  scan: index of {build.get('lists')} lists built in {info['build_s']:.1f} s")

    records: list[dict[str, Any]] = []
    for backend, scan_device in (("faiss-cpu", None), (f"torch-{device.type}", str(device))):
        if budget.spent(f"scan {backend} and after"):
            return records, info
        started = time.perf_counter()
        with tierstore.connect(path, scan_device=scan_device) as db:
            col = db.collection("vectors")
            info[f"open_s_{backend}"] = time.perf_counter() - started
            for nprobe in settings.nprobes:
                if budget.spent(f"scan {backend} nprobe {nprobe} and after"):
                    break
                rec = search_timings(lambda xq, nprobe=nprobe: col.search(xq, k=SCAN_K, nprobe=nprobe).ids,
                                     queries, truth, settings)
                records.append({"backend": backend, "nprobe": nprobe, **rec})
                log(f"  scan {backend:10} nprobe {nprobe:3}: recall {rec['recall_at_10']:.3f}, single "
                    f"{rec['single_ms']:.2f} ms, batch {rec['batch_qps']:,.0f} QPS")
    if not budget.spent("scan brute-force baseline"):
        search, dtype = brute_force(base, device)
        rec = search_timings(search, queries, truth, settings)
        records.append({"backend": f"raw torch {device.type} {dtype}", "nprobe": None, **rec})
        log(f"  scan raw brute force: recall {rec['recall_at_10']:.3f}, batch {rec['batch_qps']:,.0f} QPS")
        raw = rec
        for r in records:
            r["batch_vs_raw"] = r["batch_qps"] / raw["batch_qps"]
    cpu = {r["nprobe"]: r for r in records if r["backend"] == "faiss-cpu"}
    for r in records:
        same = cpu.get(r["nprobe"])
        if same is not None and r["nprobe"] is not None:
            r["single_vs_faiss"] = same["single_ms"] / r["single_ms"]
            r["batch_vs_faiss"] = r["batch_qps"] / same["batch_qps"]
    return records, info


def scan_table(records: list[dict[str, Any]]) -> str:
    return format_table(records, [("backend", "backend", "s"), ("nprobe", "nprobe", "d"),
                                  ("recall_at_10", "recall@10", ".4f"), ("single_ms", "single ms", ".3f"),
                                  ("single_p99_ms", "p99 ms", ".3f"), ("single_qps", "single QPS", ",.0f"),
                                  ("batch_qps", "batch QPS", ",.0f"), ("single_vs_faiss", "single x faiss", ".2f"),
                                  ("batch_vs_faiss", "batch x faiss", ".2f"), ("batch_vs_raw", "batch x raw", ".3f")])


# ---------------------------------------------------------------------------- 3. tier
def run_tier(settings: Settings, workdir: str, quick: bool) -> list[dict[str, Any]]:
    """bench/tiers.py's measurement of its memory and gpu tiers (the gpu one on CUDA when present)."""
    import tiers

    timing = {"rounds": settings.rounds, "batch_seconds": 0.02 if quick else 0.05, "max_calls": 1000}
    rng = np.random.default_rng(20240611)
    values = {size: rng.integers(0, 256, size, dtype=np.uint8).tobytes() for size in settings.tier_sizes}
    records = []
    for name in ("memory", "gpu"):
        try:
            records += tiers.measure_tier(name, list(settings.tier_sizes), values, workdir, timing)
        except tiers.Unavailable as exc:
            log(f"  tier: skipping {name}: {exc}")
    return [{**r, "size": format_size(r["value_bytes"])} for r in records]


def tier_table(records: list[dict[str, Any]]) -> str:
    return format_table(records, [("tier", "tier", "s"), ("op", "op", "s"), ("size", "size", "s"),
                                  ("tier_MBps", "tier MB/s", ",.1f"), ("raw_MBps", "raw MB/s", ",.1f"),
                                  ("ratio", "ratio", ".3f")])


# ---------------------------------------------------------------------------- main
def device_info(device: Any) -> dict[str, Any]:
    import faiss
    import torch

    info: dict[str, Any] = {"device": str(device), "cuda_available": torch.cuda.is_available(),
                            "torch_cuda": torch.version.cuda, "faiss": faiss.__version__,
                            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, device_memory_gib=props.total_memory / (1 << 30),
                    device_note="CUDA")
    else:
        info.update(device_name="cpu", device_note="CUDA not available: every device figure is the CPU"
                    if not torch.cuda.is_available() else "the CPU was asked for (--device cpu)")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer chunks, rows and rounds")
    mode.add_argument("--smoke", action="store_true", help="a tiny run that exercises everything (tests)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--sections", default=",".join(ALL_SECTIONS), help="from: " + ",".join(ALL_SECTIONS))
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--n", type=int, default=None,
                        help=f"rows of the scan section (default: the preset's on CUDA, {CPU_SCAN_ROWS:,} on a CPU)")
    parser.add_argument("--dir", default=None, help="where temporary files go (default: system temp dir)")
    args = parser.parse_args(argv)

    preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    settings = PRESETS[preset]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(ALL_SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {','.join(ALL_SECTIONS)}")

    import faiss
    import torch

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        parser.error(f"--device {args.device!r}: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda, cuda:N or cpu, not {args.device!r}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # loads come back on "cuda:N"
    torch.zeros(1, device=device).cpu()  # start CUDA before any clock does
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    scan_rows = args.n or (settings.scan_rows if device.type == "cuda" else min(settings.scan_rows, CPU_SCAN_ROWS))

    started = time.perf_counter()
    notes: list[str] = []
    budget = Budget(settings.budget_seconds, notes)
    meta = bench_meta(bench="gpu", preset=preset, sections=sections, chunk_tokens=CHUNK_TOKENS,
                      layouts={n: LAYOUTS[n].__dict__ for n in settings.layouts}, kv_tiers=KV_TIERS,
                      scan_rows=scan_rows, settings=settings.__dict__, **device_info(device))
    report: dict[str, Any] = {}
    section_s: dict[str, float] = {}

    def finish_section(name: str, mark: float) -> None:
        section_s[name] = time.perf_counter() - mark
        meta.update(seconds=time.perf_counter() - started, section_seconds=section_s, notes=notes,
                    peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    peak_device_mib=torch.cuda.max_memory_allocated(device) / (1 << 20)
                    if device.type == "cuda" else None)
        if args.json:
            write_report(args.json, meta, **report)

    workdir = tempfile.mkdtemp(prefix="gpu-bench-", dir=args.dir)
    try:
        if "kv" in sections:
            mark = time.perf_counter()
            log(f"kv: chunk loads to {device}")
            report["kv"], report["kv_baselines"] = run_kv(device, settings, workdir, budget)
            finish_section("kv", mark)
        if "scan" in sections:
            mark = time.perf_counter()
            log(f"scan: {scan_rows:,} vectors, faiss CPU vs torch on {device}")
            report["scan"], report["scan_info"] = run_scan(device, scan_rows, settings, workdir, budget)
            finish_section("scan", mark)
        if "tier" in sections:
            mark = time.perf_counter()
            log("tier: bench/tiers.py, memory and gpu tiers")
            if not budget.spent("the tier section"):
                report["tier"] = run_tier(settings, workdir, preset != "full")
            finish_section("tier", mark)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"GPU benchmark ({preset}) on {meta['device']} ({meta['device_name']}; {meta['device_note']}); "
          f"torch {meta['torch']}, CUDA {meta['torch_cuda']}; {meta.get('seconds', 0):.0f} s")
    if report.get("kv"):
        print(f"\n1. kv: one {CHUNK_TOKENS}-token chunk per load to {device}; GB/s of decoded KV; "
              "vs h2d = h2d ms / load ms; vs raw = raw load ms / load ms")
        print(kv_table(report["kv"]))
    if report.get("scan"):
        info = report["scan_info"]
        print(f"\n2. scan: {info['rows']:,} x {info['dim']} cosine, sq8, {info['lists']} lists, "
              f"{info['queries']} queries (build {info['build_s']:.1f} s, faiss threads {info['faiss_threads']}); "
              "recall@10 vs exact IndexFlatIP")
        print(scan_table(report["scan"]))
    if report.get("tier"):
        print("\n3. tier: bench/tiers.py memory and gpu tiers; ratio = tier MB/s / raw MB/s")
        print(tier_table(report["tier"]))
    for note in notes:
        print("note: " + note)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
