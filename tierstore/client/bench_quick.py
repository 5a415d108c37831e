"""``tierstore bench``: a one-minute search benchmark with its faiss baseline in the same run.

Clustered Gaussian vectors (so IVF has structure to find), one query per call on one
thread, recall@k against exact search. The full, dataset-driven benchmarks live in
``bench/`` of the source tree; this one needs nothing but the package.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

from ..errors import InvalidArgument

__all__ = ["run_quick_bench", "clustered_vectors"]


def clustered_vectors(n: int, dim: int, *, clusters: int = 64, seed: int = 0) -> np.ndarray:
    """``n`` float32 vectors around ``clusters`` random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32) * 2.0
    return (centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim)).astype(np.float32))


def _timed(search, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    times = np.empty(len(xq))
    ids = []
    for i, q in enumerate(xq):
        started = time.perf_counter()
        ids.append(search(q))
        times[i] = time.perf_counter() - started
    return np.stack(ids), times


def _row(system: str, ids: np.ndarray, truth: np.ndarray, times: np.ndarray, k: int) -> dict:
    hits = sum(len(np.intersect1d(a[:k], b[:k])) for a, b in zip(ids, truth))
    return {"system": system, "recall@10": round(hits / truth[:, :k].size, 4),
            "qps": round(len(times) / times.sum(), 1), "p50_us": round(float(np.median(times)) * 1e6, 1),
            "p99_us": round(float(np.quantile(times, 0.99)) * 1e6, 1)}


def run_quick_bench(*, n: int = 20_000, dim: int = 64, queries: int = 500, k: int = 10, nprobe: int = 16,
                    seed: int = 0) -> dict:
    """Build, search and compare; returns a JSON-ready report."""
    import faiss

    from .database import connect

    for label, value, low in (("n", n, 1000), ("dim", dim, 2), ("queries", queries, 1), ("k", k, 1),
                              ("nprobe", nprobe, 1)):
        if value < low:
            raise InvalidArgument(f"--{label} must be >= {low}, got {value}")
    x = clustered_vectors(n + queries, dim, seed=seed)
    xb, xq = x[:n], x[n:]
    flat = faiss.IndexFlatL2(dim)
    flat.add(xb)
    _, truth = flat.search(xq, k)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="tierstore-bench-") as tmp, connect(tmp) as db:
            col = db.create_collection("bench", dim=dim, metric="l2")
            col.add(ids=np.arange(n), vectors=xb)
            started = time.perf_counter()
            built = col.build_index()
            build_s = time.perf_counter() - started
            nlist = int(built.get("lists", col.stats()["index"]["lists"]))
            col.search(xq[:8], k=k, nprobe=nprobe)  # warm
            ours, our_times = _timed(lambda q: col.search(q, k=k, nprobe=nprobe).ids[0], xq)
            coarse = faiss.IndexFlatL2(dim)
            ivf = faiss.IndexIVFFlat(coarse, dim, nlist)
            ivf.train(xb)
            ivf.add(xb)
            ivf.nprobe = nprobe
            theirs, their_times = _timed(lambda q: ivf.search(q[None, :], k)[1][0], xq)
            _, flat_times = _timed(lambda q: flat.search(q[None, :], k)[1][0], xq[: min(queries, 200)])
    finally:
        faiss.omp_set_num_threads(threads)
    systems = [_row(f"tierstore ({col_quantizer(built)}, nprobe {nprobe})", ours, truth, our_times, k),
               _row(f"faiss IVF-Flat ({nlist} lists, nprobe {nprobe})", theirs, truth, their_times, k),
               _row("faiss Flat (exact)", truth[: len(flat_times)], truth, flat_times, k)]
    return {"n": n, "dim": dim, "queries": queries, "k": k, "nprobe": nprobe, "lists": nlist,
            "build_seconds": round(build_s, 2), "systems": systems,
            "qps_ratio_vs_ivf_flat": round(systems[0]["qps"] / systems[1]["qps"], 3)}


def col_quantizer(built: dict) -> str:
    """The code format a build used, from its statistics."""
    return str(built.get("quantizer", "codes"))
