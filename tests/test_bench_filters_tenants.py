"""bench/filters.py and bench/tenants.py run end to end on a slice of manpages and report what they promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "manpages-minilm")

pytestmark = pytest.mark.skipif(not os.path.isdir(DATA), reason="../shared/data/manpages-minilm absent")


def run_bench(script: str, args: list[str], tmp_path) -> tuple[str, dict]:
    """Run ``bench/<script>`` on 8,000 rows with ``args``; its stdout and JSON report."""
    out = tmp_path / "report.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", script), "--rows", "8000", "--rounds", "1",
           "--json", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_filters_bench_smoke(tmp_path):
    _, report = run_bench("filters.py", ["--queries", "40"], tmp_path)
    ours = [row for row in report["results"] if row["system"].startswith("tierstore")]
    assert {row["plan"] for row in ours} == {"exact", "filtered_ivf"}
    assert all(row["full"] == 1.0 for row in ours)  # always min(k, matches) results
    assert all(row["recall"] == 1.0 for row in ours if row["plan"] == "exact")
    assert all(row["recall"] >= 0.8 for row in ours) and all(row["qps"] > 0 for row in report["results"])


def test_tenants_bench_smoke(tmp_path):
    stdout, report = run_bench("tenants.py", ["--tenants", "60", "--queries", "60"], tmp_path)
    assert "at similar recall" in stdout and "memory (MiB)" in stdout
    summary = {row["bucket"]: row for row in report["summary"]}
    assert {"small", "medium"} <= set(summary)
    for row in report["results"]:
        assert 0.0 <= row["recall"] <= 1.0 and row["p50_us"] > 0
        if row["system"] == "tierstore (exact plan)":
            assert row["recall"] == 1.0  # the exact plan is exact
    memory = report["memory"]
    assert memory["tenant_index_offloaded"] <= memory["tenant_index_warm"]
    assert 1.0 < memory["ratio_tenant_total_vs_shared_index"] < 2.0
