"""Helpers shared by the benchmarks: paired timing, sizes, tables and JSON with metadata.

Benchmarks compare a tierstore operation with the raw operation it wraps, measured in
the same run. :func:`paired_medians` alternates the two in short batches (swapping which
goes first every round) so that machine noise, page-cache state and CPU frequency hit
both alike, and reports the median seconds per call of each.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "parse_size", "parse_sizes", "format_size", "mb_per_s", "paired_medians", "median_seconds",
    "format_table", "bench_meta", "write_json",
]

_UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 1000, "mb": 1000**2, "gb": 1000**3}


def parse_size(text: str) -> int:
    """``"4KiB"`` -> 4096; accepts B, KiB, MiB, GiB (binary) and KB, MB, GB (decimal)."""
    raw = text.strip().lower()
    digits = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(digits):] or "b"
    if unit not in _UNITS or not digits:
        raise ValueError(f"size {text!r} is not like 4KiB, 1MiB, 32MiB or 4096")
    return int(float(digits) * _UNITS[unit])


def parse_sizes(text: str) -> list[int]:
    """``"4KiB,1MiB"`` -> [4096, 1048576]."""
    return [parse_size(part) for part in text.split(",") if part.strip()]


def format_size(size: int) -> str:
    """4096 -> ``"4KiB"``; 1048576 -> ``"1MiB"`` (exact binary units when they fit)."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def mb_per_s(nbytes: int, seconds: float) -> float:
    """Throughput in MB/s (10**6 bytes per second)."""
    return nbytes / seconds / 1e6 if seconds > 0 else math.inf


def _time_batch(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def paired_medians(first: Callable[[], Any], second: Callable[[], Any], *, rounds: int = 7,
                   batch_seconds: float = 0.02, max_calls: int = 2000, warmup: int = 1) -> tuple[float, float]:
    """Median seconds per call of ``first`` and ``second``, measured interleaved.

    Each round times one batch of each, the order swapping every round. The batch size
    (equal for both) is chosen so that the slower of the two runs about
    ``batch_seconds`` per batch, which keeps microsecond calls above timer noise. The
    garbage collector is paused while timing, as :mod:`timeit` does.
    """
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    for _ in range(warmup):
        first()
        second()
    probe = max(_time_batch(first, 1), _time_batch(second, 1))
    calls = max(1, min(max_calls, int(batch_seconds / probe) if probe > 0 else max_calls))
    times: tuple[list[float], list[float]] = ([], [])
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for index in range(rounds):
            order = (0, 1) if index % 2 == 0 else (1, 0)
            for which in order:
                times[which].append(_time_batch((first, second)[which], calls))
    finally:
        if gc_was_enabled:
            gc.enable()
    return _median(times[0]), _median(times[1])


def median_seconds(fn: Callable[[], Any], *, rounds: int = 7, batch_seconds: float = 0.02,
                   max_calls: int = 2000, warmup: int = 1) -> float:
    """Median seconds per call of ``fn`` alone (batches sized like :func:`paired_medians`)."""
    for _ in range(warmup):
        fn()
    probe = _time_batch(fn, 1)
    calls = max(1, min(max_calls, int(batch_seconds / probe) if probe > 0 else max_calls))
    return _median([_time_batch(fn, calls) for _ in range(rounds)])


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Render ``rows`` as an aligned text table.

    ``columns`` lists ``(key, title, format_spec)``; numbers are right-aligned, text left.
    """
    cells = [[title for _, title, _ in columns]]
    for row in rows:
        cells.append([format(row[key], spec) if row.get(key) is not None else "-" for key, _, spec in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    numeric = [all(_is_number(row.get(key)) for row in rows) for key, _, _ in columns]

    def render(line: list[str]) -> str:
        return "  ".join(text.rjust(w) if num else text.ljust(w) for text, w, num in zip(line, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths).rstrip()
    return "\n".join([render(cells[0]), rule, *(render(line) for line in cells[1:])])


def _is_number(value: object) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def bench_meta(**extra: Any) -> dict[str, Any]:
    """Where and when a benchmark ran: date, python, platform, library versions, CPUs."""
    meta: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    for module in ("numpy", "torch", "lmdb", "boto3", "xxhash"):
        loaded = sys.modules.get(module)
        if loaded is None:
            try:
                loaded = __import__(module)
            except ImportError:
                loaded = None
        meta[module] = (getattr(loaded, "__version__", None) or getattr(loaded, "VERSION", None)
                        if loaded is not None else None)
    meta.update(extra)
    return meta


def write_json(path: str, results: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> None:
    """Write ``{"meta": meta, "results": results}`` to ``path`` (pretty, UTF-8; inf/NaN as null)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(_finite({"meta": dict(meta), "results": list(results)}), handle, indent=2, allow_nan=False)
        handle.write("\n")


def _finite(value: Any) -> Any:
    """Replace inf/NaN (a call too fast to time, say) by None: JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


# --------------------------------------------------------------------------- for bench/ann.py:
# N candidates timed against each other, and reports with more than one section.

def median(values: Sequence[float]) -> float:
    """The median of ``values`` (mean of the middle two for an even count)."""
    if not values:
        raise ValueError("median of no values")
    return _median(values)


def calls_within(fn: Callable[[int], Any], max_calls: int, max_seconds: float) -> int:
    """Call ``fn(0), fn(1), ...`` until ``max_calls`` calls or ``max_seconds`` have passed.

    Returns how many calls were made (at least one). Serves as the warm-up of a timed
    pass and sizes it: a slow candidate gets fewer calls, so every pass takes about
    ``max_seconds`` at most.
    """
    if max_calls < 1:
        raise ValueError("max_calls must be >= 1")
    deadline = time.perf_counter() + max_seconds
    calls = 0
    while calls < max_calls:
        fn(calls)
        calls += 1
        if time.perf_counter() >= deadline:
            break
    return calls


def interleaved_rates(passes: Sequence[tuple[Callable[[int], Any], int]], *, rounds: int = 5) -> list[list[float]]:
    """Calls per second of each ``(fn, calls)`` pass, per round, measured interleaved.

    A round times every pass once as a whole (``fn(0) ... fn(calls - 1)``), in list order
    in even rounds and in reverse order in odd ones, so that drift on a shared machine
    touches every candidate alike: the N-way form of :func:`paired_medians`. Returns one
    list of ``rounds`` rates per pass; take :func:`median` of each. GC is paused.
    """
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    rates: list[list[float]] = [[] for _ in passes]
    order = list(range(len(passes)))
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for index in range(rounds):
            for which in (order if index % 2 == 0 else order[::-1]):
                fn, calls = passes[which]
                start = time.perf_counter()
                for call in range(calls):
                    fn(call)
                elapsed = time.perf_counter() - start
                rates[which].append(calls / elapsed if elapsed > 0 else math.inf)
    finally:
        if gc_was_enabled:
            gc.enable()
    return rates


def write_report(path: str, meta: Mapping[str, Any], **sections: Any) -> None:
    """Write ``{"meta": meta, **sections}`` to ``path``, like :func:`write_json` (inf/NaN as null)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(_finite({"meta": dict(meta), **sections}), handle, indent=2, allow_nan=False)
        handle.write("\n")


__all__ += ["median", "calls_within", "interleaved_rates", "write_report"]
