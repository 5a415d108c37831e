"""bench/ann.py's tierstore systems (bench/_tierstore_systems.py) and bench/latency_proxy.py.

bench/ is not a package: its folder goes on sys.path, as the benchmark scripts do themselves.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)

from latency_proxy import LatencyProxy  # noqa: E402

MANPAGES = os.path.join(ROOT, "..", "shared", "data", "manpages-minilm")


# --------------------------------------------------------------------------- latency proxy

class _Echo(socketserver.BaseRequestHandler):
    """Answers every chunk with the same bytes (one "request/response" per chunk)."""

    def handle(self) -> None:
        while True:
            data = self.request.recv(1 << 16)
            if not data:
                return
            self.request.sendall(data)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def echo_server():
    server = _Server(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _exchange(sock: socket.socket, payload: bytes) -> tuple[bytes, float]:
    started = time.perf_counter()
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(1 << 16)
        assert chunk, "connection closed early"
        received += chunk
    return received, time.perf_counter() - started


def test_latency_proxy_delays_each_request_once(echo_server):
    delay = 0.08
    with LatencyProxy(echo_server, delay) as proxy:
        assert proxy.endpoint_url == f"http://127.0.0.1:{proxy.port}"
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            for _ in range(2):  # every request on a kept-alive connection pays the delay
                echoed, seconds = _exchange(sock, b"GET / HTTP/1.1\r\n\r\n")
                assert echoed == b"GET / HTTP/1.1\r\n\r\n"
                assert delay <= seconds < delay + 0.5
            # A large body is delayed once, not once per chunk: it streams behind the first byte.
            payload = np.random.default_rng(0).integers(0, 256, 2 << 20, dtype=np.uint8).tobytes()
            echoed, seconds = _exchange(sock, payload)
            assert echoed == payload
            assert delay <= seconds < 4 * delay + 0.5
        # Two connections in parallel are delayed side by side, not one after the other.
        socks = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(2)]
        try:
            started = time.perf_counter()
            for sock in socks:
                sock.sendall(b"x")
            assert [sock.recv(1) for sock in socks] == [b"x", b"x"]
            assert time.perf_counter() - started < 2 * delay
        finally:
            for sock in socks:
                sock.close()
        stats = proxy.stats()
        assert stats["connections"] == 3 and stats["bytes_up"] == stats["bytes_down"] > 2 << 20


def test_latency_proxy_zero_delay_and_for_url(echo_server):
    host, port = echo_server
    with LatencyProxy.for_url(f"http://{host}:{port}/ignored", 0.0) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            echoed, seconds = _exchange(sock, b"ping")
    assert echoed == b"ping" and seconds < 0.5
    with pytest.raises(ValueError):
        LatencyProxy(echo_server, -1.0)


# --------------------------------------------------------------------------- tierstore systems in ann.py

def test_tierstore_systems_end_to_end_small(tmp_path):
    """Every tierstore system on a tiny synthetic set: memory, cold LMDB, S3, S3 + latency."""
    import ann
    from datasets import synthetic

    dataset = synthetic(seed=0, cache_dir=None, n=4000, dim=16, nq=200)
    options = ann.Options(quick=True, nlists=(32,), cold_queries=30, s3_queries=4, s3_latency_ms=40,
                          workdir=str(tmp_path / "work"))
    available = [system for factory in ann.SYSTEM_FACTORIES.values() for system in factory(dataset, options)]
    systems = ann.select_systems(available, "tierstore,ivf-flat")
    assert [s.name for s in systems] == ["tierstore-mem", "tierstore-lmdb-cold", "tierstore-s3",
                                         "tierstore-s3-40ms", "faiss-ivf-flat"]
    assert [s.name for s in ann.select_systems(available, "tierstore-s3")] == ["tierstore-s3", "tierstore-s3-40ms"]
    records = ann.run(dataset, systems, rounds=1, single_queries=20, recall_queries=200, pass_seconds=0.01,
                      build_threads=1, log=lambda text: None)
    by_system: dict[str, list[dict]] = {}
    for record in records:
        by_system.setdefault(record["system"], []).append(record)
    assert list(by_system) == [s.name for s in systems]  # records keep the systems' order
    assert all(0.0 <= r["recall_at_10"] <= 1.0 and r["qps_single"] > 0 for r in records)
    assert max(r["recall_at_10"] for r in by_system["tierstore-mem"]) > 0.9
    assert os.listdir(tmp_path / "work") == []  # the temporary database is gone

    for name in ("tierstore-lmdb-cold", "tierstore-s3", "tierstore-s3-40ms"):
        for r in by_system[name]:
            assert r["measured"] and r["agrees_with_memory"] == 1.0, (name, r["label"])
            # Posting lists in one round, rerank vectors in another, nothing else.
            assert r["post_rounds"]["max"] <= 1 and r["rr_rounds"]["max"] <= 1 and r["other_rounds"]["max"] == 0
            assert r["rounds"]["mean"] == pytest.approx(r["expected_rounds"]["mean"])
            assert r["rr_reads"]["mean"] > 0 and r["rr_bytes"]["mean"] > 0
            assert 0 < r["resident_bytes"] < 4 * r["raw_vector_bytes"]
            assert r["rss_end"]["rss"] > 0 and r["open_reads"] > 0
    cold = by_system["tierstore-lmdb-cold"]
    from _tierstore_systems import cold_settings

    assert [r["setting"] for r in cold] == list(cold_settings(quick=True))
    assert all(r["recall_queries"] == 200 and r["qps_batch100"] > 0 and r["http_gets"]["mean"] == 0 for r in cold)
    s3, slow = by_system["tierstore-s3"][0], by_system["tierstore-s3-40ms"][0]
    assert s3["single_queries"] == 4 and s3["qps_batch100"] is None
    assert s3["http_gets"]["mean"] >= s3["reads"]["mean"] >= 2 and s3["open_http_gets"] > 0
    # Two dependent rounds of 40 ms each.
    assert slow["latency_ms"]["p50"] >= 2 * 40
    assert slow["latency_ms"]["p50"] > s3["latency_ms"]["p50"]

    summaries = {s["system"]: s for s in ann.summarise(systems, records)}
    assert summaries["tierstore-s3"]["qps_batch100_at_90"] is None
    tables = ann.tier_tables(records, dataset.base.nbytes)
    assert "tierstore-s3-40ms" in tables and "res/raw %" in tables


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(os.path.join(MANPAGES, "base.npy")),
                    reason="../shared/data/manpages-minilm is absent")
def test_ann_cli_manpages_quick_with_tierstore(tmp_path):
    out = tmp_path / "ann.json"
    cmd = [sys.executable, os.path.join(BENCH, "ann.py"), "--dataset", "manpages", "--quick",
           "--systems", "tierstore,ivf-flat", "--json", str(out), "--queries", "300", "--single-queries", "100",
           "--rounds", "1", "--pass-seconds", "0.05", "--cold-queries", "30", "--s3-queries", "3",
           "--s3-latency-ms", "30", "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tierstore cold passes" in proc.stdout and "tierstore memory" in proc.stdout
    report = json.loads(out.read_text())
    records = report["results"]
    systems = {r["system"] for r in records}
    assert systems == {"tierstore-mem", "tierstore-lmdb-cold", "tierstore-s3", "tierstore-s3-30ms", "faiss-ivf-flat"}
    assert all(0.0 <= r["recall_at_10"] <= 1.0 for r in records)
    assert max(r["recall_at_10"] for r in records if r["system"] == "tierstore-mem") > 0.9
    for r in records:
        if r["system"] in ("tierstore-s3", "tierstore-s3-30ms"):
            assert r["http_gets"]["mean"] > 0 and r["rounds"]["mean"] >= 2
            assert r["post_rounds"]["max"] <= 1 and r["rr_rounds"]["max"] <= 1
            assert r["agrees_with_memory"] == 1.0
        if r["system"] == "tierstore-lmdb-cold":
            assert r["resident_bytes"] < r["raw_vector_bytes"] / 4  # tiered: far below the vectors
            assert r["recall_queries"] == 300
    assert report["meta"]["tierstore_options"]["s3_latency_ms"] == 30
    assert os.listdir(tmp_path / "work") == []
