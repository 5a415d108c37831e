"""bench/tenants.py runs end to end on a slice of manpages and reports what it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "manpages-minilm")

pytestmark = pytest.mark.skipif(not os.path.isdir(DATA), reason="../shared/data/manpages-minilm absent")


def test_tenants_bench_smoke(tmp_path):
    out = tmp_path / "tenants.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "tenants.py"), "--rows", "8000", "--tenants", "60",
           "--queries", "60", "--rounds", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at similar recall" in proc.stdout and "memory (MiB)" in proc.stdout
    report = json.loads(out.read_text())
    summary = {row["bucket"]: row for row in report["summary"]}
    assert {"small", "medium"} <= set(summary)
    for row in report["results"]:
        assert 0.0 <= row["recall"] <= 1.0 and row["p50_us"] > 0
        if row["system"] == "tierstore (exact plan)":
            assert row["recall"] == 1.0  # the exact plan is exact
    memory = report["memory"]
    assert memory["tenant_index_offloaded"] <= memory["tenant_index_warm"]
    assert 1.0 < memory["ratio_tenant_total_vs_shared_index"] < 2.0
