"""Updates without a rebuild: recall after inserting and deleting 10%, against a fresh build.

    python bench/updates.py [--dataset manpages|synthetic-100k] [--quick] [--json PATH]

The index is built on 90% of the base vectors. The other 10% are then inserted in
batches, each batch searched at once (a new vector must be its own nearest neighbour:
"found immediately"), and 10% of the original vectors are deleted, all through the WAL
and the exact delta; checkpoints fold them into the lists (SPFresh LIRE: splits, merges,
local reassignment). The updated index is compared with a fresh build over the same
final vectors at the same parameters (same seed), by recall@10 against exact ground
truth computed here by faiss over the live vectors, at several ``nprobe``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

import faiss  # noqa: E402

import tierstore  # noqa: E402
from _common import bench_meta, format_table, write_report  # noqa: E402
from datasets import load_dataset, recall_at_k  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="manpages")
    parser.add_argument("--quick", action="store_true", help="fewer queries and nprobe values")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--quantizer", default="pq4fs")
    parser.add_argument("--batch", type=int, default=500, help="vectors per insert batch")
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(1)

    ds = load_dataset(args.dataset)
    xb, xq = ds.base, ds.queries[: (500 if args.quick else 2000)]
    metric = "ip" if ds.metric == "ip" else "l2"
    n = xb.shape[0]
    keep = int(n * 0.9)
    rng = np.random.default_rng(0)
    doomed = np.sort(rng.choice(keep, n - keep, replace=False))
    params = {"quantizer": args.quantizer}
    nprobes = (16, 24) if args.quick else (8, 16, 24, 32)

    with tempfile.TemporaryDirectory() as tmp:
        db = tierstore.connect(os.path.join(tmp, "updated"), flush_rows=5 * args.batch)
        col = db.create_collection("c", dim=xb.shape[1], metric=metric)
        col.add(np.arange(keep), xb[:keep])
        started = time.perf_counter()
        col.build_index(**params)
        build_s = time.perf_counter() - started
        found, insert_s = [], 0.0
        deletes_per_batch = -(-doomed.size // -(-(n - keep) // args.batch))
        for i, start in enumerate(range(keep, n, args.batch)):
            ids = np.arange(start, min(start + args.batch, n))
            t0 = time.perf_counter()
            col.add(ids, xb[ids])
            insert_s += time.perf_counter() - t0
            found.append(float((col.search(xb[ids], k=1).ids[:, 0] == ids).mean()))
            col.delete(doomed[i * deletes_per_batch:(i + 1) * deletes_per_batch])
        t0 = time.perf_counter()
        col.flush()
        final_flush_s = time.perf_counter() - t0
        live = np.setdiff1d(np.arange(n), doomed)
        assert col.count() == live.size
        exact = faiss.IndexFlatL2(xb.shape[1]) if metric == "l2" else faiss.IndexFlatIP(xb.shape[1])
        exact.add(xb[live])
        truth = live[exact.search(xq, 10)[1]]

        fresh_db = tierstore.connect(os.path.join(tmp, "fresh"))
        fresh = fresh_db.create_collection("c", dim=xb.shape[1], metric=metric)
        fresh.add(live, xb[live])
        fresh.build_index(**params)
        rows = []
        for nprobe in nprobes:
            updated = recall_at_k(col.search(xq, 10, nprobe=nprobe).ids, truth)
            rebuilt = recall_at_k(fresh.search(xq, 10, nprobe=nprobe).ids, truth)
            rows.append({"nprobe": nprobe, "updated": updated, "fresh": rebuilt, "gap": rebuilt - updated})
        stats_updated, stats_fresh = col.stats(), fresh.stats()
        db.close()
        fresh_db.close()

    summary = {"dataset": args.dataset, "n": n, "inserted": n - keep, "deleted": int(doomed.size),
               "build_s": build_s, "insert_s_per_vector": insert_s / (n - keep),
               "found_immediately": float(np.mean(found)), "final_flush_s": final_flush_s,
               "lists_updated": stats_updated["index"]["lists"], "lists_fresh": stats_fresh["index"]["lists"],
               "max_gap": max(r["gap"] for r in rows)}
    print(f"updates on {args.dataset}: built on {keep:,}, inserted {n - keep:,} in batches of {args.batch}, "
          f"deleted {doomed.size:,}; quantizer {args.quantizer}")
    print(format_table(rows, [("nprobe", "nprobe", "d"), ("updated", "recall updated", ".4f"),
                              ("fresh", "recall fresh build", ".4f"), ("gap", "gap", "+.4f")]))
    print(f"new vectors found at once: {summary['found_immediately']:.4f}; lists {summary['lists_updated']} "
          f"(fresh {summary['lists_fresh']}); insert {summary['insert_s_per_vector'] * 1e6:.0f} us/vector; "
          f"final checkpoint {final_flush_s:.2f} s; max gap {summary['max_gap']:+.4f} (target <= 0.01)")
    if args.json:
        write_report(args.json, bench_meta(bench="updates", quick=args.quick), summary=summary, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
