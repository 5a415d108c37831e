"""Approximate nearest-neighbour search: recall@10 against queries per second, one thread.

    python bench/ann.py --dataset manpages|synthetic-100k|synthetic-1m [--quick]
                        [--json PATH] [--plot PATH] [--systems flat,ivf-flat,...]

Every system is built, then every (system, setting) pair is timed in the same run,
interleaved round by round (see :func:`_common.interleaved_rates`), and the medians are
reported:

- ``recall@10``: over all queries (or ``--queries``), by the batch search;
- ``QPS 1q``: one query per call, ``search(xq[i:i+1], 10)``, single thread, over the
  first ``--single-queries`` queries (fewer for slow settings: each pass is capped);
- ``QPS b100``: batches of 100 queries per call, single thread;
- build seconds (with ``--build-threads`` threads) and index bytes (``serialize_index``;
  for tierstore, ``Collection.stats()["resident_bytes"]``: what the collection holds in
  memory in that layout).

The summaries give, per system, the recall/QPS Pareto points and the best single-query
QPS at recall@10 >= 0.90 and >= 0.95: the speed to beat. ``faiss`` searches run with
``omp_set_num_threads(1)``. IVF list counts default per system (:func:`default_nlist`:
near 4 sqrt(n), and sqrt(n) for fast-scan codes, which want longer lists); ``--nlist``
overrides them. IVF systems with the same nlist share one coarse quantizer (k-means with
faiss's IVF defaults, on at most 64 x nlist points); each one's build time counts that
training in full, as if it had been built alone.

A system is a name, a ``build(dataset) -> Searcher`` function, a list of settings (the
keyword arguments of ``Searcher.search``) and a description. tierstore's own indexes
join as more systems, one per tier layout (bench/_tierstore_systems.py): ``tierstore-mem``
(everything resident) is timed like faiss; ``tierstore-lmdb-cold``, ``tierstore-s3`` (on a
moto server started here) and ``tierstore-s3-60ms`` (the same behind a latency proxy,
``--s3-latency-ms``) are *measured* systems: their searcher has a ``measure`` method that
times cold single queries in a fresh process, outside the interleaved loop. They get a
second table: latency p50/p95, dependent read rounds, reads / S3 GETs and bytes per
query, resident memory against the raw vectors, process RSS. Their ``QPS 1q`` is one
pass (queries / summed latency, first cold query included), their ``QPS b100`` (LMDB
only) one batch pass over the recall queries. ``--systems tierstore`` selects all four;
``tierstore-s3`` selects both S3 passes. ``--cold-queries``, ``--s3-queries`` and
``--s3-latency-ms`` size them; ``--workdir`` places the temporary database.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))  # run from a checkout: `python bench/ann.py`
sys.path.insert(0, _HERE)

from _common import (bench_meta, calls_within, format_table, interleaved_rates, median,  # noqa: E402
                     write_report)
from datasets import Dataset, cache_info, load_dataset, recall_at_k  # noqa: E402

K = 10
BATCH = 100
THRESHOLDS = (0.90, 0.95)


# --------------------------------------------------------------------------- systems

class Searcher(Protocol):
    """A built index. ``search`` applies ``setting`` (cheaply when unchanged) and returns
    ids ``(nq, k)``, nearest first, -1 where fewer than k were found."""

    reused_build_s: float  # build work shared with another system and not repeated here

    def search(self, queries: np.ndarray, k: int, **setting: Any) -> np.ndarray: ...

    def index_bytes(self) -> int: ...

    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class System:
    """One index configuration to benchmark, searched under each of ``settings``."""

    name: str
    build: Callable[[Dataset], Searcher]
    settings: tuple[Mapping[str, Any], ...]
    description: str = ""
    aliases: tuple[str, ...] = ()  # more names that select this system in --systems

    def describe(self) -> str:
        return self.description or self.name


@dataclasses.dataclass(frozen=True)
class Options:
    """What system factories may adapt to."""

    quick: bool = False
    nlists: tuple[int, ...] = ()  # IVF list counts for every IVF system; empty: default_nlist per system
    cold_queries: int | None = None  # single queries per cold LMDB pass (None: 500, quick 200)
    s3_queries: int | None = None  # single queries per S3 pass (None: 50, quick 20)
    s3_latency_ms: float = 60.0  # added to each S3 request in the second S3 pass (0: no such pass)
    workdir: str | None = None  # where tierstore's temporary database goes (None: the system's temp dir)
    tierstore_quantizer: str = "pq4fs"


class Measured(Protocol):
    """A built system timed by itself (cold passes in a fresh process): ``measure`` returns one
    record per setting with at least recall_at_10, qps_single, qps_batch100 (or None),
    single_queries, batch_queries and index_bytes; more keys are kept as they are."""

    reused_build_s: float

    def measure(self, settings: Sequence[Mapping[str, Any]], queries: np.ndarray, gt_ids: np.ndarray,
                log: Callable[[str], None]) -> list[dict[str, Any]]: ...

    def index_bytes(self) -> int: ...

    def close(self) -> None: ...


class FaissSearcher:
    """A faiss index; a setting is applied through ``setters`` (name -> function of value)."""

    def __init__(self, index: Any, setters: Mapping[str, Callable[[Any], None]], *,
                 keep: Sequence[Any] = (), reused_build_s: float = 0.0) -> None:
        self.index = index
        self._setters = dict(setters)
        self._keep = list(keep)  # sub-indexes the wrapper does not own
        self._current: dict[str, Any] | None = None
        self.reused_build_s = reused_build_s

    def search(self, queries: np.ndarray, k: int, **setting: Any) -> np.ndarray:
        if setting != self._current:
            for name, value in setting.items():
                setter = self._setters.get(name)
                if setter is None:
                    raise ValueError(f"unknown setting {name!r}; this index takes {sorted(self._setters)}")
                setter(value)
            self._current = setting
        return self.index.search(queries, k)[1]

    def index_bytes(self) -> int:
        import faiss

        return int(faiss.serialize_index(self.index).size)

    def close(self) -> None:
        self.index = None
        self._keep.clear()


def default_nlist(n: int, *, fast_scan: bool = False) -> int:
    """IVF lists: the power of two nearest 4 sqrt(n) (1,024 for 50k-100k vectors, 4,096 for
    1M), a quarter of that for fast-scan codes.

    Measured on manpages (one query per call, best QPS at recall@10 >= 0.95, one run):
    IVF-Flat 3.3k / 5.1k / 6.9k QPS with 256 / 512 / 1,024 lists, SQ8 and 1-bit RaBitQ
    also best at 1,024; PQ fast-scan + refine 15.4k / 12.0k / 11.2k, fast-scan RaBitQ best
    at 256 too: fast-scan works in blocks of 32 codes after a per-list table set-up, so it
    wants lists of a few hundred vectors, not ~50.
    """
    lists = 1 << max(4, round(math.log2(4 * math.sqrt(n))))
    return max(16, lists // 4) if fast_scan else lists


class _CoarseCentroids:
    """One k-means per run, shared by the IVF systems (trained on first use)."""

    def __init__(self, nlist: int) -> None:
        self.nlist = nlist
        self.train_s = 0.0
        self._centroids: np.ndarray | None = None

    def quantizer(self, dataset: Dataset) -> tuple[Any, float]:
        """A fresh trained flat quantizer, and the training seconds it saved this build."""
        import faiss

        reused = self.train_s
        if self._centroids is None:
            start = time.perf_counter()
            flat = faiss.IndexFlat(dataset.dim, _metric(dataset))
            ivf = faiss.IndexIVFFlat(flat, dataset.dim, self.nlist, _metric(dataset))  # faiss's IVF k-means defaults
            ivf.train(training_sample(dataset, self.nlist))
            self._centroids = flat.reconstruct_n(0, self.nlist)
            self.train_s = time.perf_counter() - start
            reused = 0.0
        quantizer = faiss.IndexFlat(dataset.dim, _metric(dataset))
        quantizer.add(self._centroids)
        return quantizer, reused


def training_sample(dataset: Dataset, nlist: int) -> np.ndarray:
    """At most 64 points per list, drawn without replacement with a fixed seed."""
    size = min(len(dataset.base), 64 * nlist)
    if size == len(dataset.base):
        return dataset.base
    rows = np.sort(np.random.default_rng(0).choice(len(dataset.base), size, replace=False))
    return np.ascontiguousarray(dataset.base[rows])


def _metric(dataset: Dataset) -> int:
    import faiss

    return faiss.METRIC_INNER_PRODUCT if dataset.metric == "ip" else faiss.METRIC_L2


def faiss_systems(dataset: Dataset, options: Options) -> list[System]:
    """The faiss baselines: exact, IVF with flat / SQ8 / PQ fast-scan / RaBitQ codes, HNSW.

    With several ``options.nlists`` every IVF system is built once per nlist, named
    ``<system>-nl<nlist>``, each nlist with its own coarse quantizer.
    """
    import faiss

    d, quick, metric = dataset.dim, options.quick, _metric(dataset)
    pq_m = d // 2  # 4-bit codes over 2 dims each: d/2 bytes per vector
    nprobes = (8, 16, 24, 32, 64) if quick else (1, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 64, 96, 128, 256)
    refine_nprobes = (16, 24, 32) if quick else (8, 12, 16, 20, 24, 28, 32, 48, 64, 128)
    k_factors = (4,) if quick else (2, 4, 8)
    ef_searches = (16, 32, 64) if quick else (10, 16, 24, 32, 48, 64, 96, 128, 256)

    def ivf_system(name: str, nlist: int, coarse: _CoarseCentroids, make_ivf: Callable[[Any], Any],
                   codes: str, *, refine: bool) -> System:
        def build(data: Dataset) -> Searcher:
            quantizer, reused = coarse.quantizer(data)
            ivf = make_ivf(quantizer)
            index = faiss.IndexRefineFlat(ivf) if refine else ivf
            index.train(training_sample(data, nlist))  # quantizer already trained: codes only
            index.add(data.base)
            setters = {"nprobe": lambda value: setattr(ivf, "nprobe", value)}
            if refine:
                setters["k_factor"] = lambda value: setattr(index, "k_factor", value)
            return FaissSearcher(index, setters, keep=(ivf, quantizer), reused_build_s=reused)

        grid = ([{"nprobe": p, "k_factor": f} for p in refine_nprobes for f in k_factors if p <= nlist] if refine
                else [{"nprobe": p} for p in nprobes if p <= nlist])
        suffix = f"-nl{nlist}" if len(options.nlists) > 1 else ""
        return System(f"{name}{suffix}", build, tuple(grid), f"IVF{nlist},{codes}{',RFlat' if refine else ''}")

    def build_flat(data: Dataset) -> Searcher:
        index = faiss.IndexFlat(data.dim, _metric(data))
        index.add(data.base)
        return FaissSearcher(index, {})

    def build_hnsw(data: Dataset) -> Searcher:
        index = faiss.IndexHNSWFlat(data.dim, 32, _metric(data))
        index.hnsw.efConstruction = 40
        index.add(data.base)
        return FaissSearcher(index, {"efSearch": lambda value: setattr(index.hnsw, "efSearch", value)})

    # (name, make(quantizer, nlist), codes, refine?, fast-scan?)
    specs: list[tuple[str, Callable[[Any, int], Any], str, bool, bool]] = [
        ("faiss-ivf-flat", lambda q, nl: faiss.IndexIVFFlat(q, d, nl, metric), "Flat", False, False),
        ("faiss-ivf-sq8", lambda q, nl: faiss.IndexIVFScalarQuantizer(q, d, nl, faiss.ScalarQuantizer.QT_8bit,
                                                                      metric), "SQ8", False, False),
        ("faiss-ivf-pq-fs-rf", lambda q, nl: faiss.IndexIVFPQFastScan(q, d, nl, pq_m, 4, metric),
         f"PQ{pq_m}x4fs", True, True),
        ("faiss-ivf-rabitq-rf", lambda q, nl: faiss.IndexIVFRaBitQ(q, d, nl, metric), "RaBitQ(1 bit, qb=4)",
         True, False),
        ("faiss-ivf-rabitq-fs-rf", lambda q, nl: faiss.IndexIVFRaBitQFastScan(q, d, nl, metric),
         "RaBitQfs(1 bit, qb=8)", True, True),
        ("faiss-ivf-rabitq4", lambda q, nl: faiss.IndexIVFRaBitQ(q, d, nl, metric, True, 4), "RaBitQ(4 bits, qb=4)",
         False, False),
    ]
    coarse: dict[int, _CoarseCentroids] = {}
    systems = [System("faiss-flat", build_flat, ({},), f"Flat{'IP' if dataset.metric == 'ip' else 'L2'} (exact)")]
    for name, make, codes, refine, fast_scan in specs:
        for nlist in options.nlists or (default_nlist(len(dataset.base), fast_scan=fast_scan),):
            systems.append(ivf_system(name, nlist, coarse.setdefault(nlist, _CoarseCentroids(nlist)),
                                      lambda q, make=make, nlist=nlist: make(q, nlist), codes, refine=refine))
    systems.append(System("faiss-hnsw", build_hnsw, tuple({"efSearch": ef} for ef in ef_searches),
                          "HNSW32,Flat (efConstruction 40)"))
    return systems


def tierstore_systems(dataset: Dataset, options: Options) -> list[System]:
    """tierstore in memory, cold on LMDB, on S3 and on S3 with latency (bench/_tierstore_systems.py)."""
    import _tierstore_systems

    return _tierstore_systems.tierstore_systems(dataset, options, System)


#: Name -> factory(dataset, options) -> systems.
SYSTEM_FACTORIES: dict[str, Callable[[Dataset, Options], list[System]]] = {
    "faiss": faiss_systems, "tierstore": tierstore_systems}


def select_systems(systems: Sequence[System], wanted: str | None) -> list[System]:
    """``wanted``: comma-separated names, with or without the ``faiss-`` prefix and the
    ``-nl<nlist>`` suffix (then every nlist matches), or a system's alias (``tierstore``:
    all of tierstore's); None or empty: all."""
    if not wanted:
        return list(systems)
    chosen: list[System] = []
    for token in (part.strip() for part in wanted.split(",")):
        if not token:
            continue
        matches = [system for system in systems
                   if token in system.aliases or any(system.name == name or system.name.startswith(f"{name}-nl")
                                                     for name in (token, f"faiss-{token}"))]
        if not matches:
            raise SystemExit(f"unknown system {token!r}; choose from {', '.join(s.name for s in systems)}")
        chosen += [system for system in matches if system not in chosen]
    return chosen


# --------------------------------------------------------------------------- measuring

def _label(setting: Mapping[str, Any]) -> str:
    return ",".join(f"{key}={value}" for key, value in setting.items()) or "-"


def _set_threads(count: int) -> None:
    import faiss

    faiss.omp_set_num_threads(count)


def run(dataset: Dataset, systems: Sequence[System], *, rounds: int, single_queries: int, recall_queries: int,
        pass_seconds: float, build_threads: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Build every system, then time every (system, setting) pair interleaved; one record each.

    Systems whose searcher has a ``measure`` method (:class:`Measured`) are measured by it,
    after the interleaved timing, with the same queries.
    """
    queries = dataset.queries[:recall_queries]
    gt_ids = dataset.gt_ids[:recall_queries]
    singles = [np.ascontiguousarray(queries[i:i + 1]) for i in range(min(single_queries, len(queries)))]
    batches = [np.ascontiguousarray(queries[i:i + BATCH]) for i in range(0, len(queries) - BATCH + 1, BATCH)]
    built: list[tuple[System, Searcher, float, int]] = []
    try:  # searchers may hold servers, processes and temporary files: always close them
        for system in systems:
            _set_threads(build_threads)
            start = time.perf_counter()
            searcher = system.build(dataset)
            build_s = time.perf_counter() - start + searcher.reused_build_s
            try:
                nbytes = searcher.index_bytes()
            except BaseException:
                searcher.close()
                raise
            built.append((system, searcher, build_s, nbytes))
            log(f"built {system.name} ({system.describe()}) in {build_s:.1f} s, {nbytes / 2**20:.1f} MiB")
        records = _time_and_measure(built, queries, gt_ids, singles, batches, rounds=rounds, pass_seconds=pass_seconds,
                                    build_threads=build_threads, log=log)
    finally:
        for _, searcher, _, _ in built:
            searcher.close()
    order = {system.name: position for position, (system, _, _, _) in enumerate(built)}
    return sorted(records, key=lambda record: order[record["system"]])  # stable: settings keep their order


def _time_and_measure(built: Sequence[tuple[System, Any, float, int]], queries: np.ndarray, gt_ids: np.ndarray,
                      singles: Sequence[np.ndarray], batches: Sequence[np.ndarray], *, rounds: int,
                      pass_seconds: float, build_threads: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    records, single_passes, batch_passes = [], [], []
    for system, searcher, build_s, nbytes in built:
        if hasattr(searcher, "measure"):
            continue
        for setting in system.settings:
            _set_threads(build_threads)  # recall needs no timing: use every core
            ids = searcher.search(queries, K, **setting)
            _set_threads(1)
            single_ids: list[np.ndarray] = []
            n_single = calls_within(lambda i, s=searcher, st=setting: single_ids.append(s.search(singles[i], K, **st)),
                                    len(singles), pass_seconds)
            n_batch = calls_within(lambda i, s=searcher, st=setting: s.search(batches[i], K, **st),
                                   len(batches), pass_seconds)
            agree = np.mean([set(a[0]) == set(b) for a, b in zip(single_ids, ids[:n_single, :K])])
            single_passes.append((lambda i, s=searcher, st=setting: s.search(singles[i], K, **st), n_single))
            batch_passes.append((lambda i, s=searcher, st=setting: s.search(batches[i], K, **st), n_batch))
            records.append({
                "system": system.name, "setting": dict(setting), "label": _label(setting),
                "recall_at_10": recall_at_k(ids, gt_ids, K), "qps_single": None, "qps_batch100": None,
                "build_s": build_s, "index_bytes": nbytes, "single_queries": n_single,
                "batch_queries": n_batch * BATCH, "single_agrees_with_batch": float(agree)})
        log(f"calibrated {system.name}: {len(system.settings)} settings")
    _set_threads(1)
    log(f"timing {len(records)} settings x {rounds} rounds, interleaved ...")
    single_rates = interleaved_rates(single_passes, rounds=rounds)
    batch_rates = interleaved_rates(batch_passes, rounds=rounds)
    for record, single, batch in zip(records, single_rates, batch_rates):
        record["qps_single"] = median(single)
        record["qps_batch100"] = median(batch) * BATCH
        record["qps_single_rounds"] = [round(rate, 1) for rate in single]
        if record["single_agrees_with_batch"] < 0.99:
            log(f"warning: {record['system']} {record['label']}: one-query results differ from batch results "
                f"for {1 - record['single_agrees_with_batch']:.1%} of queries")
    for system, searcher, build_s, nbytes in built:
        if not hasattr(searcher, "measure"):
            continue
        measured = searcher.measure(system.settings, queries, gt_ids, log)
        for setting, result in zip(system.settings, measured):
            record = {"system": system.name, "setting": dict(setting), "label": _label(setting), "build_s": build_s,
                      "index_bytes": nbytes, "measured": True, **result}
            records.append(record)
            if record.get("single_agrees_with_batch", 1.0) < 0.99:
                log(f"warning: {system.name} {record['label']}: results differ from the in-memory search "
                    f"for {1 - record['single_agrees_with_batch']:.1%} of queries")
    return records


def call_floor(dim: int, rounds: int) -> dict[str, float]:
    """QPS of a one-vector IndexFlatL2 searched one query per call: faiss's per-call floor,
    raw and through :class:`FaissSearcher` (the wrapper's own overhead)."""
    import faiss

    _set_threads(1)
    index = faiss.IndexFlatL2(dim)
    index.add(np.zeros((1, dim), dtype=np.float32))
    searcher = FaissSearcher(index, {})
    query = np.ones((1, dim), dtype=np.float32)
    calls = 20_000
    raw, wrapped = interleaved_rates([(lambda i: index.search(query, K), calls),
                                      (lambda i: searcher.search(query, K), calls)], rounds=rounds)
    return {"faiss_qps": median(raw), "searcher_qps": median(wrapped),
            "faiss_us_per_call": 1e6 / median(raw), "searcher_us_per_call": 1e6 / median(wrapped)}


# --------------------------------------------------------------------------- summaries

def pareto(records: Sequence[Mapping[str, Any]], key: str = "qps_single") -> list[Mapping[str, Any]]:
    """The records no other beats on both recall and ``key``, by increasing recall."""
    front: list[Mapping[str, Any]] = []
    best = -math.inf
    for record in sorted(records, key=lambda r: (-r["recall_at_10"], -r[key])):
        if record[key] > best:
            front.append(record)
            best = record[key]
    return front[::-1]


def best_at_recall(records: Sequence[Mapping[str, Any]], threshold: float,
                   key: str = "qps_single") -> Mapping[str, Any] | None:
    """The fastest record (by ``key``) with recall@10 >= ``threshold``, or None."""
    good = [record for record in records if record["recall_at_10"] >= threshold and record.get(key) is not None]
    return max(good, key=lambda r: r[key]) if good else None


def summarise(systems: Sequence[System], records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    summaries = []
    for system in systems:
        mine = [record for record in records if record["system"] == system.name]
        summary: dict[str, Any] = {
            "system": system.name, "description": system.describe(), "build_s": mine[0]["build_s"],
            "index_bytes": mine[0]["index_bytes"], "max_recall_at_10": max(r["recall_at_10"] for r in mine),
            "pareto": [{"setting": r["setting"], "recall_at_10": r["recall_at_10"], "qps_single": r["qps_single"],
                        "qps_batch100": r["qps_batch100"]} for r in pareto(mine)]}
        for threshold in THRESHOLDS:
            tag = f"{round(threshold * 100)}"
            single, batch = best_at_recall(mine, threshold), best_at_recall(mine, threshold, "qps_batch100")
            summary[f"qps_single_at_{tag}"] = single["qps_single"] if single else None
            summary[f"setting_single_at_{tag}"] = single["setting"] if single else None
            summary[f"qps_batch100_at_{tag}"] = batch["qps_batch100"] if batch else None
        summaries.append(summary)
    return summaries


def plot(path: str, dataset: Dataset, systems: Sequence[System], records: Sequence[Mapping[str, Any]]) -> None:
    """Recall@10 (x) against single-query QPS (y, log), one line per system through its Pareto points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 6))
    colours = plt.get_cmap("tab10" if len(systems) <= 10 else "tab20").colors
    for number, system in enumerate(systems):
        mine = [record for record in records if record["system"] == system.name]
        front = pareto(mine)
        style = "s--" if system.name.startswith("tierstore") else "o-"  # tierstore's layouts stand out
        line, = axes.plot([r["recall_at_10"] for r in front], [r["qps_single"] for r in front], style,
                          label=system.name, markersize=4, color=colours[number % len(colours)])
        axes.scatter([r["recall_at_10"] for r in mine], [r["qps_single"] for r in mine], s=8,
                     color=line.get_color(), alpha=0.3)
    for threshold in THRESHOLDS:
        axes.axvline(threshold, color="grey", linestyle=":", linewidth=1)
    axes.set_yscale("log")
    axes.set_xlabel("recall@10")
    axes.set_ylabel("queries per second (one query per call, 1 thread)")
    axes.set_title(f"{dataset.name}: n={len(dataset.base):,}, d={dataset.dim}, {dataset.metric}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def tier_tables(records: Sequence[Mapping[str, Any]], raw_vector_bytes: int) -> str:
    """The measured (cold / S3) systems' per-query I/O and latency, and every tierstore system's memory."""
    if not any(r["system"].startswith("tierstore") for r in records):
        return ""
    mib = 2 ** 20
    measured = [r for r in records if r.get("measured")]
    rows = []
    for r in measured:
        probed = r.get("probed_list_bytes")
        rows.append({**r, "p50": r["latency_ms"]["p50"], "p95": r["latency_ms"]["p95"], "first": r["first_query_ms"],
                     "rounds_mean": r["rounds"]["mean"], "post_rounds_max": r["post_rounds"]["max"],
                     "rr_rounds_max": r["rr_rounds"]["max"], "reads_mean": r["reads"]["mean"],
                     "post_reads_mean": r["post_reads"]["mean"], "rr_reads_mean": r["rr_reads"]["mean"],
                     "gets_mean": r["http_gets"]["mean"] if r["tier"] == "s3" else None,
                     "post_kib": r["post_bytes"]["mean"] / 1024, "rr_kib": r["rr_bytes"]["mean"] / 1024,
                     "need_kib": probed["mean"] / 1024 if probed else None})
    lines = []
    if rows:
        lines += ["tierstore cold passes: single queries in a fresh process, memory_cache=0, per query (mean unless "
                  "max). rounds = dependent tier read calls; post = posting lists, rr = rerank vectors; reads = "
                  "ranged tier reads; GETs = HTTP GETs sent to S3; post KiB = posting bytes read, probed KiB = stored "
                  "size of the probed lists; same = share of queries whose ids match the in-memory collection's\n",
                  format_table(rows, [
                      ("system", "system", ""), ("label", "setting", ""), ("recall_at_10", "R@10", ".4f"),
                      ("recall_queries", "nq", "d"), ("qps_single", "QPS 1q", ",.1f"), ("p50", "p50 ms", ".2f"),
                      ("p95", "p95 ms", ".2f"), ("first", "1st ms", ".1f"), ("rounds_mean", "rounds", ".2f"),
                      ("post_rounds_max", "post max", ".0f"), ("rr_rounds_max", "rr max", ".0f"),
                      ("reads_mean", "reads", ".1f"), ("post_reads_mean", "post", ".1f"),
                      ("rr_reads_mean", "rr", ".1f"), ("gets_mean", "GETs", ".1f"), ("post_kib", "post KiB", ",.0f"),
                      ("need_kib", "probed KiB", ",.0f"), ("rr_kib", "rr KiB", ",.0f"),
                      ("agrees_with_memory", "same", ".3f")]), ""]
    memory = []
    for name in dict.fromkeys(r["system"] for r in records if r["system"].startswith("tierstore")):
        mine = [r for r in records if r["system"] == name]
        resident = max(r["index_bytes"] for r in mine)
        row: dict[str, Any] = {"system": name, "resident": resident / mib, "raw": raw_vector_bytes / mib,
                               "ratio": 100 * resident / raw_vector_bytes}
        if mine[0].get("measured"):
            first = mine[0]
            row.update(open_ms=1e3 * median([r["open_s"] for r in mine]), open_reads=first["open_reads"],
                       open_gets=first["open_http_gets"] if first["tier"] == "s3" else None,
                       rss_base=first["baseline_rss_bytes"] / mib,
                       rss_end=max(r["rss_end"]["rss"] for r in mine) / mib,
                       anon_end=max(r["rss_end"]["rss_anon"] for r in mine) / mib,
                       anon_delta=(max(r["rss_end"]["rss_anon"] for r in mine)
                                   - first["baseline_rss_anon_bytes"]) / mib,
                       file_end=max(r["rss_end"]["rss_file"] for r in mine) / mib)
        memory.append(row)
    lines += ["tierstore memory: resident = Collection.stats()['resident_bytes'] (largest after any pass), raw = "
              "n x d float32; RSS of the measuring process before connecting (base) and after a pass (end: total, "
              "anonymous, file-backed = mapped LMDB pages); open = connect + open the collection\n",
              format_table(memory, [
                  ("system", "system", ""), ("resident", "resident MiB", ",.2f"), ("raw", "raw MiB", ",.1f"),
                  ("ratio", "res/raw %", ".2f"), ("open_ms", "open ms", ".1f"), ("open_reads", "open reads", "d"),
                  ("open_gets", "open GETs", "d"), ("rss_base", "RSS base", ",.0f"), ("rss_end", "RSS end", ",.0f"),
                  ("anon_end", "anon end", ",.0f"), ("anon_delta", "anon +", ",.1f"),
                  ("file_end", "file end", ",.0f")])]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="manpages", choices=("manpages", "synthetic-100k", "synthetic-1m"))
    parser.add_argument("--quick", action="store_true", help="fewer settings, rounds and queries (~2 minutes)")
    parser.add_argument("--systems", help="comma-separated system names (default: all)")
    parser.add_argument("--json", metavar="PATH", help="write records, summaries and metadata as JSON")
    parser.add_argument("--plot", metavar="PATH", help="draw recall vs QPS (needs matplotlib)")
    parser.add_argument("--nlist", help="IVF list counts, comma-separated, for every IVF system (default: "
                        "near 4 sqrt(n), sqrt(n) for fast-scan); several build each IVF system once per nlist")
    parser.add_argument("--rounds", type=int, help="timing rounds (default 5)")
    parser.add_argument("--single-queries", type=int, help="queries timed one per call (default 1000, quick 500)")
    parser.add_argument("--queries", type=int, help="queries for recall and batch timing (default: all, quick 1000)")
    parser.add_argument("--pass-seconds", type=float, help="cap in seconds on one timed pass (default 0.25, quick 0.2)")
    parser.add_argument("--build-threads", type=int, default=os.cpu_count(), help="threads for builds and recall")
    parser.add_argument("--cold-queries", type=int, help="single queries per cold LMDB pass (default 500, quick 200)")
    parser.add_argument("--s3-queries", type=int, help="single queries per S3 pass (default 50, quick 20)")
    parser.add_argument("--s3-latency-ms", type=float, default=60.0,
                        help="added to every S3 request in the second S3 pass (default 60; 0: no such pass)")
    parser.add_argument("--tierstore-quantizer", default="pq4fs", help="tierstore's list codes (default pq4fs)")
    parser.add_argument("--workdir", help="directory for tierstore's temporary database (default: system temp)")
    args = parser.parse_args(argv)
    quick = args.quick
    rounds = args.rounds or 5
    single_queries = args.single_queries or (500 if quick else 1000)
    pass_seconds = args.pass_seconds or (0.2 if quick else 0.25)

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {text}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    dataset = load_dataset(args.dataset, **({"verbose": True} if args.dataset.startswith("synthetic") else {}))
    recall_queries = min(len(dataset.queries), args.queries or (1000 if quick else len(dataset.queries)))
    log(f"loaded {dataset!r}")
    nlists = tuple(int(part) for part in args.nlist.split(",") if part.strip()) if args.nlist else ()
    options = Options(quick=quick, nlists=nlists, cold_queries=args.cold_queries, s3_queries=args.s3_queries,
                      s3_latency_ms=args.s3_latency_ms, workdir=args.workdir,
                      tierstore_quantizer=args.tierstore_quantizer)
    available = [system for factory in SYSTEM_FACTORIES.values() for system in factory(dataset, options)]
    systems = select_systems(available, args.systems)
    floor = call_floor(dataset.dim, rounds)
    records = run(dataset, systems, rounds=rounds, single_queries=single_queries, recall_queries=recall_queries,
                  pass_seconds=pass_seconds, build_threads=args.build_threads, log=log)
    summaries = summarise(systems, records)

    print(f"\n{dataset.name}: n={len(dataset.base):,} d={dataset.dim} metric={dataset.metric}, recall over "
          f"{recall_queries:,} queries, search 1 thread, medians of {rounds} interleaved rounds\n")
    rows = [{**r, "mib": r["index_bytes"] / 2**20} for r in records]
    print(format_table(rows, [("system", "system", ""), ("label", "setting", ""), ("recall_at_10", "recall@10", ".4f"),
                              ("qps_single", "QPS 1q", ",.0f"), ("qps_batch100", "QPS b100", ",.0f"),
                              ("single_queries", "timed 1q", "d"), ("build_s", "build s", ".1f"),
                              ("mib", "MiB", ".1f")]))
    print("\nBest single-query QPS at recall@10 >= threshold (the speed to beat); b100 = batches of 100\n")
    summary_rows = [{**s, "mib": s["index_bytes"] / 2**20,
                     "at90": _label(s["setting_single_at_90"]) if s["setting_single_at_90"] is not None else None,
                     "at95": _label(s["setting_single_at_95"]) if s["setting_single_at_95"] is not None else None}
                    for s in summaries]
    print(format_table(summary_rows, [
        ("system", "system", ""), ("qps_single_at_90", "QPS1@.90", ",.0f"), ("at90", "setting", ""),
        ("qps_single_at_95", "QPS1@.95", ",.0f"), ("at95", "setting", ""),
        ("qps_batch100_at_95", "b100@.95", ",.0f"), ("max_recall_at_10", "max R@10", ".4f"),
        ("build_s", "build s", ".1f"), ("mib", "MiB", ".1f")]))
    tables = tier_tables(records, len(dataset.base) * dataset.dim * 4)
    if tables:
        print(f"\n{tables}")
    print(f"\nfaiss per-call floor (IndexFlatL2 holding 1 vector, d={dataset.dim}): "
          f"{floor['faiss_qps']:,.0f} QPS = {floor['faiss_us_per_call']:.1f} us/call raw, "
          f"{floor['searcher_us_per_call']:.1f} us/call through FaissSearcher")

    if args.json or args.plot:
        if args.json:
            meta = bench_meta(
                benchmark="ann", dataset=dataset.name, n=len(dataset.base), nq_recall=recall_queries, dim=dataset.dim,
                metric=dataset.metric, k=K, batch=BATCH, quick=quick, rounds=rounds, single_queries=single_queries,
                pass_seconds=pass_seconds, search_threads=1, build_threads=args.build_threads,
                nlists=list(options.nlists) or "default_nlist per system (see descriptions)",
                tierstore_options={"cold_queries": options.cold_queries, "s3_queries": options.s3_queries,
                                   "s3_latency_ms": options.s3_latency_ms,
                                   "quantizer": options.tierstore_quantizer},
                faiss=_faiss_version(), faiss_compile_options=_faiss_compile_options(),
                dataset_cache=cache_info(dataset.name), argv=sys.argv[1:],
                wall_s=round(time.perf_counter() - started, 1))
            write_report(args.json, meta, results=records, summaries=summaries, call_floor=floor,
                         systems=[{"name": s.name, "description": s.describe(), "settings": list(s.settings),
                                   "aliases": list(s.aliases)} for s in systems])
            log(f"wrote {args.json}")
        if args.plot:
            plot(args.plot, dataset, systems, records)
            log(f"wrote {args.plot}")
    return 0


def _faiss_version() -> str:
    import faiss

    return faiss.__version__


def _faiss_compile_options() -> str:
    import faiss

    return faiss.get_compile_options().strip()


if __name__ == "__main__":
    sys.exit(main())
