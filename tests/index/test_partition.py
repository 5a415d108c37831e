"""Balanced k-means and boundary replication: bounded lists, determinism, better probe coverage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tierstore.errors import InvalidArgument
from tierstore.index.clustering import assign_nearest, balanced_kmeans
from tierstore.index.replication import group_posting_lists, replicate_boundary


SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "manpages-minilm"


@pytest.fixture(scope="module")
def manpages():
    """20,000 real MiniLM vectors, 300 queries and their exact top-10 within that subset."""
    if not (SHARED / "base.npy").exists():
        pytest.skip(f"dataset not found at {SHARED}")
    x = np.load(SHARED / "base.npy")[:20_000].astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = np.load(SHARED / "queries.npy")[:300].astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    _, truth = assign_nearest(queries, x, metric="ip", k=10)
    return x, queries, truth


def clustered(n: int, d: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d)).astype(np.float32) * 4
    sizes = rng.zipf(1.6, clusters).astype(float)
    labels = rng.choice(clusters, size=n, p=sizes / sizes.sum())
    return (centers[labels] + rng.normal(size=(n, d)).astype(np.float32)).astype(np.float32)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_lists_are_bounded_and_cover_every_vector(metric):
    x = clustered(20_000)
    if metric == "ip":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    part = balanced_kmeans(x, target_list_size=100, max_list_size=200, metric=metric, seed=3)
    sizes = part.list_sizes()
    assert sizes.sum() == x.shape[0]
    assert sizes.min() >= 1 and sizes.max() <= 200
    assert 60 <= part.nlist <= 400          # about n / target lists
    assert np.median(sizes) >= 40           # balanced, not a few giants and many crumbs


def test_duplicates_still_split_to_the_bound():
    x = np.repeat(np.ones((1, 8), dtype=np.float32), 1_000, axis=0)   # k-means cannot separate these
    part = balanced_kmeans(x, target_list_size=50, max_list_size=100)
    assert part.list_sizes().max() <= 100 and part.list_sizes().sum() == 1_000


def test_deterministic_for_a_seed():
    x = clustered(5_000, seed=1)
    a = balanced_kmeans(x, target_list_size=64, seed=9)
    b = balanced_kmeans(x, target_list_size=64, seed=9)
    assert np.array_equal(a.assignment, b.assignment) and np.array_equal(a.centroids, b.centroids)


def test_bad_arguments():
    x = clustered(100)
    with pytest.raises(InvalidArgument):
        balanced_kmeans(x, target_list_size=0)
    with pytest.raises(InvalidArgument):
        balanced_kmeans(x, target_list_size=10, metric="cosine-ish")
    with pytest.raises(InvalidArgument):
        balanced_kmeans(x[:0], target_list_size=10)
    with pytest.raises(InvalidArgument):
        balanced_kmeans(x, target_list_size=10, max_list_size=5)


def test_replicas_obey_closure_and_rng_rules():
    x = clustered(3_000, seed=2)
    part = balanced_kmeans(x, target_list_size=50, seed=0)
    chosen = replicate_boundary(x, part.centroids, part.assignment, max_replicas=4, closure=1.6, rng_factor=0.1)
    assert np.array_equal(chosen[:, 0], part.assignment)
    c = part.centroids
    for row in range(0, 3_000, 37):
        lists = chosen[row][chosen[row] >= 0]
        assert len(set(lists.tolist())) == len(lists)                     # no list twice
        d = ((x[row] - c[lists]) ** 2).sum(axis=1)
        assert np.all(d[1:] <= 1.6 * d[0] + 1e-3)                         # closure
        for i in range(1, len(lists)):                                    # RNG rule
            gaps = ((c[lists[:i]] - c[lists[i]]) ** 2).sum(axis=1)
            assert np.all(gaps >= 0.1 * d[i] - 1e-3)
    assert (chosen[:, 1] >= 0).mean() > 0.05                              # some vectors do get replicas


def test_posting_lists_group_rows():
    assignments = np.array([[0, 2], [1, -1], [0, 1], [2, -1]])
    offsets, rows = group_posting_lists(assignments, nlist=4)
    assert offsets.tolist() == [0, 2, 4, 6, 6]
    assert rows.tolist() == [0, 2, 1, 2, 0, 3]


def test_replication_raises_probe_coverage(manpages):
    """The point of replication: on real embeddings the true neighbours of a query sit in
    the lists it probes more often, so fewer probes reach the same recall."""
    x, queries, truth = manpages
    part = balanced_kmeans(x, target_list_size=64, metric="ip", seed=0)
    _, probed = assign_nearest(queries, part.centroids, metric="ip", k=16)

    def coverage(assignments, nprobe):
        member = np.zeros((x.shape[0], part.nlist), dtype=bool)
        rows = np.broadcast_to(np.arange(x.shape[0])[:, None], assignments.shape)
        ok = assignments >= 0
        member[rows[ok], assignments[ok]] = True
        return member[truth[:, :, None], probed[:, None, :nprobe]].any(axis=2).mean()

    replicas = replicate_boundary(x, part.centroids, part.assignment, max_replicas=4, closure=1.3, metric="ip")
    assert 1.1 < (replicas >= 0).sum(axis=1).mean() < 2.0      # a modest amount of extra storage
    assert coverage(replicas, 8) >= coverage(part.assignment[:, None], 8) + 0.03
    plain_8, plain_16 = coverage(part.assignment[:, None], 8), coverage(part.assignment[:, None], 16)
    assert coverage(replicas, 8) >= (plain_8 + plain_16) / 2   # over half the gain of doubling the probes
