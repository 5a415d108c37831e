"""Serverless fan-out search: latency, throughput, invocations and cost of the worker tree.

    python bench/faas.py [--quick] [--json PATH] [--n N] [--memory-mb MB]

A slice of the manpages MiniLM embeddings (384-d, cosine; synthetic clustered vectors
when absent) is stored in S3 (moto's server on loopback, real HTTP) and searched by
:class:`~tierstore.serverless.FanoutExecutor` over :class:`ProcessInvoker` workers (real
processes behaving like Lambda containers) for partitions P in (8, 32, 128) and
branching b in (2, 4, 8):

* **cold**: the first query on a fresh pool (every container starts and reads S3);
* **warm**: single queries one after another (p50/p99), then ``--threads`` concurrent
  clients (throughput); every result is checked against ``col.search`` (identical ids);
* a second pass injects Lambda-like overheads: 15 ms per invocation, 300 ms per cold
  start, 60 ms per round of S3 GETs.

Also: the single-node ``col.search`` baseline measured in the same run, the added latency
per tree level (round trip minus the child's own handler time, per invocation: one per
level on the critical path; target <= 5 ms without injected overheads), counts of cold
and warm invocations and S3 GETs, and a cost model per 1,000 queries: Lambda GB-seconds
(every node is billed for its whole handler time, waiting on children included) plus
requests at list prices, against one always-on server.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

import faiss  # noqa: E402

import tierstore  # noqa: E402
from _common import bench_meta, format_table, write_report  # noqa: E402
from tierstore.serverless import FanoutExecutor, ProcessInvoker, WorkerConfig  # noqa: E402
from tierstore.testing import MotoServer  # noqa: E402

SHARED = os.path.join(_HERE, "..", "..", "shared", "data", "manpages-minilm")
# AWS list prices (us-east-1, x86): Lambda per GB-second and per request; an always-on
# m7i.xlarge (4 vCPU, 16 GiB) on demand per hour.
LAMBDA_GB_S = 0.0000166667
LAMBDA_REQUEST = 0.20 / 1e6
SERVER_HOUR = 0.2016
LAMBDA_LIKE = {"invoke_overhead": 0.015, "cold_start": 0.300, "s3_get_delay": 0.060}


def load_vectors(n: int, queries: int) -> tuple[np.ndarray, np.ndarray, str]:
    if os.path.exists(os.path.join(SHARED, "base.npy")):
        xb = np.load(os.path.join(SHARED, "base.npy"), mmap_mode="r")[:n].astype(np.float32)
        xq = np.load(os.path.join(SHARED, "queries.npy"))[:queries].astype(np.float32)
        return xb, xq, "manpages-minilm"
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((256, 64)).astype(np.float32) * 4
    xb = centres[rng.integers(0, 256, n)] + rng.standard_normal((n, 64)).astype(np.float32)
    xq = centres[rng.integers(0, 256, queries)] + rng.standard_normal((queries, 64)).astype(np.float32)
    return xb.astype(np.float32), xq.astype(np.float32), "synthetic-clustered-64d"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def lambda_cost(searches: list[dict], memory_mb: int) -> float:
    """USD per query: billed ms (each node's handler time, rounded up) x memory, plus requests."""
    gb = memory_mb / 1024
    total = sum(s["billed_ms"] / 1e3 * gb * LAMBDA_GB_S + s["invocations"] * LAMBDA_REQUEST for s in searches)
    return total / max(len(searches), 1)


def run_config(col, xq: np.ndarray, config: WorkerConfig, partitions: int, branching: int, *, warm_queries: int,
               threads: int, k: int, overheads: dict, memory_mb: int) -> dict:
    pool = ProcessInvoker(config, invoke_overhead=overheads.get("invoke_overhead", 0.0),
                          cold_start=overheads.get("cold_start", 0.0))
    executor = FanoutExecutor(pool, partitions=partitions, branching=branching)
    identical, fallbacks, searches = 0, 0, []
    try:
        t0 = time.perf_counter()
        cold = col.search(xq[0], k, executor=executor)
        cold_ms = (time.perf_counter() - t0) * 1e3
        cold_info = cold.stats["serverless"]
        # warm each query's partitions once more so that the timed pass measures warm containers
        for q in xq[1:warm_queries + 1]:
            col.search(q, k, executor=executor)
        latencies, overhead = [], []
        for q in xq[1:warm_queries + 1]:
            t0 = time.perf_counter()
            res = col.search(q, k, executor=executor)
            latencies.append((time.perf_counter() - t0) * 1e3)
            info = res.stats["serverless"]
            searches.append(info)
            for level in info["levels"]:
                overhead.append(level["mean_invoke_overhead_ms"])
            identical += int(np.array_equal(res.ids, col.search(q, k).ids))
            fallbacks += info["tie_fallbacks"]
        count = len(latencies)
        done = [0]

        def client(rows: np.ndarray) -> None:
            for q in rows:
                col.search(q, k, executor=executor)
                done[0] += 1

        chunks = np.array_split(xq[1:warm_queries + 1], threads)
        workers = [threading.Thread(target=client, args=(chunk,)) for chunk in chunks]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        qps = done[0] / (time.perf_counter() - t0)
        processes = pool.processes
    finally:
        pool.close()
    shape = executor.shape(executor.plan(col))
    cost = lambda_cost(searches, memory_mb)
    return {"partitions": partitions, "branching": branching, "depth": shape.depth,
            "cold_ms": cold_ms, "cold_invocations": cold_info["cold"], "cold_s3_gets": cold_info["s3_gets"],
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99), "qps": qps,
            "invocations_per_query": float(np.mean([s["invocations"] for s in searches])),
            "warm_invocations_per_query": float(np.mean([s["warm"] for s in searches])),
            "warm_s3_gets": int(sum(s["s3_gets"] for s in searches)),
            "level_overhead_ms": percentile(overhead, 50), "processes": processes,
            "identical": identical / max(count, 1), "tie_fallbacks": int(fallbacks),
            "lambda_usd_per_1k": 1000 * cost}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer vectors, queries and overhead configs")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--n", type=int, default=None, help="vectors (default 50,000; 20,000 with --quick)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=4, help="concurrent clients for throughput")
    parser.add_argument("--memory-mb", type=int, default=1024, help="Lambda memory size for the cost model")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    faiss.omp_set_num_threads(1)
    n = args.n or (20_000 if args.quick else 50_000)
    warm_queries = 24 if args.quick else 200
    xb, xq, dataset = load_vectors(n, warm_queries + 1)
    configs = [(p, b) for p in (8, 32, 128) for b in (2, 4, 8)]
    overhead_configs = [(p, 4) for p in (8, 32, 128)] if args.quick else configs

    with MotoServer() as server:
        server.client().create_bucket(Bucket="tierstore-bench")
        db = tierstore.connect("s3://tierstore-bench/faas", endpoint_url=server.endpoint_url)
        col = db.create_collection("docs", dim=xb.shape[1], metric="cosine")
        col.add(ids=np.arange(n), vectors=xb)
        t0 = time.perf_counter()
        col.build_index(target_list_size=max(32, n // 400))  # enough lists for 128 partitions
        build_s = time.perf_counter() - t0
        lists = col.index.nlist
        config = WorkerConfig(bucket="tierstore-bench", prefix="faas", endpoint_url=server.endpoint_url)
        # the single-node baseline, same collection, same parameters, same run
        base = []
        for q in xq[1:warm_queries + 1]:
            t0 = time.perf_counter()
            col.search(q, args.k)
            base.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        for q in xq[1:warm_queries + 1]:
            col.search(q, args.k)
        base_qps = warm_queries / (time.perf_counter() - t0)
        baseline = {"p50_ms": percentile(base, 50), "p99_ms": percentile(base, 99), "qps": base_qps,
                    "server_usd_per_1k_at_saturation": 1000 * SERVER_HOUR / 3600 / base_qps,
                    "server_usd_per_1k_at_1_qps": 1000 * SERVER_HOUR / 3600}
        rows = []
        for partitions, branching in configs:
            rows.append({"pass": "plain", **run_config(col, xq, config, partitions, branching,
                                                      warm_queries=warm_queries, threads=args.threads, k=args.k,
                                                      overheads={}, memory_mb=args.memory_mb)})
        slow_config = WorkerConfig(bucket="tierstore-bench", prefix="faas", endpoint_url=server.endpoint_url,
                                   s3_get_delay=LAMBDA_LIKE["s3_get_delay"])
        for partitions, branching in overhead_configs:
            rows.append({"pass": "lambda-like", **run_config(col, xq, slow_config, partitions, branching,
                                                            warm_queries=max(8, warm_queries // 3),
                                                            threads=args.threads, k=args.k,
                                                            overheads=LAMBDA_LIKE, memory_mb=args.memory_mb)})
        db.close()

    plain = [r for r in rows if r["pass"] == "plain"]
    summary = {"dataset": dataset, "n": n, "dim": int(xb.shape[1]), "lists": lists, "build_s": build_s,
               "k": args.k, "baseline": baseline,
               "max_level_overhead_ms": max(r["level_overhead_ms"] for r in plain),
               "all_identical": all(r["identical"] == 1.0 for r in rows)}
    print(f"serverless fan-out on {dataset}: {n:,} x {xb.shape[1]} (cosine, pq4fs, {lists} lists), k={args.k}, "
          f"single queries; S3 = moto on loopback; ProcessInvoker")
    print(f"single-node col.search baseline: p50 {baseline['p50_ms']:.2f} ms, p99 {baseline['p99_ms']:.2f} ms, "
          f"{base_qps:.0f} QPS (one thread)")
    print(format_table(rows, [("pass", "pass", "s"), ("partitions", "P", "d"), ("branching", "b", "d"),
                              ("depth", "depth", "d"), ("cold_ms", "cold ms", ".0f"),
                              ("cold_invocations", "cold inv", "d"), ("cold_s3_gets", "cold GETs", "d"),
                              ("p50_ms", "warm p50 ms", ".1f"), ("p99_ms", "warm p99 ms", ".1f"),
                              ("qps", "QPS", ".0f"), ("invocations_per_query", "inv/query", ".1f"),
                              ("warm_s3_gets", "warm GETs", "d"), ("level_overhead_ms", "ms/level", ".2f"),
                              ("identical", "identical", ".3f"), ("lambda_usd_per_1k", "Lambda $/1k q", ".2e")]))
    print(f"always-on server (m7i.xlarge ${SERVER_HOUR}/h): ${baseline['server_usd_per_1k_at_saturation']:.2e} "
          f"per 1k queries at its measured saturation, ${baseline['server_usd_per_1k_at_1_qps']:.4f} per 1k at "
          f"1 query/s; Lambda at {args.memory_mb} MB, ${LAMBDA_GB_S}/GB-s + $0.20/1M requests")
    print(f"added latency per tree level (median round trip minus handler, no injected overheads): max "
          f"{summary['max_level_overhead_ms']:.2f} ms over configs (target <= 5 ms); identical ids to col.search: "
          f"{summary['all_identical']}")
    if args.json:
        write_report(args.json, bench_meta(bench="faas", quick=args.quick), summary=summary, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
