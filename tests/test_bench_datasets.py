"""bench/datasets.py (synthetic generator, ground truth, cache, recall, manpages loader)
and a tiny end-to-end run of bench/ann.py. bench/ is not a package: its folder goes on
sys.path, as the benchmark scripts do themselves."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import datasets as bench_datasets  # noqa: E402

assert os.path.dirname(os.path.abspath(bench_datasets.__file__)) == BENCH, \
    f"'datasets' resolved to {bench_datasets.__file__}, not bench/datasets.py"

from datasets import (Dataset, generate_synthetic, load_dataset, load_manpages,  # noqa: E402
                      recall_at_k, synthetic)

SMALL = {"n": 3000, "dim": 16, "nq": 40}


def brute_force_l2(base: np.ndarray, queries: np.ndarray) -> np.ndarray:
    diff = queries[:, None, :].astype(np.float64) - base[None, :, :].astype(np.float64)
    return (diff ** 2).sum(axis=2)


# --------------------------------------------------------------------------- synthetic

def test_generator_is_deterministic_and_sift_like():
    base, queries = generate_synthetic(seed=7, **SMALL)
    again_base, again_queries = generate_synthetic(seed=7, **SMALL)
    assert base.tobytes() == again_base.tobytes() and queries.tobytes() == again_queries.tobytes()
    other, _ = generate_synthetic(seed=8, **SMALL)
    assert other.tobytes() != base.tobytes()
    assert base.shape == (3000, 16) and queries.shape == (40, 16) and base.dtype == np.uint8
    assert 0.05 < (base == 0).mean() < 0.6, "clipped at zero like SIFT bins"
    # Queries are fresh draws from the mixture, not copies of base rows.
    assert brute_force_l2(base, queries).min() > 0


def test_generator_is_chunked_and_bounded(monkeypatch):
    # Each chunk has its own stream: chunking changes the values (so it is part of the
    # definition), and the same chunking always gives the same bytes.
    whole, _ = generate_synthetic(n=1000, dim=8, nq=1)
    monkeypatch.setattr(bench_datasets, "CHUNK_ROWS", 300)
    chunked, _ = generate_synthetic(n=1000, dim=8, nq=1)
    assert chunked.tobytes() == generate_synthetic(n=1000, dim=8, nq=1)[0].tobytes()
    assert chunked.tobytes() != whole.tobytes()


def test_ground_truth_is_exact_and_cached(tmp_path):
    dataset = synthetic(seed=1, cache_dir=tmp_path, **SMALL)
    assert dataset.metric == "l2" and dataset.dim == 16 and dataset.gt_ids.shape == (40, 100)
    assert dataset.base.dtype == np.float32 and dataset.base.flags.c_contiguous
    distances = brute_force_l2(dataset.base, dataset.queries)
    expected = np.sort(distances, axis=1)[:, :100]
    got = np.take_along_axis(distances, dataset.gt_ids.astype(np.int64), axis=1)
    # Compared by distance: integer data has ties, whose order is arbitrary.
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert all(len(set(row)) == 100 for row in dataset.gt_ids)

    (folder,) = os.listdir(tmp_path)
    cached = synthetic(seed=1, cache_dir=tmp_path, **SMALL)
    assert os.listdir(tmp_path) == [folder]
    assert np.array_equal(cached.base, dataset.base) and np.array_equal(cached.gt_ids, dataset.gt_ids)

    # Other parameters: another cache entry. Stale params.json: regenerated, same result.
    synthetic(seed=2, cache_dir=tmp_path, **SMALL)
    assert len(os.listdir(tmp_path)) == 2
    params_path = tmp_path / folder / "params.json"
    params = json.loads(params_path.read_text())
    params_path.write_text(json.dumps({**params, "version": -1}))
    regenerated = synthetic(seed=1, cache_dir=tmp_path, **SMALL)
    assert np.array_equal(regenerated.gt_ids, dataset.gt_ids)
    assert json.loads(params_path.read_text())["version"] == params["version"]


def test_dataset_validates_its_arrays():
    base = np.zeros((10, 4), dtype=np.float32)
    gt = np.zeros((2, 3), dtype=np.int64)
    with pytest.raises(ValueError, match="metric"):
        Dataset("x", base, base[:2], gt, "cosine", 4)
    with pytest.raises(ValueError, match="float32"):
        Dataset("x", base.astype(np.float64), base[:2], gt, "l2", 4)
    with pytest.raises(ValueError, match="C-contiguous"):
        Dataset("x", np.asfortranarray(base), base[:2], gt, "l2", 4)
    with pytest.raises(ValueError, match="one row per query"):
        Dataset("x", base, base[:3], gt, "l2", 4)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("sift1b")


# --------------------------------------------------------------------------- recall

def test_recall_at_k_on_hand_made_cases():
    truth = np.array([[1, 2, 3, 4, 9], [5, 6, 7, 8, 9]])
    assert recall_at_k(truth, truth, k=4) == 1.0
    assert recall_at_k(truth[:, [3, 2, 1, 0]], truth, k=4) == 1.0  # order inside top-k is free
    found = np.array([[1, 2, 2, 2], [8, 7, -1, -1]])
    assert recall_at_k(found, truth, k=4) == pytest.approx(0.5)  # a repeated id counts once; -1 never
    assert recall_at_k(np.full((2, 4), -1), truth, k=4) == 0.0
    # Only the top k of each side count: 9 is in both but beyond k=4 on the truth side.
    assert recall_at_k(np.array([[9, 1, 2, 3], [9, 5, 6, 7]]), truth, k=4) == pytest.approx(0.75)
    assert recall_at_k(np.array([[1], [5]]), truth, k=1) == 1.0
    with pytest.raises(ValueError, match="at least k"):
        recall_at_k(found, truth, k=10)
    with pytest.raises(ValueError, match="same nq"):
        recall_at_k(found[:1], truth, k=2)


# --------------------------------------------------------------------------- manpages

def test_manpages_missing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="TIERSTORE_SHARED"):
        load_manpages(tmp_path)


def test_manpages_shapes_and_normalisation():
    try:
        dataset = load_manpages()
    except FileNotFoundError as exc:
        pytest.skip(f"manpages-minilm not available: {exc}")
    assert (dataset.name, dataset.metric, dataset.dim) == ("manpages", "ip", 384)
    assert dataset.base.shape == (50_000, 384) and dataset.queries.shape == (5_000, 384)
    assert dataset.gt_ids.shape == (5_000, 100)
    np.testing.assert_allclose(np.linalg.norm(dataset.base[::97], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(dataset.queries[::97], axis=1), 1.0, atol=1e-5)
    # Spot-check the shipped ground truth by brute force on a few queries.
    scores = dataset.queries[:5] @ dataset.base.T
    top = np.argsort(-scores, axis=1)[:, :10]
    assert recall_at_k(top, dataset.gt_ids[:5], k=10) >= 0.98


# --------------------------------------------------------------------------- bench/ann.py

def test_ann_benchmark_end_to_end(tmp_path):
    import ann

    dataset = synthetic(seed=0, cache_dir=None, n=4000, dim=16, nq=200)
    systems = ann.select_systems(ann.faiss_systems(dataset, ann.Options(quick=True, nlists=(32,))), "flat,ivf-flat")
    records = ann.run(dataset, systems, rounds=1, single_queries=20, recall_queries=200, pass_seconds=0.01,
                      build_threads=1, log=lambda text: None)
    flat = [r for r in records if r["system"] == "faiss-flat"]
    ivf = [r for r in records if r["system"] == "faiss-ivf-flat"]
    assert flat[0]["recall_at_10"] >= 0.999  # exact search, up to ties on integer data
    assert [r["setting"]["nprobe"] for r in ivf] == [8, 16, 24, 32]  # nprobe 64 > nlist is skipped
    assert ivf[-1]["recall_at_10"] > ivf[0]["recall_at_10"] > 0.5
    assert all(r["qps_single"] > 0 and r["qps_batch100"] > 0 and r["index_bytes"] > 0 for r in records)
    summaries = {s["system"]: s for s in ann.summarise(systems, records)}
    assert summaries["faiss-flat"]["qps_single_at_95"] == flat[0]["qps_single"]
    front = summaries["faiss-ivf-flat"]["pareto"]
    assert [p["recall_at_10"] for p in front] == sorted(p["recall_at_10"] for p in front)
    assert all(a["qps_single"] > b["qps_single"] for a, b in zip(front, front[1:]))


def test_pareto_and_best_at_recall():
    import ann

    records = [{"recall_at_10": r, "qps_single": q} for r, q in [(0.8, 100), (0.9, 50), (0.85, 40), (0.96, 10)]]
    assert [r["recall_at_10"] for r in ann.pareto(records)] == [0.8, 0.9, 0.96]
    assert ann.best_at_recall(records, 0.9)["qps_single"] == 50
    assert ann.best_at_recall(records, 0.97) is None
