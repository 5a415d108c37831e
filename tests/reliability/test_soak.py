"""Resource bounds: a short soak of mixed search, ingest, delete and KV traffic leaves RSS,
pinned memory, open files and threads flat after warm-up, with every check passing.

bench/soak.py is the 30-minute version (not in CI); this runs its :func:`run_soak` for
``TIERSTORE_SOAK_SECONDS`` (default 60; 120 with ``TIERSTORE_RELIABILITY=full``) on the
local LMDB tier, and in full mode on S3 (moto) too. The bounds are bench/soak.py's:
the last 25% of samples may exceed the 20% after warm-up (the first 20%) by at most
64 MiB (or 10%) of RSS, 16 MiB pinned memory and 64 (or 50%) blobs in the tier, comparing
medians, and by 8 fds and 4 threads, comparing minimums (pools and OpenMP teams come and
go; a leak raises the floor). Every sample is taken after ``gc.collect()``; on 2 busy
cores the growth seen in 60 s is 10-20 MiB of RSS and none of the rest.
bench/ is not a package: its folder goes on sys.path, as the benchmark scripts do themselves.
"""

from __future__ import annotations

import os
import sys
import threading

import pytest

from ..conftest import BUCKET
from ._report import REPORT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench")
FULL = os.environ.get("TIERSTORE_RELIABILITY") == "full"
SECONDS = float(os.environ.get("TIERSTORE_SOAK_SECONDS", "120" if FULL else "60"))
# Work a 2-core CI machine does at the least, per second of soak (about a quarter of what
# one idle core does); too little means the soak measured nothing.
MIN_RATES = {"add": 1.0, "delete": 0.5, "upsert": 0.15, "tenant_add": 0.5, "tenant_delete": 0.5, "search": 3.0,
             "filtered_search": 3.0, "tenant_search": 3.0, "search_check": 1.0, "kv_put": 3.0, "kv_get": 9.0,
             "kv_delete": 2.0}


@pytest.fixture(scope="module")
def soak_bench():
    pytest.importorskip("torch")  # the KV traffic
    sys.path.insert(0, BENCH)
    try:
        import soak
    finally:
        sys.path.remove(BENCH)
    assert os.path.dirname(os.path.abspath(soak.__file__)) == BENCH, f"'soak' resolved to {soak.__file__}"
    return soak


def assert_soak_within_bounds(report: dict, seconds: float) -> None:
    """No error or failed check, real work of every kind, and every resource flat after warm-up."""
    assert report["errors"] == 0, f"{report['errors']} errors/failed checks, first: {report['messages']}"
    for kind, rate in MIN_RATES.items():
        done = report["ops"].get(kind, 0)
        assert done >= rate * seconds, f"only {done} {kind} calls in {seconds:.0f} s (want >= {rate * seconds:.0f})"
    assert report["ops"]["build_index"] >= 2, f"only {report['ops']['build_index']} index builds"
    assert report["manifest_versions"] >= seconds / 10, "too few checkpoints: the WAL was not folded in"
    assert len(report["samples"]) >= 20, f"only {len(report['samples'])} samples"
    grown = [row for row in report["verdict"] if not row["ok"]]
    assert not grown, "grew after warm-up: " + "; ".join(
        f"{row['resource']} {row['baseline']:.0f} -> {row['end']:.0f} (allowed +{row['allowed']:.0f})" for row in grown)
    assert {row["resource"] for row in report["verdict"]} >= {"rss", "pinned", "fds", "threads", "keys"}
    assert report["ok"]


@pytest.mark.timeout(int(SECONDS * 2 + 240))
@pytest.mark.parametrize("tier", ["lmdb", pytest.param("s3", marks=pytest.mark.skipif(
    not FULL, reason="S3 soaks in TIERSTORE_RELIABILITY=full only"))])
def test_mixed_traffic_leaves_resources_flat(soak_bench, tier, tmp_path, request):
    location = {}
    if tier == "s3":
        location = {"endpoint_url": request.getfixturevalue("moto_server").endpoint_url, "bucket": BUCKET}
    threads_before = {t.ident for t in threading.enumerate()}
    report = soak_bench.run_soak(SECONDS, tier, str(tmp_path), sample_seconds=max(1.0, SECONDS / 30), **location)
    assert_soak_within_bounds(report, SECONDS)
    # (build_index makes no tqdm bar without progress: even a disabled one starts tqdm's
    # monitor thread, which outlived the database)
    left = [t.name for t in threading.enumerate() if t.ident not in threads_before]
    assert not left, f"threads left running after the database closed: {left}"
    REPORT[f"soak seconds ({tier})"] += round(report["seconds"])
    REPORT[f"soak operations ({tier})"] += sum(report["ops"].values())


def test_growth_verdict_flags_growth_past_the_bounds(soak_bench):
    mib = soak_bench.MiB

    def samples(rss_mib, fds, threads):
        return [{"t": float(i), "rss": int(r * mib), "pinned": 0, "gpu": None, "fds": f, "threads": n}
                for i, (r, f, n) in enumerate(zip(rss_mib, fds, threads))]

    # warm-up growth, then flat with transient threads (a pool or an OpenMP team) near the end
    flat = samples([200, 250, 300] + [300, 301, 299, 302, 300, 301, 300, 299, 302, 301, 300, 302, 301, 300, 301],
                   [10] * 18, [15, 23, 15] + [15] * 12 + [30, 15, 31])
    assert all(row["ok"] for row in soak_bench.growth_verdict(flat))
    leaking = samples([200 + 10 * i for i in range(18)], [10 + i for i in range(18)], [15] * 18)
    verdict = {row["resource"]: row for row in soak_bench.growth_verdict(leaking)}
    assert not verdict["rss"]["ok"] and verdict["rss"]["growth"] == pytest.approx(100 * mib)
    assert not verdict["fds"]["ok"] and verdict["threads"]["ok"] and verdict["pinned"]["ok"]
    assert "gpu" not in verdict
