"""Posting lists scanned with torch on a device (the GPU tier); runs on the CPU here, CUDA when present."""

from __future__ import annotations

import numpy as np
import pytest

import tierstore

from .conftest import recall

torch = pytest.importorskip("torch")

DEVICES = ["cpu"] + [pytest.param("cuda", marks=pytest.mark.gpu)] * torch.cuda.is_available()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantizer", ["sq8", "sq4", "pq4fs"])
def test_torch_scan_matches_faiss_scan(tmp_path, blobs, quantizer, device):
    xb, xq, truth = blobs
    with tierstore.connect(tmp_path / "db") as db:
        col = db.create_collection("c", dim=32)
        col.add(np.arange(len(xb)), xb)
        col.build_index(quantizer=quantizer, target_list_size=64)
        faiss_res = col.search(xq, k=10, nprobe=16, rerank=8)
    with tierstore.connect(tmp_path / "db", scan_device=device) as db:
        col = db.collection("c")
        assert type(col.index.scanner).__name__ == "TorchScanner"
        torch_res = col.search(xq, k=10, nprobe=16, rerank=8)
        single = col.search(xq[0], k=10, nprobe=16, rerank=8)
        pruned = col.search(xq, k=10, nprobe=16, rerank=8, prune_ratio=1.5)
    assert recall(torch_res.ids, truth) >= recall(faiss_res.ids, truth) - 0.01
    assert recall(torch_res.ids, truth) >= 0.95
    assert (torch_res.ids == faiss_res.ids).mean() > 0.97  # same lists, same codes, float error aside
    assert single.ids[0].tolist() == torch_res.ids[0].tolist()
    assert pruned.stats["lists_probed"] < xq.shape[0] * 16
    for row in torch_res.ids:
        assert len(set(row.tolist())) == 10


def test_torch_scan_after_updates(tmp_path, blobs):
    xb, xq, _ = blobs
    with tierstore.connect(tmp_path / "db", scan_device="cpu", flush_rows=500) as db:
        col = db.create_collection("c", dim=32)
        col.add(np.arange(10_000), xb[:10_000])
        col.build_index(quantizer="sq8", target_list_size=64)
        col.add(np.arange(10_000, 11_000), xb[10_000:11_000])
        col.delete(np.arange(0, 500))
        col.flush()
        res = col.search(xb[10_000:10_100], k=1, nprobe=16)
        assert (res.ids[:, 0] == np.arange(10_000, 10_100)).mean() > 0.97
        assert not np.isin(np.arange(500), col.search(xb[:500], k=5, nprobe=16).ids).any()


def test_unsupported_quantizer_is_a_config_error(tmp_path, blobs):
    xb, _, _ = blobs
    with tierstore.connect(tmp_path / "db") as db:
        col = db.create_collection("c", dim=32)
        col.add(np.arange(2_000), xb[:2_000])
        col.build_index(quantizer="rabitq", target_list_size=64)
    with pytest.raises(tierstore.ConfigError, match="rabitq"):
        with tierstore.connect(tmp_path / "db", scan_device="cpu") as db:
            db.collection("c")


@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_scan_of_large_unnormalised_vectors(tmp_path, blobs, device):
    """A GPU holds the lists in float16, whose range ends at 65,504: dots of vectors with
    norms in the thousands (SIFT-like data) must not overflow to inf and lose the ranking."""
    xb, xq, truth = blobs
    xb, xq = xb * 1000, xq * 1000  # the same neighbours; dots around 1e6 and more
    with tierstore.connect(tmp_path / "db", scan_device=device) as db:
        col = db.create_collection("c", dim=32)
        col.add(np.arange(len(xb)), xb)
        col.build_index(quantizer="sq8", target_list_size=64)
        scanner = col.index.scanner
        scanner.dtype, scanner._arena = torch.float16, None  # what a CUDA device uses, here on any device
        res = col.search(xq, k=10, nprobe=16, rerank=8)
        plain = col.search(xq, k=10, nprobe=16, rerank=0)
    assert float(np.max(np.abs(xb @ xq.T))) > 65_504  # the products would overflow float16 unscaled
    assert recall(res.ids, truth) >= 0.95
    assert recall(plain.ids, truth) >= 0.85  # the code scores themselves rank, not a column of infs
    assert np.isfinite(plain.distances).all()
