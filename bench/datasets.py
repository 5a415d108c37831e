"""Benchmark datasets with exact ground truth, and recall.

==============  =========  ====  ======  ======  ==========================================
name            n          dim   nq      metric  source
==============  =========  ====  ======  ======  ==========================================
manpages        50,000     384   5,000   ip      MiniLM embeddings of man pages (shared data)
synthetic-100k  100,000    128   10,000  l2      :func:`synthetic`, SIFT-like, generated here
synthetic-1m    1,000,000  128   10,000  l2      the same generator with n = 1,000,000
==============  =========  ====  ======  ======  ==========================================

Every dataset carries the exact top-100 neighbours of each query (``gt_ids``): shipped
with manpages, computed once by a faiss ``IndexFlatL2`` for the synthetic sets and cached
under ``bench/.cache/`` (gitignored), keyed by every generator parameter. Vectors are
float32 and C-contiguous; manpages vectors are L2-normalised, so "ip" is cosine.

The synthetic vectors imitate SIFT descriptors: a mixture of anisotropic Gaussian
clusters whose sizes and spreads follow Zipf laws, values clipped to 0..255 and rounded
to integers (mean ~23, a quarter zeros). Their difficulty is SIFT-like: an IVF with
4 sqrt(n) lists reaches recall@10 ~0.3-0.4 probing 1 list and ~0.94-0.98 probing 16.
Integer data has exact distance ties: for ~0.15% of queries the 10th and 11th true
distances are equal, so a correct search may "miss" one neighbour there (< 0.0002 of
recall@10).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "Dataset", "DATASETS", "load_dataset", "load_manpages", "synthetic", "generate_synthetic",
    "exact_neighbours", "recall_at_k", "cache_info",
]

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CACHE_DIR = os.path.join(_HERE, ".cache")
MANPAGES_DIR = "manpages-minilm"

#: Bump when the synthetic generator changes what it produces: old caches are then ignored.
GENERATOR_VERSION = 1
#: Rows generated per random stream. Part of the output's definition: changing it changes
#: the vectors, so it is fixed here and not tied to the memory available.
CHUNK_ROWS = 1 << 16
GT_K = 100


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Base vectors, queries and the exact top-100 neighbours of each query.

    ``gt_ids[i]`` lists base row numbers, nearest first, by ``metric``: ``"ip"`` (inner
    product on normalised vectors, i.e. cosine; larger is nearer) or ``"l2"``.
    """

    name: str
    base: np.ndarray
    queries: np.ndarray
    gt_ids: np.ndarray
    metric: str
    dim: int

    def __post_init__(self) -> None:
        if self.metric not in ("ip", "l2"):
            raise ValueError(f"metric must be 'ip' or 'l2', not {self.metric!r}")
        for field in ("base", "queries"):
            array = getattr(self, field)
            if array.dtype != np.float32 or array.ndim != 2 or array.shape[1] != self.dim:
                raise ValueError(f"{field} must be float32 of shape (n, {self.dim}), got {array.dtype} {array.shape}")
            if not array.flags.c_contiguous:
                raise ValueError(f"{field} must be C-contiguous")
        if self.gt_ids.dtype not in (np.int32, np.int64) or self.gt_ids.shape[0] != len(self.queries):
            raise ValueError(f"gt_ids must be int32/int64 with one row per query, got "
                             f"{self.gt_ids.dtype} {self.gt_ids.shape}")

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, n={len(self.base)}, nq={len(self.queries)}, dim={self.dim}, "
                f"metric={self.metric!r}, gt_k={self.gt_ids.shape[1]})")


# --------------------------------------------------------------------------- manpages

def load_manpages(shared_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """The manpages-minilm set, as float32 and L2-normalised (its ground truth is by cosine).

    Looked for under ``shared_dir``, else ``$TIERSTORE_SHARED``, else ``<repo>/../shared/data``;
    each may be the data folder itself or the folder holding ``manpages-minilm/``.
    """
    tried = []
    candidates = [shared_dir] if shared_dir is not None else [
        os.environ.get("TIERSTORE_SHARED"), os.path.join(os.path.dirname(_HERE), "..", "shared", "data")]
    for root in candidates:
        if not root:
            continue
        for folder in (os.path.join(root, MANPAGES_DIR), os.path.join(root, "data", MANPAGES_DIR), root):
            folder = os.path.abspath(folder)
            tried.append(folder)
            if os.path.isfile(os.path.join(folder, "base.npy")) and os.path.isfile(os.path.join(folder, "gt_ids.npy")):
                return Dataset("manpages", _normalised(np.load(os.path.join(folder, "base.npy"))),
                               _normalised(np.load(os.path.join(folder, "queries.npy"))),
                               np.load(os.path.join(folder, "gt_ids.npy")), "ip", 384)
    raise FileNotFoundError(
        f"{MANPAGES_DIR} (base.npy, queries.npy, gt_ids.npy) not found; looked in {tried}. Pass "
        f"shared_dir= or set TIERSTORE_SHARED to the folder that holds {MANPAGES_DIR}/ (the shared data dir).")


def _normalised(vectors: np.ndarray) -> np.ndarray:
    out = np.ascontiguousarray(vectors, dtype=np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


# --------------------------------------------------------------------------- synthetic

def _mixture(dim: int, seed: int, clusters: int = 100, rank: int = 24) -> dict[str, np.ndarray]:
    """The cluster parameters: centres, principal directions and spreads, sizes.

    Few broad clusters, each a ``rank``-dimensional anisotropic Gaussian plus a little
    isotropic noise: neighbourhoods are locally ~24-dimensional, like SIFT's, and an IVF
    cell boundary cuts through dense regions. (With ~1,000 narrow clusters IVF was far
    too easy: one probed list out of 1,024 already gave recall@10 0.8-0.9 at n=100k.)
    """
    rng = np.random.default_rng([seed, 0])
    # SIFT bins: non-negative, skewed (mean ~20 before clipping).
    centres = rng.gamma(1.0, 20.0, size=(clusters, dim))
    directions = rng.standard_normal((clusters, rank, dim))
    directions /= np.linalg.norm(directions, axis=2, keepdims=True)
    # Zipf-like decay of spread along the principal directions; sizes and spreads of the
    # clusters are Zipf-like too, in independent random orders.
    direction_sd = 100.0 * np.arange(1, rank + 1) ** -0.2
    spread = rng.permutation(np.arange(1, clusters + 1) ** -0.1)
    weights = rng.permutation(np.arange(1, clusters + 1) ** -0.7)
    return {"centres": centres, "directions": directions * direction_sd[None, :, None],
            "spread": spread, "noise_sd": np.full(clusters, 5.0), "weights": weights / weights.sum()}


def _draw(mixture: dict[str, np.ndarray], rows: int, rng: np.random.Generator) -> np.ndarray:
    labels = rng.choice(len(mixture["weights"]), size=rows, p=mixture["weights"])
    out = np.empty((rows, mixture["centres"].shape[1]), dtype=np.float32)
    order = np.argsort(labels, kind="stable")
    cluster_ids, starts = np.unique(labels[order], return_index=True)
    for cluster, lo, hi in zip(cluster_ids, starts, [*starts[1:], rows]):
        members = order[lo:hi]
        rank = mixture["directions"].shape[1]
        along = rng.standard_normal((len(members), rank)) @ mixture["directions"][cluster]
        noise = rng.standard_normal(along.shape) * mixture["noise_sd"][cluster]
        out[members] = mixture["centres"][cluster] + mixture["spread"][cluster] * (along + noise)
    return np.clip(np.rint(out), 0, 255)


def generate_synthetic(n: int, dim: int = 128, nq: int = 10_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """SIFT-like ``(base, queries)`` as uint8, deterministic in every argument.

    Rows are drawn in fixed chunks of :data:`CHUNK_ROWS`, each from its own random
    stream, so memory stays bounded; queries come from separate streams of the same
    mixture (independent draws, disjoint from the base).
    """
    if n < 1 or nq < 1 or dim < 1:
        raise ValueError(f"n, nq and dim must be positive, got n={n}, nq={nq}, dim={dim}")
    mixture = _mixture(dim, seed)

    def draw(stream: int, rows: int) -> np.ndarray:
        out = np.empty((rows, dim), dtype=np.uint8)
        for chunk, start in enumerate(range(0, rows, CHUNK_ROWS)):
            stop = min(rows, start + CHUNK_ROWS)
            out[start:stop] = _draw(mixture, stop - start, np.random.default_rng([seed, stream, chunk]))
        return out

    return draw(1, n), draw(2, nq)


def exact_neighbours(base: np.ndarray, queries: np.ndarray, k: int = GT_K, *, metric: str = "l2",
                     block: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` ``(distances, ids)`` by faiss ``IndexFlatL2``/``IndexFlatIP``, in query blocks."""
    import faiss

    index = (faiss.IndexFlatL2 if metric == "l2" else faiss.IndexFlatIP)(base.shape[1])
    index.add(np.ascontiguousarray(base, dtype=np.float32))
    k = min(k, len(base))
    distances = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), block):
        stop = min(len(queries), start + block)
        distances[start:stop], ids[start:stop] = index.search(
            np.ascontiguousarray(queries[start:stop], dtype=np.float32), k)
    return distances, ids


def synthetic(n: int = 1_000_000, dim: int = 128, nq: int = 10_000, seed: int = 0, *,
              cache_dir: str | os.PathLike[str] | None = DEFAULT_CACHE_DIR, verbose: bool = False) -> Dataset:
    """The SIFT-like set of :func:`generate_synthetic` with exact top-100 ground truth (L2).

    Vectors and ground truth are cached as .npy under ``cache_dir`` in a folder keyed by
    every parameter and :data:`GENERATOR_VERSION` (``cache_dir=None``: no cache). The
    ground truth uses every core faiss may use; 1M x 10k queries takes a few minutes on
    two cores, once.
    """
    params = {"generator": "sift-like-mixture", "version": GENERATOR_VERSION, "n": n, "dim": dim, "nq": nq,
              "seed": seed, "chunk_rows": CHUNK_ROWS, "gt_k": GT_K}
    name = {100_000: "synthetic-100k", 1_000_000: "synthetic-1m"}.get(n, f"synthetic-{n}") if dim == 128 else \
        f"synthetic-{n}x{dim}"
    folder = None
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
        folder = os.path.join(os.fspath(cache_dir), f"synthetic-n{n}-d{dim}-q{nq}-s{seed}-{key}")
        cached = _read_cache(folder, params)
        if cached is not None:
            base, queries, gt_ids = cached
            return Dataset(name, base.astype(np.float32), queries.astype(np.float32), gt_ids, "l2", dim)
    log = (lambda text: print(text, file=sys.stderr, flush=True)) if verbose else (lambda text: None)
    started = time.perf_counter()
    base, queries = generate_synthetic(n, dim, nq, seed)
    generate_s = time.perf_counter() - started
    log(f"{name}: generated {n:,} + {nq:,} vectors in {generate_s:.1f} s")
    base_f32, queries_f32 = base.astype(np.float32), queries.astype(np.float32)
    started = time.perf_counter()
    _, gt_ids = exact_neighbours(base_f32, queries_f32, GT_K)
    gt_s = time.perf_counter() - started
    log(f"{name}: exact top-{GT_K} of {nq:,} queries by IndexFlatL2 in {gt_s:.1f} s")
    gt_ids = gt_ids.astype(np.int32)
    if folder is not None:
        _write_cache(folder, {**params, "generate_s": round(generate_s, 2), "gt_s": round(gt_s, 2)},
                     {"base": base, "queries": queries, "gt_ids": gt_ids})
    return Dataset(name, base_f32, queries_f32, gt_ids, "l2", dim)


def _read_cache(folder: str, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    try:
        with open(os.path.join(folder, "params.json"), encoding="utf-8") as handle:
            stored = json.load(handle)
        if any(stored.get(key) != value for key, value in params.items()):
            return None
        return tuple(np.load(os.path.join(folder, f"{part}.npy")) for part in ("base", "queries", "gt_ids"))
    except (OSError, ValueError):
        return None


def _write_cache(folder: str, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write into a temporary sibling, then rename: a crash never leaves a half cache."""
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        for part, array in arrays.items():
            np.save(os.path.join(staging, f"{part}.npy"), array)
        with open(os.path.join(staging, "params.json"), "w", encoding="utf-8") as handle:
            json.dump(params, handle, indent=2)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cache_info(dataset_name: str, cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR) -> dict[str, Any] | None:
    """The params.json (with generate_s and gt_s) of a cached synthetic set, if any."""
    if not os.path.isdir(cache_dir):
        return None
    n = {"synthetic-100k": 100_000, "synthetic-1m": 1_000_000}.get(dataset_name)
    for entry in sorted(os.listdir(cache_dir)):
        if n is not None and entry.startswith(f"synthetic-n{n}-"):
            try:
                with open(os.path.join(cache_dir, entry, "params.json"), encoding="utf-8") as handle:
                    info = json.load(handle)
            except (OSError, ValueError):
                continue
            if info.get("version") == GENERATOR_VERSION:
                return info
    return None


DATASETS: dict[str, Callable[..., Dataset]] = {
    "manpages": load_manpages,
    "synthetic-100k": lambda **kw: synthetic(n=100_000, **kw),
    "synthetic-1m": lambda **kw: synthetic(n=1_000_000, **kw),
}


def load_dataset(name: str, **kwargs: Any) -> Dataset:
    """One of :data:`DATASETS` by name (keyword arguments go to its loader)."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}") from None
    return loader(**kwargs)


# --------------------------------------------------------------------------- recall

def recall_at_k(found_ids: np.ndarray, gt_ids: np.ndarray, k: int = 10) -> float:
    """Mean over queries of |top-k found  ∩  true top-k| / k.

    ``found_ids`` (nq, >= k) nearest first; -1 (no result) never matches; a repeated id
    counts once.
    """
    found = np.asarray(found_ids)
    truth = np.asarray(gt_ids)
    if found.ndim != 2 or truth.ndim != 2 or len(found) != len(truth):
        raise ValueError(f"found_ids and gt_ids must be (nq, k) with the same nq, got {found.shape} and {truth.shape}")
    if found.shape[1] < k or truth.shape[1] < k:
        raise ValueError(f"need at least k={k} columns, got {found.shape[1]} found and {truth.shape[1]} true")
    if len(found) == 0:
        return float("nan")
    # (nq, k true, k found): each true neighbour counted at most once.
    hits = (truth[:, :k, None] == found[:, None, :k]).any(axis=2)
    return float(hits.sum() / (len(found) * k))

