"""A failing worker is retried; then the query fails with a typed error naming the partition, or,
when the caller opted in, returns partial results flagged as partial."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tierstore.errors import TierUnavailable, WorkerError
from tierstore.serverless import FanoutExecutor, InProcessInvoker

from .conftest import make_collection


class FailFirst:
    """Fails the first invocation that scans ``partition``: a transient fault (a container lost mid-call),
    which no real component here can be made to show on demand."""

    def __init__(self, inner, partition: int) -> None:
        self.inner, self.partition, self.failed = inner, partition, 0

    def invoke(self, payload: bytes, affinity=None) -> bytes:
        event = json.loads(payload)
        if not self.failed and any(item["partition"] == self.partition for item in event["scan"]):
            self.failed += 1
            raise WorkerError("the container was recycled", cause_type="Crash")
        return self.inner.invoke(payload, affinity=affinity)

    def close(self) -> None:
        self.inner.close()


def test_a_transient_failure_is_retried(s3col, queries):
    flaky = FailFirst(InProcessInvoker(s3col.config()), partition=1)  # a root: the coordinator calls it
    executor = FanoutExecutor(flaky, partitions=8, branching=2)
    res = s3col.col.search(queries, 10, executor=executor)
    assert flaky.failed == 1 and res.stats["serverless"]["retried"] == 1
    np.testing.assert_array_equal(res.ids, s3col.col.search(queries, 10).ids)


@pytest.fixture(scope="module")
def damaged(moto_server):
    """A collection whose posting segments are small; one of them is then deleted from S3."""
    made = make_collection(moto_server, n=1500, updates=False, name="damaged")
    col = made.col
    col.build_index(target_list_size=16, segment_bytes=4096)
    executor = FanoutExecutor(InProcessInvoker(made.config()), partitions=8, branching=2)
    plan = executor.plan(col)
    directory = col.index.directory
    victim = directory.segment_keys[int(directory.segment[plan.lists[3][0]])]
    lost = sorted({p for p in range(plan.partitions)
                   if victim in {directory.segment_keys[int(directory.segment[n])] for n in plan.lists[p]}})
    assert len(lost) < plan.partitions
    moto_server.client().delete_object(Bucket=made.bucket, Key=f"{made.prefix}/{victim}")
    yield made, lost
    made.db.close()


def test_a_worker_that_keeps_failing_raises_a_typed_error_naming_the_partition(damaged, queries):
    made, lost = damaged
    executor = FanoutExecutor(InProcessInvoker(made.config()), partitions=8, branching=2, retries=2)
    with pytest.raises(WorkerError) as info:
        made.col.search(queries, 10, executor=executor, nprobe=64)
    assert isinstance(info.value, TierUnavailable)
    assert set(info.value.partitions) & set(lost)
    assert f"{info.value.partitions[0]}" in str(info.value) and "NotFound" in str(info.value)


def test_partial_results_when_the_caller_opts_in(damaged, queries):
    made, lost = damaged
    executor = FanoutExecutor(InProcessInvoker(made.config()), partitions=8, branching=2, allow_partial=True)
    res = made.col.search(queries, 10, executor=executor, nprobe=64)
    assert res.stats["partial"] is True
    assert set(lost) <= set(res.stats["failed_partitions"])
    assert (res.ids >= 0).all()  # the other partitions (and the exact part) still answer
    full = made.col.search(queries, 10, nprobe=64)
    assert not np.array_equal(res.ids, full.ids)  # something is missing, and it is flagged
