"""Invoking a node's sub-trees: in parallel, with retries, partial results and timing.

Shared by the coordinator (level 0) and every worker, so the retry and failure rules
are the same at each level:

* an invocation that fails (a function error, a crash, a timeout, a throttle the
  invoker gave up on) is retried ``retries`` times, then counts as failed;
* a *handled* error in a response (a grandchild already failed after its own retries)
  is not retried again here: it travels up as is;
* a failed sub-tree raises :class:`~tierstore.errors.WorkerError` naming its
  partitions, unless ``partial``: then its partitions are reported in ``failed`` and
  the search goes on without them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from ..errors import EventError, PayloadTooLarge, WorkerError
from .events import dumps, loads

__all__ = ["ChildCall", "call_children", "subtree_partitions"]


def subtree_partitions(spec: dict, partitions_of_scan) -> list[int]:
    """Every partition a child spec (``scan`` + nested ``children``) covers."""
    out = [part for part in partitions_of_scan(spec["scan"])]
    for child in spec["children"]:
        out.extend(subtree_partitions(child, partitions_of_scan))
    return out


@dataclass
class ChildCall:
    """The outcome of one sub-tree: its response (``None`` when it failed) and timing."""

    response: dict | None = None
    attempts: int = 0
    rtt_ms: float = 0.0
    error: WorkerError | None = None
    partitions: list[int] = field(default_factory=list)


def _call_one(invoker, payload: bytes, retries: int, partitions: list[int], affinity: int | None,
              out: ChildCall) -> None:
    out.partitions = partitions
    last: Exception | None = None
    for attempt in range(retries + 1):
        out.attempts = attempt + 1
        start = time.perf_counter()
        try:
            answer = invoker.invoke(payload, affinity=affinity)
        except PayloadTooLarge as exc:  # deterministic: retrying cannot help
            out.error = WorkerError(f"partitions {partitions}: {exc}", partitions=partitions,
                                    cause_type="PayloadTooLarge")
            out.error.__cause__ = exc
            return
        except WorkerError as exc:
            last = exc
            continue
        out.rtt_ms = (time.perf_counter() - start) * 1e3
        try:
            response = loads(answer, what="worker response")
        except EventError as exc:
            last = exc
            continue
        error = response.get("error")
        if error is not None:  # a sub-tree below failed after its own retries: pass it up
            parts = [int(p) for p in error.get("partitions", partitions)] if isinstance(error, dict) else partitions
            message = error.get("message", "worker failed") if isinstance(error, dict) else str(error)
            out.error = WorkerError(str(message), partitions=parts,
                                    cause_type=error.get("type") if isinstance(error, dict) else None)
            return
        out.response = response
        return
    cause = getattr(last, "cause_type", None) or type(last).__name__
    out.error = WorkerError(f"the worker for partition(s) {partitions} failed {retries + 1} time(s): {last}",
                            partitions=partitions, cause_type=cause)
    out.error.__cause__ = last


def call_children(invoker, events: list[dict], partitions: list[list[int]], *, retries: int,
                  partial: bool) -> tuple[list[ChildCall], list[int]]:
    """Invoke every child event at once; return their outcomes and the partitions lost.

    Raises :class:`WorkerError` for the first failed sub-tree unless ``partial``.
    """
    payloads = [dumps(event, what="request to a worker") for event in events]
    # A node's affinity key is its place in the tree: node i always scans partitions i::N,
    # so an invoker that keeps a warm container per key finds that partition already held.
    keys = [int(event["node"]) for event in events]
    calls = [ChildCall() for _ in events]
    threads = [threading.Thread(target=_call_one, args=(invoker, payload, retries, parts, key, call), daemon=True)
               for payload, parts, key, call in zip(payloads[1:], partitions[1:], keys[1:], calls[1:])]
    for thread in threads:
        thread.start()
    if payloads:
        _call_one(invoker, payloads[0], retries, partitions[0], keys[0], calls[0])
    for thread in threads:
        thread.join()
    failed: list[int] = []
    for call in calls:
        if call.error is not None:
            if not partial:
                raise call.error
            failed.extend(call.error.partitions or call.partitions)
    return calls, sorted(set(failed))
