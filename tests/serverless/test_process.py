"""ProcessInvoker: real worker processes that behave like Lambda containers."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tierstore.errors import WorkerError
from tierstore.serverless import FanoutExecutor, ProcessInvoker


@pytest.fixture(scope="module")
def pool(s3col):
    invoker = ProcessInvoker(s3col.config())
    yield invoker
    invoker.close()


def test_cold_then_warm_with_identical_results(s3col, queries, pool):
    executor = FanoutExecutor(pool, partitions=8, branching=2)
    first = s3col.col.search(queries, 10, executor=executor)
    np.testing.assert_array_equal(first.ids, s3col.col.search(queries, 10).ids)
    info = first.stats["serverless"]
    assert info["cold"] == info["invocations"] == pool.processes  # every node started a container
    assert info["s3_gets"] >= 2 * info["invocations"]  # index state + partition, per container
    second = s3col.col.search(queries[::-1], 10, executor=executor)
    info = second.stats["serverless"]
    assert info["cold"] == 0 and info["s3_gets"] == 0  # warm containers hold their partitions
    assert pool.processes == info["invocations"]  # reused, none started
    np.testing.assert_array_equal(second.ids, s3col.col.search(queries[::-1], 10).ids)
    spec = {"lang": {"$in": ["en", "fr"]}}
    filtered = s3col.col.search(queries, 10, filter=spec, executor=executor)
    np.testing.assert_array_equal(filtered.ids, s3col.col.search(queries, 10, filter=spec).ids)


def test_stopped_containers_start_cold_again(s3col, queries, pool):
    executor = FanoutExecutor(pool, partitions=8, branching=2)
    s3col.col.search(queries, 10, executor=executor)
    assert pool.kill_idle() > 0 and pool.processes == 0
    res = s3col.col.search(queries, 10, executor=executor)
    assert res.stats["serverless"]["cold"] == res.stats["serverless"]["invocations"]


def test_injected_cold_start_and_invoke_overhead(s3col, queries):
    with ProcessInvoker(s3col.config(), cold_start=0.2, invoke_overhead=0.01) as slow:
        executor = FanoutExecutor(slow, partitions=4, branching=2)
        first = s3col.col.search(queries[:5], 10, executor=executor)
        depth = first.stats["serverless"]["depth"]
        assert first.stats["serverless"]["fanout_ms"] >= 1e3 * depth * (0.2 + 0.01)
        start = time.perf_counter()
        warm = s3col.col.search(queries[:5], 10, executor=executor)
        assert time.perf_counter() - start < 0.2 * depth and warm.stats["serverless"]["cold"] == 0


def test_a_timing_out_worker_is_stopped_retried_then_named(s3col, queries):
    # Each new container sleeps 1 s before its S3 reads: past the 0.3 s limit every time.
    with ProcessInvoker(s3col.config(s3_get_delay=1.0), timeout=0.3) as stuck:
        executor = FanoutExecutor(stuck, partitions=2, branching=2, retries=1)
        with pytest.raises(WorkerError, match="timed out") as info:
            s3col.col.search(queries[:3], 10, executor=executor, nprobe=64)
        assert info.value.partitions and info.value.cause_type == "Timeout"
        assert stuck.timeouts >= 2  # the first try and its retry
