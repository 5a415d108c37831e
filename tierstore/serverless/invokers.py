"""Invokers: how a node calls a worker. One small interface, three implementations.

An invoker has ``invoke(payload: bytes) -> bytes`` (a JSON request in, a JSON response
out, synchronously, like Lambda's ``RequestResponse``) and ``close()``. A failed
invocation (function error, crash, timeout, throttling it gave up on) raises
:class:`~tierstore.errors.WorkerError`; a request or response over Lambda's 6 MB limit
raises :class:`~tierstore.errors.PayloadTooLarge` (never a truncated answer). Retries of
failed workers are the tree's (:mod:`.tree`); throttling back-off is the AWS invoker's.

* :class:`InProcessInvoker`: threads in this process sharing one warm worker.
* :class:`~tierstore.serverless.process_pool.ProcessInvoker`: long-lived worker
  processes that behave like Lambda containers (cold start, warm reuse).
* :class:`LambdaInvoker`: AWS Lambda through boto3 ``invoke``.
"""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Protocol

from ..errors import ConfigError, PayloadTooLarge, WorkerError
from .events import MAX_PAYLOAD, dumps, loads

__all__ = ["Invoker", "InProcessInvoker", "LambdaInvoker", "check_payload"]


class Invoker(Protocol):
    """Call one worker synchronously: JSON bytes in, JSON bytes out.

    ``affinity``: the called node's place in the tree (node ``i`` always scans partitions
    ``i::N``). An invoker that can keep a warm container per key (:class:`ProcessInvoker`)
    routes there, so the container already holds those partitions; others (AWS Lambda
    picks containers itself) ignore it.
    """

    def invoke(self, payload: bytes, affinity: int | None = None) -> bytes: ...

    def close(self) -> None: ...


def check_payload(data: bytes, what: str) -> bytes:
    if len(data) > MAX_PAYLOAD:
        raise PayloadTooLarge(f"the {what} is {len(data):,} bytes, over Lambda's {MAX_PAYLOAD:,}-byte synchronous "
                              "limit; search fewer queries per call or use more partitions")
    return data


class InProcessInvoker:
    """Workers as threads of this process, sharing one warm :class:`~.worker.Worker`.

    ``config``: a :class:`~.worker.WorkerConfig` (where the worker reads); ``tier``
    optionally injects a ready tier for it. Requests and responses go through the same
    JSON encoding and size checks as Lambda's, so behaviour matches the other invokers.
    """

    def __init__(self, config, *, tier=None) -> None:
        from .worker import Worker

        self.worker = Worker(config, child_invoker=self, tier=tier)
        self.invocations = 0
        self._lock = threading.Lock()

    def invoke(self, payload: bytes, affinity: int | None = None) -> bytes:
        """Serve one request on the shared worker (``affinity`` is moot: one container)."""
        check_payload(payload, "request")
        with self._lock:
            self.invocations += 1
        try:
            response = self.worker.handle(loads(payload, what="request"))
        except Exception as exc:  # what Lambda reports as a function error
            raise WorkerError(f"{type(exc).__name__}: {exc}", cause_type=type(exc).__name__) from exc
        return dumps(response, what="worker response")

    def close(self) -> None:
        """Nothing to release (the worker's state goes with this object)."""


_THROTTLE_CODES = {"TooManyRequestsException", "ThrottlingException", "Throttling", "EC2ThrottledException"}


class LambdaInvoker:
    """AWS Lambda through boto3 ``invoke`` (``RequestResponse``).

    :param function_name: the function's name or ARN (it invokes itself for sub-trees).
    :param region_name: its region; ``endpoint_url``: another Lambda API endpoint (tests
        use :class:`tierstore.testing.lambda_server.LambdaServer`).
    :param read_timeout: seconds to wait for an answer (set it above the function's
        timeout); ``connect_timeout`` likewise for the connection.
    :param throttle_retries: retries after ``TooManyRequestsException`` (HTTP 429), with
        exponential back-off from ``backoff`` seconds (full jitter).
    :param client: a ready boto3 Lambda client (used as given).

    A ``FunctionError`` answer becomes :class:`WorkerError` with the function's
    ``errorType``; a timeout or connection failure too (the tree retries it).
    """

    def __init__(self, function_name: str, *, region_name: str | None = None, endpoint_url: str | None = None,
                 read_timeout: float = 65.0, connect_timeout: float = 5.0, throttle_retries: int = 6,
                 backoff: float = 0.05, qualifier: str | None = None, client=None) -> None:
        if not isinstance(function_name, str) or not function_name:
            raise ConfigError(f"function_name must be a non-empty str, got {function_name!r}")
        self.function_name, self.qualifier = function_name, qualifier
        self.throttle_retries, self.backoff = int(throttle_retries), float(backoff)
        self.throttled = 0
        self.invocations = 0
        self._lock = threading.Lock()
        if client is None:
            import boto3
            from botocore.config import Config

            session = boto3.session.Session()
            config = Config(read_timeout=read_timeout, connect_timeout=connect_timeout,
                            retries={"total_max_attempts": 1, "mode": "standard"},  # back-off is ours
                            max_pool_connections=64)
            client = session.client("lambda", endpoint_url=endpoint_url, config=config,
                                    region_name=region_name or session.region_name or "us-east-1")
        self.client = client

    def invoke(self, payload: bytes, affinity: int | None = None) -> bytes:
        """One ``RequestResponse`` invocation (Lambda chooses the container: ``affinity`` is ignored)."""
        from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as BotoConnectionError
        from botocore.exceptions import ReadTimeoutError

        check_payload(payload, "request")
        params = {"FunctionName": self.function_name, "InvocationType": "RequestResponse", "Payload": payload}
        if self.qualifier:
            params["Qualifier"] = self.qualifier
        for attempt in range(self.throttle_retries + 1):
            with self._lock:
                self.invocations += 1
            try:
                response = self.client.invoke(**params)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code in _THROTTLE_CODES or status == 429:
                    with self._lock:
                        self.throttled += 1
                    if attempt < self.throttle_retries:
                        time.sleep(random.uniform(0, self.backoff * (2 ** attempt)))
                        continue
                    raise WorkerError(f"Lambda {self.function_name!r} is throttling (429) after "
                                      f"{self.throttle_retries} retries; raise its reserved concurrency or use "
                                      "fewer partitions", cause_type=code or "TooManyRequestsException") from exc
                if code in ("RequestTooLargeException",) or status == 413:
                    raise PayloadTooLarge(f"Lambda refused the request as too large: {exc}") from exc
                raise WorkerError(f"Lambda invoke of {self.function_name!r} failed: {exc}", cause_type=code) from exc
            except ReadTimeoutError as exc:
                raise WorkerError(f"Lambda {self.function_name!r} did not answer in time: {exc}",
                                  cause_type="Timeout") from exc
            except (BotoConnectionError, BotoCoreError) as exc:
                raise WorkerError(f"cannot reach Lambda {self.function_name!r}: {exc}",
                                  cause_type=type(exc).__name__) from exc
            body = response["Payload"].read()
            if response.get("FunctionError"):
                try:
                    info = json.loads(body)
                except ValueError:
                    info = {"errorMessage": body[:200].decode("utf-8", "replace")}
                kind = info.get("errorType", response["FunctionError"]) if isinstance(info, dict) else "Unhandled"
                message = info.get("errorMessage", "") if isinstance(info, dict) else str(info)
                raise WorkerError(f"Lambda {self.function_name!r} raised {kind}: {message}", cause_type=kind)
            return check_payload(body, "worker response")
        raise WorkerError(f"Lambda {self.function_name!r} gave no answer", cause_type="NoAnswer")

    def close(self) -> None:
        self.client.close()
