"""S3 faults: 500s, 503 SlowDown, connection resets, stalls and truncated bodies between a
real boto3 client and the moto server (tierstore.testing.FaultProxy), on 10% and 50% of
requests. Every operation succeeds through retries or raises a tierstore error; what it
returns is never wrong; a failed write leaves the old value or the new one, never a mix;
timeouts are bounded by the configured ones; what was acknowledged survives.
"""

from __future__ import annotations

import os
import random
import time

import numpy as np
import pytest

import tierstore
from tierstore.errors import NotFound, TierstoreError
from tierstore.testing.fault_proxy import FaultProxy
from tierstore.tiers import S3Tier

from ._report import REPORT

OPTIONS = {"connect_timeout": 1.0, "read_timeout": 0.8, "max_attempts": 4}
STALL_S = 1.2  # longer than read_timeout: the client must give up, not wait
# CI runs a quick pass; TIERSTORE_RELIABILITY=full runs four times the operations
SCALE = 4 if os.environ.get("TIERSTORE_RELIABILITY") == "full" else 1
# botocore "standard" retries back off at most ~0.5, 1, 2 s between 4 attempts
BOUND_S = OPTIONS["max_attempts"] * (OPTIONS["connect_timeout"] + OPTIONS["read_timeout"] + STALL_S) + 8


@pytest.fixture(params=[0.1, 0.5], ids=["10pct", "50pct"])
def proxy(request, moto_server):
    with FaultProxy(moto_server.endpoint_url, rate=request.param, seed=int(request.param * 100),
                    stall_s=STALL_S) as fault_proxy:
        yield fault_proxy
    REPORT["S3 requests through the fault proxy"] += fault_proxy.counts["requests"]
    for fault, count in fault_proxy.counts.items():
        if fault != "requests":
            REPORT[f"S3 faults injected: {fault}"] += count


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    try:
        return fn(*args, **kwargs), None
    except TierstoreError as exc:  # anything else fails the test
        return None, exc
    finally:
        assert time.perf_counter() - started < BOUND_S, f"{fn.__name__} took longer than the configured bounds"


def test_tier_operations_survive_faults(proxy, s3_location):
    rng = random.Random(7)
    tier = S3Tier(s3_location["bucket"], s3_location["prefix"], endpoint_url=proxy.endpoint_url, **OPTIONS)
    keys = [f"k/{i}" for i in range(12)]
    possible: dict[str, set] = {k: {None} for k in keys}  # what a read may find: acked value, or old/new after a failure
    failures = 0
    for step in range(SCALE * (40 if proxy.rate < 0.3 else 20)):
        key = rng.choice(keys)
        op = rng.choice(["put", "put", "get", "get", "range", "many", "delete", "list", "create"])
        if op in ("put", "create"):
            value = rng.randbytes(rng.choice([0, 1, 100, 70_000, 300_000]))
            _, err = timed(tier.put, key, value, mode="overwrite" if op == "put" else "create")
            if err is None:
                possible[key] = {value}
            elif op == "create" and "exists" in str(err).lower() and None not in possible[key]:
                pass  # create-only put on an existing key: a clean refusal, nothing written
            else:
                failures += 1
                possible[key] = possible[key] | {value}
        elif op == "delete":
            _, err = timed(tier.delete, key)
            possible[key] = {None} if err is None else possible[key] | {None}
            failures += err is not None
        elif op == "get":
            got, err = timed(tier.get, key)
            if isinstance(err, NotFound):
                assert None in possible[key], f"{key} vanished"
                possible[key] = {None}
            elif err is None:
                assert got in possible[key], f"{key} read back a value never written (step {step})"
                possible[key] = {got}
            else:
                failures += 1
        elif op == "range":
            got, err = timed(tier.get_range, key, 10, 60_010)
            if err is None:
                assert any(v is not None and got == v[10:60_010] for v in possible[key]), "a range read lied"
            else:
                failures += not isinstance(err, NotFound)
        elif op == "many":
            got, err = timed(tier.get_many, keys)
            if err is None:
                for k, v in zip(keys, got):
                    assert v in possible[k], f"get_many returned a wrong value for {k}"
            else:
                failures += 1
        else:
            got, err = timed(tier.list, "k/")
            if err is None:
                for k in keys:
                    if k in got:
                        assert possible[k] != {None}, f"list shows deleted {k}"
                    else:
                        assert None in possible[k], f"list misses acknowledged {k}"
            else:
                failures += 1
    proxy.set_rate(0.0)
    for key in keys:  # settled: every key holds one of the values its history allows
        try:
            value = tier.get(key)
        except NotFound:
            value = None
        assert value in possible[key]
    tier.close()
    assert proxy.injected > 0
    print(f"faults injected: {dict(proxy.counts)}; operations that failed after retries: {failures}")


def test_collection_and_kv_survive_faults(proxy, s3_location):
    torch = pytest.importorskip("torch")
    uri = f"s3://{s3_location['bucket']}/{s3_location['prefix']}"
    rng = np.random.default_rng(3)
    acked, maybe = set(), set()
    kv_acked = set()

    def vectors(batch):
        return np.random.default_rng(batch).standard_normal((25, 16)).astype(np.float32)

    def kv_of(batch):
        g = torch.Generator().manual_seed(batch)
        return [(torch.randn(2, 16, 8, generator=g).half(), torch.randn(2, 16, 8, generator=g).half())]

    batches = SCALE * (8 if proxy.rate < 0.3 else 5)
    db = tierstore.connect(uri, endpoint_url=proxy.endpoint_url, s3_options=OPTIONS, flush_rows=75)
    try:
        col = None
        while col is None:
            col, _ = timed(db.create_collection, "c", dim=16, exist_ok=True)
        kv = db.kv_cache("m", "r", codec="fp16", chunk_tokens=16)
        for batch in range(batches):
            _, err = timed(col.add, np.arange(batch * 25, batch * 25 + 25), vectors(batch))
            (acked if err is None else maybe).add(batch)
            tokens = list(range(batch * 16, batch * 16 + 16))
            _, err = timed(kv.put, tokens, kv_of(batch))
            if err is None:
                kv_acked.add(batch)
            got, err = timed(kv.get, tokens)
            if got is not None:  # a read never returns wrong KV
                assert torch.equal(got[0][0], kv_of(batch)[0][0]) and torch.equal(got[0][1], kv_of(batch)[0][1])
            res, err = timed(col.search, vectors(batch)[:2], k=1)
            if res is not None and batch in acked:
                assert res.ids[:, 0].tolist() == [batch * 25, batch * 25 + 1]
            if rng.random() < 0.15:
                timed(col.flush)
        timed(col.flush)
    finally:
        proxy.set_rate(0.0)
        db.close()
    with tierstore.connect(uri, endpoint_url=proxy.endpoint_url, s3_options=OPTIONS) as again:
        col = again.collection("c")
        for batch in range(batches):
            got = col.get(np.arange(batch * 25, batch * 25 + 25))
            present = [g is not None for g in got]
            assert all(present) or not any(present), f"batch {batch} half visible"
            if batch in acked:
                assert all(present), f"acknowledged batch {batch} lost"
            if all(present):
                assert np.array_equal(np.stack([g["vector"] for g in got]), vectors(batch))
        kv = again.kv_cache("m", "r", codec="fp16", chunk_tokens=16)
        for batch in kv_acked:
            got = kv.get(list(range(batch * 16, batch * 16 + 16)))
            assert got is not None and torch.equal(got[0][0], kv_of(batch)[0][0])
    assert proxy.injected > 0
    print(f"faults injected: {dict(proxy.counts)}; adds failed: {len(maybe)}")
