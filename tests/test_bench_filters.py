"""bench/filters.py runs end to end on a slice of manpages and reports what it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "manpages-minilm")

pytestmark = pytest.mark.skipif(not os.path.isdir(DATA), reason="../shared/data/manpages-minilm absent")


def test_filters_bench_smoke(tmp_path):
    out = tmp_path / "filters.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "filters.py"), "--rows", "8000", "--queries", "40",
           "--rounds", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    ours = [row for row in report["results"] if row["system"].startswith("tierstore")]
    assert {row["plan"] for row in ours} == {"exact", "filtered_ivf"}
    assert all(row["full"] == 1.0 for row in ours)  # always min(k, matches) results
    assert all(row["recall"] == 1.0 for row in ours if row["plan"] == "exact")
    assert all(row["recall"] >= 0.8 for row in ours) and all(row["qps"] > 0 for row in report["results"])
