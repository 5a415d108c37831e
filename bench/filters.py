"""Filtered search: recall@10 against the exact filtered top-10, and QPS, by selectivity.

    python bench/filters.py [--quick] [--json PATH] [--queries N] [--rows N]

On manpages-minilm (50,000 MiniLM vectors of man-page paragraphs, cosine), with the real
``section`` and ``page`` attributes of ``base_meta.jsonl.gz`` and a synthetic ``bucket``
(a deterministic hash of the row id into 0..999) for exact selectivities. Filters near
50%, 10%, 1% and 0.1%, each evaluated for every query:

* **tierstore**: ``col.search(q, k=10, filter=...)`` (planner: exact scan or filtered IVF
  with widening probes), at its default ``nprobe`` and at twice that;
* **faiss-ivf-selector**: a faiss IVF-Flat (same ``nlist`` as tierstore's lists) searched
  with an ``IDSelectorBitmap`` of the matching rows (``SearchParametersIVF``), two nprobes;
* **faiss-ivf-postfilter**: the same index searched unfiltered for ``k / selectivity``
  (capped at 1,000) candidates, then the matching ones kept.

Recall@10 counts the exact filtered neighbours found out of ``min(10, matches)``;
``full`` is the share of queries that got ``min(10, matches)`` results. QPS is one query
per call, one thread. Each filter is timed over ``--rounds`` rounds (default 3), the
systems and tierstore's unfiltered search interleaved in chunks of 50 queries (so a
drifting machine load hits all of them alike): QPS is the median over rounds, the latency
ratio against unfiltered the median over rounds x chunks of the paired chunk times.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread: faiss's OpenMP spins against other work

import faiss  # noqa: E402

from _common import bench_meta, format_table, write_report  # noqa: E402
from datasets import load_manpages  # noqa: E402

K = 10


def bucket_of(ids: np.ndarray) -> np.ndarray:
    """A deterministic pseudo-random 0..999 per id (splitmix64), for exact selectivities."""
    z = (ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((z ^ (z >> np.uint64(31))) % np.uint64(1000)).astype(np.int64)


def load_meta(shared: str) -> list[dict[str, Any]]:
    path = os.path.join(shared, "data", "manpages-minilm", "base_meta.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def choose_filters(meta: list[dict], buckets: np.ndarray) -> list[tuple[str, dict, np.ndarray]]:
    """(label, filter, mask) near 50/10/1/0.1% from real attributes, plus synthetic buckets."""
    n = len(meta)
    sections = np.array([m["section"] for m in meta])
    pages = np.array([m["page"] for m in meta])
    out = []
    for target in (0.5, 0.1, 0.01, 0.001):
        out.append((f"bucket<{int(target * 1000)}", {"bucket": {"$lt": int(target * 1000)}}, buckets < target * 1000))
    values, counts = np.unique(sections, return_counts=True)
    for target in (0.1, 0.01):
        best = values[np.argmin(np.abs(counts / n - target))]
        out.append((f"section={best}", {"section": str(best)}, sections == best))
    by_page, page_counts = np.unique(pages, return_counts=True)
    chosen = list(by_page[np.argsort(-page_counts)[:5]])  # a few pages: ~0.1-0.5%
    out.append(("page in 5 largest", {"page": {"$in": [str(p) for p in chosen]}}, np.isin(pages, chosen)))
    out.append(("section 1 or bucket<100", {"$or": [{"section": "1"}, {"bucket": {"$lt": 100}}]},
                (sections == "1") | (buckets < 100)))
    return out


def exact_topk(x: np.ndarray, xq: np.ndarray, mask: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(mask)
    out = np.full((xq.shape[0], K), -1, np.int64)
    if not rows.size:
        return out
    sims = xq @ x[rows].T
    take = min(K, rows.size)
    best = np.argsort(-sims, axis=1, kind="stable")[:, :take]
    out[:, :take] = rows[best]
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    hits, full = [], []
    for f, t in zip(found, truth):
        want = t[t >= 0]
        got = f[f >= 0]
        hits.append(len(set(got.tolist()) & set(want.tolist())) / max(want.size, 1) if want.size else 1.0)
        full.append(got.size >= want.size)
    return float(np.mean(hits)), float(np.mean(full))


def timed_interleaved(systems: dict, queries: np.ndarray, rounds: int, chunk: int = 50):
    """Time every system one query per call, interleaved in chunks of ``chunk`` queries.

    Each round runs, chunk after chunk, every system over that chunk (the order reversed
    every round), so a system and the first one (the baseline) are timed milliseconds
    apart: the machine's drifting load hits both. Returns the last round's results, the
    QPS of each system (median over rounds), its latency ratio to the baseline (median
    over rounds x chunks of the chunk-time ratios), and the baseline's QPS.
    """
    names = list(systems)
    starts = list(range(0, len(queries), chunk))
    seconds = {name: np.zeros((max(1, rounds), len(starts))) for name in names}
    found = {name: [None] * len(queries) for name in names}
    for fn in systems.values():
        fn(queries[0])
    clock = time.perf_counter
    for r in range(max(1, rounds)):
        for c, first in enumerate(starts):
            part = queries[first:first + chunk]
            for name in (names if r % 2 == 0 else names[::-1]):
                fn, out = systems[name], found[name]
                begin = clock()
                for i, q in enumerate(part):
                    out[first + i] = fn(q)
                seconds[name][r, c] = clock() - begin
    qps = {name: float(len(queries) / np.median(seconds[name].sum(axis=1))) for name in names}
    base = names[0]
    ratios = {name: float(np.median(seconds[name] / seconds[base])) for name in names}
    return {name: np.stack(out) for name, out in found.items()}, qps, ratios, qps[base]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 queries instead of 1,000")
    parser.add_argument("--queries", type=int, help="number of queries")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds per filter (medians kept)")
    parser.add_argument("--rows", type=int, help="use only the first ROWS vectors (a smoke run; default all)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--shared", default=os.environ.get("TIERSTORE_SHARED") or
                        os.path.join(os.path.dirname(_HERE), "..", "shared"))
    args = parser.parse_args(argv)
    import tierstore

    faiss.omp_set_num_threads(1)
    data = load_manpages(os.path.join(args.shared, "data"))
    x, xq = data.base[:args.rows] if args.rows else data.base, data.queries[: args.queries or (200 if args.quick else 1000)]
    meta = load_meta(args.shared)[:x.shape[0]]
    ids = np.arange(x.shape[0])
    buckets = bucket_of(ids)
    attrs = [{"section": m["section"], "page": m["page"], "bucket": int(b)} for m, b in zip(meta, buckets)]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        db = tierstore.connect(tmp)
        col = db.create_collection("man", dim=x.shape[1], metric="cosine",
                                   attributes={"section": "keyword", "page": "keyword", "bucket": "int"})
        col.add(ids, x, attrs)
        build = col.build_index()
        nlist = build["lists"]
        quantizer = faiss.IndexFlatIP(x.shape[1])
        ivf = faiss.IndexIVFFlat(quantizer, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(x)
        ivf.add(x)
        rows: list[dict[str, Any]] = []
        base_per_filter: list[float] = []  # unfiltered QPS, measured beside each filter's passes
        for label, spec, mask in choose_filters(meta, buckets):
            truth = exact_topk(x, xq, mask)
            selectivity = float(mask.mean())
            systems = {}
            for nprobe in (16, 32):
                systems[f"tierstore nprobe={nprobe}"] = lambda q, p=nprobe: col.search(q, k=K, filter=spec,
                                                                                       nprobe=p).ids[0]
            bitmap = np.packbits(mask, bitorder="little")
            selector = faiss.IDSelectorBitmap(mask.size, faiss.swig_ptr(bitmap))
            for nprobe in (16, 64):
                params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
                systems[f"faiss-ivf-selector nprobe={nprobe}"] = \
                    lambda q, p=params: ivf.search(q[None], K, params=p)[1][0]
            wide = int(min(1000, np.ceil(K / max(selectivity, 1e-9))))
            post_params = faiss.SearchParametersIVF(nprobe=32)

            def post_filter(q, wide=wide, mask=mask, params=post_params):
                found = ivf.search(q[None], wide, params=params)[1][0]
                found = found[found >= 0]
                kept = found[mask[found]][:K]
                return np.pad(kept, (0, K - kept.size), constant_values=-1)

            systems[f"faiss-ivf-postfilter nprobe=32 k'={wide}"] = post_filter
            plan = col.search(xq[0], k=K, filter=spec).stats["plan"]
            unfiltered = lambda q: col.search(q, k=K).ids[0]  # noqa: E731
            found, qps, ratios, base = timed_interleaved({"unfiltered": unfiltered, **systems}, xq, args.rounds)
            base_per_filter.append(base)
            for name in systems:
                r, full = recall(found[name], truth)
                rows.append({"filter": label, "selectivity": selectivity, "matches": int(mask.sum()), "system": name,
                             "plan": plan if name.startswith("tierstore") else None, "recall": r, "full": full,
                             "qps": qps[name], "latency_vs_unfiltered": ratios[name]})
            print(f"  {label}: {selectivity:.4f}", flush=True)
        db.close()
    base_qps = float(np.median(base_per_filter))
    print(f"\nfiltered search on manpages ({len(xq)} queries, one query per call, one thread, {args.rounds} "
          f"rounds interleaved in chunks; unfiltered tierstore {base_qps:,.0f} QPS (median over the filters' "
          f"runs); {time.perf_counter() - started:.0f} s)")
    print(format_table(rows, [("filter", "filter", ""), ("selectivity", "sel.", ".4f"), ("matches", "matches", ","),
                              ("system", "system", ""), ("plan", "plan", ""), ("recall", "recall@10", ".3f"),
                              ("full", "full", ".3f"), ("qps", "QPS", ",.0f"),
                              ("latency_vs_unfiltered", "lat. x unfilt.", ".2f")]))
    if args.json:
        write_report(args.json, bench_meta(benchmark="filters", queries=len(xq), unfiltered_qps=base_qps,
                                           unfiltered_qps_per_filter=base_per_filter, rounds=args.rounds,
                                           nlist=nlist), results=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
