"""LambdaInvoker (real boto3, real HTTP) against a loopback server speaking the Lambda Invoke API."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tierstore.errors import EventError, PayloadTooLarge, WorkerError
from tierstore.serverless import FanoutExecutor, InProcessInvoker, LambdaInvoker
from tierstore.serverless import handler as handler_module
from tierstore.serverless.events import MAX_PAYLOAD
from tierstore.serverless.handler import make_handler
from tierstore.testing.lambda_server import LambdaServer

from ..conftest import RecordingInvoker

NAME = "tierstore-search"


@pytest.fixture
def lambda_api(s3col):
    """The worker handler served as Lambda function NAME; sub-trees go back through the same API."""
    server = LambdaServer(lambda event, context: None, function_name=NAME).start()
    children = LambdaInvoker(NAME, endpoint_url=server.endpoint_url, backoff=0.01)
    server.handler = make_handler(s3col.config(), child_invoker=children)
    yield server
    server.stop()
    children.close()


def invoker_for(server, **kwargs) -> LambdaInvoker:
    return LambdaInvoker(NAME, endpoint_url=server.endpoint_url, backoff=0.01, **kwargs)


def test_tree_through_the_lambda_api_is_identical(s3col, queries, lambda_api):
    invoker = invoker_for(lambda_api)
    executor = FanoutExecutor(invoker, partitions=6, branching=2)
    res = s3col.col.search(queries, 10, executor=executor)
    np.testing.assert_array_equal(res.ids, s3col.col.search(queries, 10).ids)
    assert lambda_api.invocations == res.stats["serverless"]["invocations"] == 6
    request = lambda_api.requests[0]
    assert request["path"] == f"/2015-03-31/functions/{NAME}/invocations"
    headers = {k.lower(): v for k, v in request["headers"].items()}
    assert headers["x-amz-invocation-type"] == "RequestResponse"
    assert "authorization" in headers  # SigV4-signed by botocore
    again = s3col.col.search(queries, 10, executor=executor)
    assert again.stats["serverless"]["s3_gets"] == 0  # the warm "container" holds every partition
    invoker.close()


def test_function_errors_become_typed_errors(lambda_api):
    invoker = invoker_for(lambda_api)
    with pytest.raises(WorkerError, match="EventError") as info:
        invoker.invoke(json.dumps({"v": 1, "op": "search"}).encode())
    assert info.value.cause_type == "EventError"
    invoker.close()


def test_throttling_is_retried_with_backoff(s3col, queries, lambda_api):
    invoker = invoker_for(lambda_api)
    lambda_api.throttle_next(3)
    res = s3col.col.search(queries[:10], 10, executor=FanoutExecutor(invoker, partitions=2, branching=2))
    np.testing.assert_array_equal(res.ids, s3col.col.search(queries[:10], 10).ids)
    assert invoker.throttled == 3
    invoker.close()


def test_persistent_throttling_fails_naming_the_partitions(s3col, queries, lambda_api):
    invoker = invoker_for(lambda_api, throttle_retries=2)
    lambda_api.throttle_next(1000)
    with pytest.raises(WorkerError, match="throttling") as info:
        s3col.col.search(queries[:5], 10, executor=FanoutExecutor(invoker, partitions=2, branching=2))
    assert info.value.partitions and info.value.cause_type == "TooManyRequestsException"
    lambda_api.throttle_next(0)
    invoker.close()


def test_a_slow_worker_times_out(lambda_api):
    invoker = invoker_for(lambda_api, read_timeout=0.3)
    lambda_api.delay_next(1.0)
    with pytest.raises(WorkerError, match="did not answer") as info:
        invoker.invoke(b"{}")
    assert info.value.cause_type == "Timeout"
    invoker.close()


def test_payload_limits():
    with LambdaServer(lambda event, context: {"big": "x" * 5000}, function_name=NAME, max_payload=4096) as server:
        invoker = invoker_for(server)
        with pytest.raises(PayloadTooLarge):  # refused before sending
            invoker.invoke(b"x" * (MAX_PAYLOAD + 1))
        with pytest.raises(PayloadTooLarge):  # the server's 413
            invoker.invoke(json.dumps({"pad": "y" * 5000}).encode())
        with pytest.raises(WorkerError, match="ResponseSizeTooLarge"):  # never a truncated answer
            invoker.invoke(b"{}")
        invoker.close()


def test_unknown_function(lambda_api):
    invoker = LambdaInvoker("no-such-function", endpoint_url=lambda_api.endpoint_url)
    with pytest.raises(WorkerError, match="not found|ResourceNotFound"):
        invoker.invoke(b"{}")
    invoker.close()


def test_lambda_handler_reads_its_configuration_from_the_environment(s3col, queries, monkeypatch):
    recording = RecordingInvoker(InProcessInvoker(s3col.config()))
    FanoutExecutor(recording, partitions=1, branching=2).search(s3col.col, queries[:4], 5)
    recorded = recording.events
    monkeypatch.setenv("TIERSTORE_BUCKET", s3col.bucket)
    monkeypatch.setenv("TIERSTORE_PREFIX", s3col.prefix)
    monkeypatch.setenv("TIERSTORE_S3_ENDPOINT", s3col.endpoint_url)
    monkeypatch.setenv("TIERSTORE_CACHE_DIR", "")
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME", raising=False)
    monkeypatch.setattr(handler_module, "_WORKER", None)
    out = handler_module.lambda_handler(recorded[0], None)
    assert out["nq"] == 4 and out["stats"]["nodes"][0]["cold"] is True
    assert handler_module.lambda_handler(recorded[0], None)["stats"]["nodes"][0]["s3_gets"] == 0
    other = dict(recorded[0], bucket="someone-elses-bucket")
    with pytest.raises(EventError, match="bucket"):
        handler_module.lambda_handler(other, None)
