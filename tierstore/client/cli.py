"""The ``tierstore`` command line.

``tierstore demo`` runs a small workload over a memory + LMDB + file tier stack and
prints what each level did; later releases grow it into the full RAG demo.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]


def _format_table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.rjust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(str(r[c]).rjust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _human(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return str(nbytes)


def run_tier_demo(path: Path, *, values: int, reads: int, write_policy: str, seed: int = 0) -> dict:
    """Write ``values`` values of mixed sizes through a 3-level stack, read them with a
    skewed (Zipf-like) pattern, verify every byte, and return the per-level statistics."""
    from tierstore.tiers import FileTier, LmdbTier, MemoryTier, TieredStore

    rng = random.Random(seed)
    sizes = [rng.choice([512, 4096, 65536, 1 << 20]) for _ in range(values)]
    payload = {f"demo/{i:05d}": rng.randbytes(size) for i, size in enumerate(sizes)}
    total = sum(sizes)
    store = TieredStore(
        [MemoryTier(name="memory"), LmdbTier(path / "lmdb", name="lmdb"), FileTier(path / "files", name="file")],
        budgets=[max(total // 10, 1 << 20), max(total // 3, 2 << 20), None],
        write_policy=write_policy, policy="lru")
    started = time.perf_counter()
    try:
        store.put_many(payload)
        keys = list(payload)
        weights = [1.0 / (rank + 1) for rank in range(len(keys))]
        for key in rng.choices(keys, weights=weights, k=reads):
            if store.get(key) != payload[key]:
                raise SystemExit(f"demo: value of {key} came back different; the store is broken")
        store.flush()
        elapsed = time.perf_counter() - started
        stats = store.stats()
    finally:
        store.close()
    levels = [{"level": i, "tier": s.name, "hits": s.hits, "misses": s.misses, "hit_rate": (
        f"{s.hits / s.gets:.2f}" if s.gets else "-"), "evictions": s.evictions, "promotions": s.promotions,
        "demotions": s.demotions, "stored": _human(s.bytes_stored), "budget": _human(s.capacity_bytes),
        "read": _human(s.bytes_read), "written": _human(s.bytes_written)} for i, s in enumerate(stats.levels)]
    return {"values": values, "bytes": total, "reads": reads, "write_policy": write_policy,
            "seconds": round(elapsed, 3), "store": {"gets": stats.gets, "hits": stats.hits, "misses": stats.misses},
            "levels": levels}


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.path:
        path = Path(args.path)
        path.mkdir(parents=True, exist_ok=True)
        report = run_tier_demo(path, values=args.values, reads=args.reads, write_policy=args.write_policy)
    else:
        with tempfile.TemporaryDirectory(prefix="tierstore-demo-") as tmp:
            report = run_tier_demo(Path(tmp), values=args.values, reads=args.reads, write_policy=args.write_policy)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"tierstore demo: {report['values']} values ({_human(report['bytes'])}), {report['reads']} skewed reads, "
          f"{report['write_policy']}, every byte verified, {report['seconds']} s")
    columns = ["level", "tier", "hits", "misses", "hit_rate", "evictions", "promotions", "demotions",
               "stored", "budget", "read", "written"]
    print(_format_table(report["levels"], columns))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tierstore", description="Storage-tiered vector search and KV-cache store.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="exercise a memory+LMDB+file tier stack and print its statistics",
                          description="Write values through a memory + LMDB + file hierarchy, read them back with "
                                      "a skewed pattern, verify every byte and print what each tier did.")
    demo.add_argument("--path", help="directory for the LMDB and file tiers (default: a temporary one)")
    demo.add_argument("--values", type=int, default=400, help="number of values to write (default 400)")
    demo.add_argument("--reads", type=int, default=4000, help="number of skewed reads (default 4000)")
    demo.add_argument("--write-policy", choices=["write-through", "write-back"], default="write-through")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "values", 1) < 1 or getattr(args, "reads", 0) < 0:
        print("tierstore: --values must be >= 1 and --reads >= 0", file=sys.stderr)
        return 2
    from tierstore.errors import TierstoreError

    try:
        return args.handler(args)
    except TierstoreError as exc:
        print(f"tierstore: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
