"""The AWS Lambda entry point: ``tierstore.serverless.handler.lambda_handler``.

Configuration comes from the function's environment (:meth:`WorkerConfig.from_env`):
``TIERSTORE_BUCKET`` and ``TIERSTORE_PREFIX`` (the only place the worker reads),
optionally ``TIERSTORE_S3_ENDPOINT``, ``TIERSTORE_CACHE_DIR`` (default ``/tmp/tierstore``)
and ``TIERSTORE_LAMBDA_ENDPOINT`` (another Lambda API endpoint for sub-tree calls). The
function invokes itself (``AWS_LAMBDA_FUNCTION_NAME``) for its sub-trees.

This module imports only what the Lambda zip holds (numpy, faiss, xxhash, tqdm and
boto3, which the runtime provides): never torch or transformers.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

from .events import dumps
from .invokers import LambdaInvoker
from .worker import Worker, WorkerConfig

__all__ = ["lambda_handler", "make_handler"]

# The warm container's worker: module-level state on purpose (the one exception STYLE.md
# allows). Lambda keeps the module loaded between invocations of a warm container, so
# the partitions this worker loaded stay in memory and no S3 GET repeats for them.
_WORKER: Worker | None = None
_WORKER_LOCK = threading.Lock()


def _container_worker() -> Worker:
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            function = os.environ.get("AWS_LAMBDA_FUNCTION_NAME")
            invoker = None
            if function:
                invoker = LambdaInvoker(function, endpoint_url=os.environ.get("TIERSTORE_LAMBDA_ENDPOINT") or None,
                                        region_name=os.environ.get("AWS_REGION") or None)
            _WORKER = Worker(WorkerConfig.from_env(), child_invoker=invoker)
        return _WORKER


def _serve(worker: Worker, event: Any) -> dict:
    response = worker.handle(event)
    dumps(response, what="worker response")  # PayloadTooLarge here, not a truncated answer
    return response


def lambda_handler(event: Any, context: Any) -> dict:
    """Serve one search event (see :mod:`tierstore.serverless.events`); errors are function errors."""
    return _serve(_container_worker(), event)


def make_handler(config: WorkerConfig, *, child_invoker=None, tier=None) -> Callable[[Any, Any], dict]:
    """A handler with a worker of its own (tests and local servers; same behaviour as :func:`lambda_handler`)."""
    worker = Worker(config, child_invoker=child_invoker, tier=tier)

    def handler(event: Any, context: Any) -> dict:
        return _serve(worker, event)

    handler.worker = worker  # type: ignore[attr-defined]
    return handler
