"""Data for collection tests: clustered vectors with exact neighbours, and the real man pages."""

from __future__ import annotations

import os

import faiss
import numpy as np
import pytest

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "manpages-minilm")


def clustered(n: int, dim: int, *, clusters: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32) * 4
    sizes = rng.zipf(1.5, clusters).clip(1, 50).astype(float)
    labels = rng.choice(clusters, n, p=sizes / sizes.sum())
    return (centres[labels] + rng.standard_normal((n, dim)).astype(np.float32)).astype(np.float32)


def exact(xb: np.ndarray, xq: np.ndarray, k: int, metric: str = "l2") -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatL2(xb.shape[1]) if metric == "l2" else faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    return index.search(xq, k)


def recall(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(f[:k].tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, truth)]))


@pytest.fixture(scope="session")
def blobs():
    """20,000 x 32 clustered vectors, 200 queries and their exact top-10 (L2)."""
    xb = clustered(20_000, 32)
    xq = clustered(200, 32, seed=1)
    return xb, xq, exact(xb, xq, 10)[1]


@pytest.fixture(scope="session")
def manpages():
    """The real MiniLM man-page embeddings (normalised) with exact top-10; skipped when absent."""
    if not os.path.exists(os.path.join(SHARED, "base.npy")):
        pytest.skip("../shared/data/manpages-minilm is not present")
    xb = np.load(os.path.join(SHARED, "base.npy")).astype(np.float32)
    xq = np.load(os.path.join(SHARED, "queries.npy")).astype(np.float32)[:500]
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    gt = np.load(os.path.join(SHARED, "gt_ids.npy"))[:500, :10]
    return xb, xq, gt
