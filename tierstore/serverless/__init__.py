"""Serverless fan-out search: a tree of short-lived workers over a collection's posting lists.

``col.search(xq, k, executor=FanoutExecutor(invoker, partitions=P, branching=b))`` returns
the same result as ``col.search(xq, k)``, computed by workers that each hold a few
partitions of the index's posting lists (read from S3 once, kept warm), arranged as a
tree so that no caller fans out to hundreds of functions (SQUASH). See
``docs/serverless.md``.

* :mod:`.plan` - partitions and the tree (pure); :mod:`.events` - the wire format;
* :mod:`.worker` / :mod:`.handler` - the worker and the Lambda entry point;
* :mod:`.invokers`, :mod:`.process_pool` - in-process, local-process and AWS invokers;
* :mod:`.executor` - the coordinator; :mod:`.deploy`, :mod:`.cli` - packaging.

The handler (:mod:`.handler`) never imports this package's coordinator side eagerly:
names here load on first use.
"""

from __future__ import annotations

__all__ = ["FanoutExecutor", "InProcessInvoker", "ProcessInvoker", "LambdaInvoker", "WorkerConfig", "Worker",
           "PartitionPlan", "build_plan", "TreeShape"]

_WHERE = {"FanoutExecutor": "executor", "InProcessInvoker": "invokers", "LambdaInvoker": "invokers",
          "ProcessInvoker": "process_pool", "WorkerConfig": "worker", "Worker": "worker",
          "PartitionPlan": "plan", "build_plan": "plan", "TreeShape": "plan"}


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'tierstore.serverless' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
