"""Sans-I/O protocols: one generator of tier calls, run blocking or async.

The manifest log and the WAL write each operation once, as a generator that yields the
tier calls it needs and receives their results (or has their exceptions thrown back
into it)::

    def _load(self, key) -> Steps:
        data = yield call("get", key)
        return decode(data)

:func:`run_steps` drives such a protocol with the tier's blocking methods and
:func:`run_steps_async` with their async twins (``get`` -> ``get_async``), so the
sync and async surfaces share every decision and differ only in how I/O is awaited.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from ..tiers.base import BaseTier

__all__ = ["Steps", "call", "run_steps", "run_steps_async"]

#: A protocol: a generator that yields tier calls (see :func:`call`) and returns a result.
Steps = Generator[tuple[str, tuple, dict], Any, Any]


def call(method: str, *args: Any, **kwargs: Any) -> tuple[str, tuple, dict]:
    """A tier call for a protocol to yield: ``data = yield call("get", key)``."""
    return method, args, kwargs


def run_steps(tier: BaseTier, steps: Steps) -> Any:
    """Run a protocol with the tier's blocking methods; an error is thrown back into it."""
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            method, args, kwargs = steps.throw(error) if error is not None else steps.send(result)
        except StopIteration as done:
            return done.value
        error = None
        try:
            result = getattr(tier, method)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the protocol decides; unhandled ones re-raise from it
            result, error = None, exc


async def run_steps_async(tier: BaseTier, steps: Steps) -> Any:
    """Run a protocol with the tier's async twins (``get`` -> ``get_async``, ...)."""
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            method, args, kwargs = steps.throw(error) if error is not None else steps.send(result)
        except StopIteration as done:
            return done.value
        error = None
        try:
            result = await getattr(tier, method + "_async")(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            result, error = None, exc
