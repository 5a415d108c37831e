"""Multi-tenant search: memory, and per-tenant recall@10 and QPS against one index per tenant.

    python bench/tenants.py [--quick] [--json PATH] [--queries N] [--tenants N] [--rows N]

On manpages-minilm (50,000 MiniLM vectors of man-page paragraphs, cosine). Pages are
grouped into ``--tenants`` tenants (default 1,000) of Zipf sizes: each page draws a tenant
rank with probability ~ 1/rank (every tenant first gets one page of its own), so one tenant
holds thousands of vectors and most hold a few. 5% of the vectors are also shared with a
second tenant (``col.grant``, drawn by the same weights). Size buckets: small (< 100 rows),
medium (100-999), large (>= 1,000; tierstore's filtered IVF plan starts above 1,024), and
apart the large tenants of 2,000 rows or more (the dedicated index is an IVF there too).

Systems, timed one query per call, one thread: each system makes a pass over the queries,
the passes interleaved over ``--rounds`` rounds (order reversed every round), and each
query's median latency is kept:

* **tierstore**: one collection with tenants, ``col.tenant(name).search(q, k=10)`` (a tenant
  of up to 2,560 rows is scanned exactly; a larger one searches its own small IVF, built on
  its second search within the tenant index's memory budget, or else the shared lists by
  the widened filtered IVF), at its default ``nprobe`` (16) and at 32;
* **dedicated**: one faiss index per tenant, built here: ``IndexFlatIP`` below 2,000
  vectors, else IVF-PQ fast-scan with the same codes as tierstore's lists (``d/2`` x
  4-bit PQ on residuals, ``nlist = sqrt(n)``) plus exact rerank of ``8k`` candidates
  (``IndexRefineFlat``, as tierstore reranks), at several ``nprobe``.

Recall@10 is against the exact top-10 among the tenant's own vectors (owned and granted);
queries are the dataset's, each assigned to a size bucket in turn and, within it, to a
tenant with probability ~ its size. The latency ratio compares tierstore (default
``nprobe``) with the fastest dedicated setting whose recall is at least as high (within
0.005). Memory: tierstore's tenant index (``tenant_stats()["tenant_index_bytes"]``, every
tenant's row set warm) plus its shared index, against the same vectors in a collection
without tenants and against the per-tenant indexes (``faiss.serialize_index``). Raw
vectors are held by every design (tierstore for exact scans and reranking, the dedicated
flat indexes as their data, the refine stage of the dedicated IVFs) and are listed apart.
Offload: every tenant offloaded (large tenants' IVFs wait in the durable tier), then the
first search of each tenant with an IVF timed (read back from the tier) against training
its IVF again.
"""

from __future__ import annotations

import argparse
import gc
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

from _common import bench_meta, format_table, median, write_report  # noqa: E402
from datasets import load_manpages  # noqa: E402

K = 10
SHARED_FRACTION = 0.05
FLAT_BELOW = 2_000   # dedicated: exact flat index below this many vectors, IVF from it
BUCKETS = (("small", 0, 100), ("medium", 100, 1_000), ("large", 1_000, None))
# Reported besides: the large tenants whose dedicated index is an IVF too (approximate on both sides).
GROUPS = (*BUCKETS, (f"large>={FLAT_BELOW:,}", FLAT_BELOW, None))
TIERSTORE_NPROBES = (16, 32)
DEDICATED_NPROBES = (1, 2, 4, 8, 16)
REFINE = 8  # dedicated IVF reranks 8k candidates exactly (tierstore's filtered plan reranks >= 8k)


def load_pages(shared: str) -> np.ndarray:
    path = os.path.join(shared, "data", "manpages-minilm", "base_meta.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return np.array([json.loads(line)["page"] for line in f])


def zipf_weights(n: int) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1)
    return weights / weights.sum()


def assign_tenants(pages: np.ndarray, n_tenants: int, rng: np.random.Generator) -> np.ndarray:
    """The owning tenant of each row: pages (sorted) draw a Zipf rank; every tenant gets one page first."""
    names, page_of_row = np.unique(pages, return_inverse=True)
    if names.size < n_tenants:
        raise SystemExit(f"{n_tenants} tenants need at least as many pages; the data has {names.size}")
    order = rng.permutation(names.size)
    tenant_of_page = np.empty(names.size, np.int64)
    tenant_of_page[order[:n_tenants]] = np.arange(n_tenants)
    tenant_of_page[order[n_tenants:]] = rng.choice(n_tenants, names.size - n_tenants, p=zipf_weights(n_tenants))
    return tenant_of_page[page_of_row]


def share_rows(owner: np.ndarray, n_tenants: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, second_tenant)``: ~5% of the rows, each granted to a tenant other than its owner."""
    rows = np.sort(rng.choice(owner.size, int(owner.size * SHARED_FRACTION), replace=False))
    second = rng.choice(n_tenants, rows.size, p=zipf_weights(n_tenants))
    clash = second == owner[rows]
    second[clash] = (second[clash] + 1 + rng.integers(0, n_tenants - 1, int(clash.sum()))) % n_tenants
    return rows, second


def bucket_of(size: int) -> str:
    for name, low, high in BUCKETS:
        if size >= low and (high is None or size < high):
            return name
    raise AssertionError(size)


def assign_queries(nq: int, sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A tenant per query: buckets in turn, within a bucket a tenant with probability ~ its size."""
    labels = np.array([bucket_of(int(s)) for s in sizes])
    out = np.empty(nq, np.int64)
    for i in range(nq):
        name = BUCKETS[i % len(BUCKETS)][0]
        members = np.flatnonzero(labels == name)
        out[i] = rng.choice(members, p=sizes[members] / sizes[members].sum())
    return out


def exact_topk(x: np.ndarray, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    sims = x[rows] @ q
    take = min(K, rows.size)
    return rows[np.argsort(-sims, kind="stable")[:take]]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return len(set(found[found >= 0].tolist()) & set(truth.tolist())) / max(truth.size, 1)


class Dedicated:
    """One tenant's own faiss index: flat below ``FLAT_BELOW`` vectors, else IVF-PQ fast-scan + refine."""

    def __init__(self, x: np.ndarray, rows: np.ndarray, seed: int) -> None:
        self.rows = rows
        data = np.ascontiguousarray(x[rows])
        d = x.shape[1]
        if rows.size < FLAT_BELOW:
            self.index = faiss.IndexFlatIP(d)
            self.index.add(data)
            self.ivf = None
            self.code_bytes = 0
            self.raw_bytes = int(faiss.serialize_index(self.index).nbytes)
            return
        nlist = int(round(rows.size ** 0.5))
        self.quantizer = faiss.IndexFlatIP(d)
        self.ivf = faiss.IndexIVFPQFastScan(self.quantizer, d, nlist, d // 2, 4, faiss.METRIC_INNER_PRODUCT)
        self.ivf.by_residual = True  # as tierstore's pq4fs codes
        self.ivf.use_precomputed_table = -1
        self.ivf.cp.seed = seed
        self.ivf.pq.cp.seed = seed
        self.ivf.train(data)
        self.index = faiss.IndexRefineFlat(self.ivf)
        self.index.add(data)
        self.code_bytes = int(faiss.serialize_index(self.ivf).nbytes)  # centroids, PQ tables, codes
        self.raw_bytes = int(faiss.serialize_index(self.index).nbytes) - self.code_bytes
        self.params = {}
        for nprobe in DEDICATED_NPROBES:
            ivf_params = faiss.SearchParametersIVF(nprobe=min(nprobe, nlist))
            params = faiss.IndexRefineSearchParameters(k_factor=REFINE, base_index_params=ivf_params)
            self.params[nprobe] = (params, ivf_params)  # keep the inner object alive (SWIG)

    def search(self, q: np.ndarray, nprobe: int) -> np.ndarray:
        if self.ivf is None:
            _, local = self.index.search(q[None], K)
        else:
            _, local = self.index.search(q[None], K, params=self.params[nprobe][0])
        local = local[0]
        return np.where(local >= 0, self.rows[np.maximum(local, 0)], -1)


def build_tierstore(path: str, x: np.ndarray, owner: np.ndarray, shared_rows: np.ndarray,
                    second: np.ndarray, names: list[str]):
    import tierstore

    db = tierstore.connect(path)
    col = db.create_collection("tenants", dim=x.shape[1], metric="cosine")
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(len(names) + 1))
    for t, name in enumerate(names):
        ids = order[bounds[t]:bounds[t + 1]]
        col.tenant(name).add(ids, x[ids])
    for t in np.unique(second):
        col.grant(shared_rows[second == t], names[t])
    return db, col, col.build_index()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 queries instead of 2,000")
    parser.add_argument("--queries", type=int, help="number of queries")
    parser.add_argument("--tenants", type=int, default=1_000, help="number of tenants (default 1,000)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds per query (median kept)")
    parser.add_argument("--rows", type=int, help="use only the first ROWS vectors (a smoke run; default all)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--shared", default=os.environ.get("TIERSTORE_SHARED") or
                        os.path.join(os.path.dirname(_HERE), "..", "shared"))
    args = parser.parse_args(argv)
    import tierstore
    from tierstore.index.local_ivf import LocalIVF

    faiss.omp_set_num_threads(1)
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    data = load_manpages(os.path.join(args.shared, "data"))
    x = data.base[:args.rows] if args.rows else data.base
    nq = args.queries or (300 if args.quick else 2_000)
    xq = data.queries[:nq]
    names = [f"tenant{t:04d}" for t in range(args.tenants)]
    owner = assign_tenants(load_pages(args.shared)[:x.shape[0]], args.tenants, rng)
    shared_rows, second = share_rows(owner, args.tenants, rng)
    members = [np.flatnonzero(owner == t) for t in range(args.tenants)]
    for t in np.unique(second):
        members[t] = np.union1d(members[t], shared_rows[second == t])
    sizes = np.array([m.size for m in members])
    labels = [bucket_of(int(s)) for s in sizes]
    query_tenant = assign_queries(nq, sizes, rng)
    truth = [exact_topk(x, members[t], q) for t, q in zip(query_tenant, xq)]

    with tempfile.TemporaryDirectory() as tmp:
        # (a) the same vectors without tenants: one shared index.
        plain_db = tierstore.connect(os.path.join(tmp, "plain"))
        plain = plain_db.create_collection("plain", dim=x.shape[1], metric="cosine")
        plain.add(np.arange(x.shape[0]), x)
        plain.build_index()
        plain_stats = plain.stats()
        plain_db.close()
        t0 = time.perf_counter()
        db, col, build = build_tierstore(os.path.join(tmp, "tenants"), x, owner, shared_rows, second, names)
        tierstore_build_s = time.perf_counter() - t0
        print(f"  tierstore: {args.tenants} tenants, {sizes.sum():,} memberships, built in {tierstore_build_s:.1f} s",
              flush=True)
        # (b) one index per tenant.
        t0 = time.perf_counter()
        dedicated = [Dedicated(x, rows, seed=t) for t, rows in enumerate(members)]
        dedicated_build_s = time.perf_counter() - t0
        print(f"  dedicated: {args.tenants} indexes ({sum(d.ivf is not None for d in dedicated)} IVF) "
              f"in {dedicated_build_s:.1f} s", flush=True)

        handles = [col.tenant(name) for name in names]
        systems: dict[str, Any] = {}
        for nprobe in TIERSTORE_NPROBES:
            params = {} if nprobe == 16 else {"nprobe": nprobe}
            systems[f"tierstore nprobe={nprobe}"] = \
                lambda t, q, p=params: handles[t].search(q, k=K, **p).ids[0]
        for nprobe in DEDICATED_NPROBES:
            systems[f"dedicated nprobe={nprobe}"] = lambda t, q, p=nprobe: dedicated[t].search(q, p)
        plan_of = []
        for t, q in zip(query_tenant, xq):  # warm-up (builds each queried tenant's row set once)
            stats = handles[t].search(q, k=K).stats
            scoring = stats.get("scoring")  # how the filtered plan scored its lists
            plan_of.append(stats.get("plan", "?") + (f"/{scoring}" if scoring else ""))
            for fn in systems.values():
                fn(t, q)
        plans: dict[str, int] = {}
        for t, plan in zip(query_tenant, plan_of):
            plans[f"{labels[t]}:{plan}"] = plans.get(f"{labels[t]}:{plan}", 0) + 1

        found = {name: np.full((nq, K), -1, np.int64) for name in systems}
        latency = {name: np.zeros((args.rounds, nq)) for name in systems}
        order = list(systems)
        clock = time.perf_counter
        gc.collect()
        gc.disable()
        try:
            for r in range(args.rounds):  # a pass per system, the order reversed every round
                for name in (order if r % 2 == 0 else order[::-1]):
                    fn, seconds, out = systems[name], latency[name][r], found[name]
                    for i, (t, q) in enumerate(zip(query_tenant, xq)):
                        start = clock()
                        ids = fn(t, q)
                        seconds[i] = clock() - start
                        out[i, :ids.size] = ids
        finally:
            gc.enable()

        # Memory: every tenant's row set warm, then offloaded.
        for t in range(args.tenants):
            handles[t].search(xq[0], k=K)
        warm = col.tenant_stats()
        with_ivf = list(col._tenant_ivfs)
        col.offload_tenants(keep=0)
        cold = col.tenant_stats()
        tenant_col_stats = col.stats()
        offload = []
        for name in with_ivf:  # first search after the offload: the IVF read back from the durable tier
            t = names.index(name)
            start = time.perf_counter()
            stats = handles[t].search(xq[0], k=K).stats
            back_ms = (time.perf_counter() - start) * 1e3
            held = col._tenant_matches(name, None).in_index
            start = time.perf_counter()
            local = LocalIVF.build(col.vectors.resident[held], held, metric="ip")
            train_ms = (time.perf_counter() - start) * 1e3
            offload.append({"tenant": name, "rows": int(sizes[t]), "plan": stats["plan"],
                            "first_search_ms": back_ms, "train_ms": train_ms, "ivf_bytes": local.nbytes})
        loads = col.tenant_stats()["tenant_ivf_loads"]
        db.close()

    shared_index = int(plain_stats["index"]["resident_bytes"])
    tenant_shared_index = int(tenant_col_stats["index"]["resident_bytes"])
    memory = {
        "shared_index_no_tenants": shared_index,
        "tenant_collection_index": tenant_shared_index,
        "tenant_index_warm": int(warm["tenant_index_bytes"]),
        "tenant_index_offloaded": int(cold["tenant_index_bytes"]),
        "tierstore_total_warm": tenant_shared_index + int(warm["tenant_index_bytes"]),
        "ratio_tenant_total_vs_shared_index": (tenant_shared_index + int(warm["tenant_index_bytes"])) / shared_index,
        "dedicated_ivf_codes": sum(d.code_bytes for d in dedicated),
        "dedicated_flat_vectors": sum(d.raw_bytes for d in dedicated if d.ivf is None),
        "dedicated_refine_vectors": sum(d.raw_bytes for d in dedicated if d.ivf is not None),
        "dedicated_total": sum(d.code_bytes + d.raw_bytes for d in dedicated),
        "raw_vectors_once": int(x.nbytes),
        "tierstore_resident_total": int(tenant_col_stats["resident_bytes"]),
        "no_tenants_resident_total": int(plain_stats["resident_bytes"]),
        "tenant_stats_warm": {k: v for k, v in warm.items() if isinstance(v, (int, float))},
    }

    rows: list[dict[str, Any]] = []
    recalls = {name: np.array([recall(f, t) for f, t in zip(found[name], truth)]) for name in systems}
    ours_names = [name for name in systems if name.startswith("tierstore")]
    theirs_names = [name for name in systems if name.startswith("dedicated")]
    for bucket, low, high in GROUPS:
        inside = (sizes >= low) & (sizes < (high if high is not None else np.inf))
        picked = inside[query_tenant]
        tenants_here = np.flatnonzero(inside).tolist()
        queried = sorted(set(query_tenant[picked].tolist()))
        if not queried:  # no tenant of this size (a small --rows run)
            continue
        # Settings that cannot differ here (exact plans, flat indexes) are pooled into one row.
        groups = ([(name, [name]) for name in ours_names]
                  if any(plan_of[i] != "exact" for i in np.flatnonzero(picked)) else
                  [("tierstore (exact plan)", ours_names)])
        groups += ([(name, [name]) for name in theirs_names] if any(dedicated[t].ivf is not None for t in queried)
                   else [("dedicated (flat)", theirs_names)])
        for label, pooled in groups:
            per_tenant = [float(recalls[pooled[0]][picked & (query_tenant == t)].mean()) for t in queried]
            lat = np.median(np.concatenate([latency[name] for name in pooled]), axis=0)[picked]
            rows.append({"bucket": bucket, "tenants": len(tenants_here),
                         "rows": f"{min(sizes[tenants_here])}-{max(sizes[tenants_here])}",
                         "queried": len(queried), "queries": int(picked.sum()), "system": label,
                         "recall": float(recalls[pooled[0]][picked].mean()),
                         "recall_median_tenant": median(per_tenant) if per_tenant else None,
                         "p50_us": float(np.median(lat) * 1e6), "qps": float(lat.size / lat.sum())})
    summary = []
    for bucket, _, _ in GROUPS:
        mine = {row["system"]: row for row in rows if row["bucket"] == bucket}
        if not mine:
            continue
        ours = mine.get("tierstore nprobe=16") or mine["tierstore (exact plan)"]
        theirs = [row for name, row in mine.items() if name.startswith("dedicated")]
        good = [row for row in theirs if row["recall"] >= ours["recall"] - 0.005]
        match = min(good, key=lambda row: row["p50_us"]) if good else max(theirs, key=lambda row: row["recall"])
        summary.append({"bucket": bucket, "tierstore_recall": ours["recall"], "tierstore_p50_us": ours["p50_us"],
                        "dedicated": match["system"], "dedicated_recall": match["recall"],
                        "dedicated_p50_us": match["p50_us"], "latency_ratio": ours["p50_us"] / match["p50_us"],
                        "qps_ratio": match["qps"] / ours["qps"]})

    elapsed = time.perf_counter() - started
    print(f"\nmulti-tenant search on manpages ({args.tenants} tenants, {int(SHARED_FRACTION * 100)}% of vectors "
          f"shared; {nq} queries, one query per call, one thread, median of {args.rounds} rounds; "
          f"plans {plans}; {elapsed:.0f} s)")
    print(format_table(rows, [("bucket", "bucket", ""), ("tenants", "tenants", ","), ("rows", "rows", ""),
                              ("queried", "queried", ","), ("queries", "queries", ","), ("system", "system", ""),
                              ("recall", "recall@10", ".3f"), ("recall_median_tenant", "median/tenant", ".3f"),
                              ("p50_us", "p50 us", ",.0f"), ("qps", "QPS", ",.0f")]))
    print("\nat similar recall (tierstore at its default nprobe against the fastest dedicated setting as accurate):")
    print(format_table(summary, [("bucket", "bucket", ""), ("tierstore_recall", "tierstore recall", ".3f"),
                                 ("tierstore_p50_us", "p50 us", ",.0f"), ("dedicated", "dedicated", ""),
                                 ("dedicated_recall", "recall", ".3f"), ("dedicated_p50_us", "p50 us", ",.0f"),
                                 ("latency_ratio", "latency x", ".2f")]))
    print(f"\nafter offload_tenants(keep=0): first search of each tenant with its own IVF ({loads} read back "
          "from the durable tier) against training it again:")
    print(format_table(offload, [("tenant", "tenant", ""), ("rows", "rows", ","), ("plan", "plan", ""),
                                 ("first_search_ms", "first search ms", ".1f"), ("train_ms", "train ms", ".0f"),
                                 ("ivf_bytes", "IVF bytes", ",")]))
    mib = 1 << 20
    print("\nmemory (MiB):")
    print(format_table([
        {"what": "tierstore shared index, no tenants", "bytes": memory["shared_index_no_tenants"] / mib},
        {"what": "tierstore with tenants: shared index", "bytes": memory["tenant_collection_index"] / mib},
        {"what": "  + tenant index (all tenants warm)", "bytes": memory["tenant_index_warm"] / mib},
        {"what": "  + tenant index (offloaded)", "bytes": memory["tenant_index_offloaded"] / mib},
        {"what": "  = total (warm)", "bytes": memory["tierstore_total_warm"] / mib,
         "ratio": memory["ratio_tenant_total_vs_shared_index"]},
        {"what": "dedicated: IVF codes + centroids", "bytes": memory["dedicated_ivf_codes"] / mib,
         "ratio": memory["dedicated_ivf_codes"] / shared_index},
        {"what": "dedicated: flat indexes (raw vectors)", "bytes": memory["dedicated_flat_vectors"] / mib},
        {"what": "dedicated: refine vectors of the IVFs", "bytes": memory["dedicated_refine_vectors"] / mib},
        {"what": "dedicated: total", "bytes": memory["dedicated_total"] / mib,
         "ratio": memory["dedicated_total"] / shared_index},
        {"what": "raw vectors, once", "bytes": memory["raw_vectors_once"] / mib},
        {"what": "tierstore resident, all (vectors included)", "bytes": memory["tierstore_resident_total"] / mib},
    ], [("what", "", ""), ("bytes", "MiB", ",.2f"), ("ratio", "x shared index", ".2f")]))
    if args.json:
        write_report(args.json, bench_meta(benchmark="tenants", queries=nq, tenants=args.tenants,
                                           rounds=args.rounds, shared_fraction=SHARED_FRACTION,
                                           memberships=int(sizes.sum()), plans=plans, lists=build.get("lists"),
                                           tierstore_build_s=tierstore_build_s,
                                           dedicated_build_s=dedicated_build_s, seconds=elapsed),
                     memory=memory, results=rows, summary=summary, offload=offload,
                     buckets={b: int(sum(1 for lab in labels if lab == b)) for b, _, _ in BUCKETS})
    return 0


if __name__ == "__main__":
    sys.exit(main())
