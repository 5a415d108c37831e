"""bench/gpu.py (KV chunk loads to the device, torch posting-list scans, the gpu tier): a smoke run on the CPU.

The run is forced onto the CPU so that it is the same everywhere; the GPU figures come
from running the script itself on a CUDA machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


def test_gpu_bench_smoke_cli(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, os.path.join(BENCH, "gpu.py"), "--smoke", "--device", "cpu", "--json", str(out),
           "--dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for title in ("1. kv", "2. scan", "3. tier"):
        assert title in proc.stdout
    report = json.loads(out.read_text())

    meta = report["meta"]
    assert meta["bench"] == "gpu" and meta["preset"] == "smoke" and meta["device"] == "cpu"
    assert meta["torch"] and meta["device_name"] == "cpu" and meta["device_note"]
    assert set(meta["section_seconds"]) == {"kv", "scan", "tier"}
    assert meta["notes"] == []  # nothing skipped for time

    kv = report["kv"]
    assert {(r["tier"], r["codec"]) for r in kv} == {(t, c) for t in ("memory", "lmdb", "gpu_cache")
                                                      for c in ("fp16", "int8")}
    for r in kv:
        assert r["device"] == "cpu" and r["decoded_bytes"] == 2 * 8 * 2 * 256 * 64 * 2
        assert r["load_ms"] > 0 and r["load_GBps"] > 0 and r["raw_load_ms"] > 0 and r["h2d_ms"] > 0
        assert r["vs_h2d"] == pytest.approx(r["h2d_ms"] / r["load_ms"])
        assert r["h2d_pinned_ms"] is None  # pinned memory needs CUDA
        if r["codec"] == "fp16":
            assert r["lossless"] and r["verified_equal"] is True and r["max_abs_err"] == 0.0
            assert r["stored_bytes"] >= r["decoded_bytes"]
        else:
            assert not r["lossless"] and r["verified_equal"] is None
            assert 0.0 < r["max_abs_err"] < 1.0  # int8 of unit-scale KV: lossy, but close
            assert r["compression_ratio"] > 1.8
        if r["tier"] == "gpu_cache":
            assert r["gpu_cache_hits"] >= 2  # the timed loads were served by the device cache
    assert set(report["kv_baselines"]) == {"bytelm-man"}

    scan = {r["backend"]: r for r in report["scan"]}
    assert set(scan) == {"faiss-cpu", "torch-cpu", "raw torch cpu float32"}
    for r in scan.values():
        assert r["single_ms"] > 0 and r["batch_qps"] > 0 and r["single_queries"] >= 1
    # The torch scan reads the same sq8 codes as faiss: the same neighbours, float error aside.
    assert scan["faiss-cpu"]["recall_at_10"] >= 0.9
    assert scan["torch-cpu"]["recall_at_10"] >= scan["faiss-cpu"]["recall_at_10"] - 0.02
    assert scan["raw torch cpu float32"]["recall_at_10"] >= 0.99  # exact search in float32
    assert scan["torch-cpu"]["batch_vs_faiss"] == pytest.approx(
        scan["torch-cpu"]["batch_qps"] / scan["faiss-cpu"]["batch_qps"])
    assert report["scan_info"]["rows"] == 5_000 and report["scan_info"]["lists"] > 1

    assert {(r["tier"], r["op"]) for r in report["tier"]} >= {("memory", "get"), ("gpu", "get"), ("gpu", "put")}
