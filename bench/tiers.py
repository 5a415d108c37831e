"""Tier throughput: each tierstore tier against the raw operation it wraps, in one run.

    python bench/tiers.py [--quick] [--json PATH] [--tiers memory,gpu,lmdb,file,s3]
                          [--sizes 4KiB,1MiB,32MiB] [--dir DIR]

For every tier and value size, ``get`` and ``put`` of the tier are timed against the raw
operation, interleaved batch by batch (see :func:`_common.paired_medians`), and the
medians are reported in MB/s (10**6 bytes/s) with ``ratio = tier / raw``; the target is
ratio >= 0.8 for values of 1 MiB and more. Values are incompressible ``bytes`` (what the
blob encoder hands the tiers); every ``put`` overwrites one key. The raw operations:

=======  ===========================================  ============================================
tier     raw get                                      raw put
=======  ===========================================  ============================================
memory   ``ndarray.copy()`` of the value              ``ndarray.copy()`` of the value
gpu      ``tensor.to("cpu", copy=True)``              ``torch.frombuffer(value).to(dev, copy=True)``
lmdb     read txn ``txn.get`` (buffers=False)         write txn ``put`` + commit, own env
file     ``os.open``/``os.read``/``os.close``         tmp ``open``/``write``/``fsync``/``close``
                                                      + ``os.replace`` + ``fsync`` of the directory
s3       boto3 ``get_object()["Body"].read()``        boto3 ``put_object``, same moto server
=======  ===========================================  ============================================

``memory`` also reports ``put_copy``: a put of a writable numpy array, which the tier
must copy (a ``bytes`` value is stored without a copy). ``s3`` also reports
``get_1req``/``put_1req`` for values larger than a part: the same tier configured with
parts larger than the value, so one request per call, like the raw calls. A tier whose module or backend
is missing is skipped with a note. Temporary files live under ``--dir`` (default: the
system temp dir) and are removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))  # run from a checkout: `python bench/tiers.py`
sys.path.insert(0, _HERE)

from _common import (bench_meta, format_size, format_table, mb_per_s,  # noqa: E402
                     paired_medians, parse_sizes, write_json)

ALL_TIERS = ("memory", "gpu", "lmdb", "file", "s3")
DEFAULT_SIZES = "4KiB,1MiB,32MiB"
TARGET_RATIO = 0.8
BUCKET = "tierstore-bench"

RAW_OPS = {
    "memory": {"get": "ndarray.copy()", "put": "ndarray.copy()", "put_copy": "ndarray.copy()"},
    "gpu": {"get": "tensor.to('cpu', copy=True)", "put": "torch.frombuffer(value).to(device, copy=True)",
            "note": "torch.set_num_threads(1) while measuring"},
    "lmdb": {"get": "read txn get, buffers=False", "put": "write txn put + commit (default sync flags)"},
    "file": {"get": "os.open/os.read/os.close", "put": "tmp open/write/fsync/close + os.replace + fsync(dir)"},
    "s3": {"get": "boto3 get_object()['Body'].read()", "put": "boto3 put_object",
           "get_1req/put_1req": "same raw ops; the tier with part_size and multipart_threshold above the value"},
}

#: op name -> (tier call, raw call), for one value size.
Ops = dict[str, tuple[Callable[[], Any], Callable[[], Any]]]


class Unavailable(Exception):
    """A tier cannot be measured here (module not written yet, backend missing)."""


def _need_module(name: str) -> None:
    if importlib.util.find_spec(f"tierstore.tiers.{name}") is None:
        raise Unavailable(f"tierstore/tiers/{name}.py does not exist yet")


# --------------------------------------------------------------------- tier setups
# Each setup is a context manager yielding ``ops_for(size, value) -> Ops``; it owns the
# tier, the raw backend and their files, and releases them on exit.

@contextlib.contextmanager
def memory_setup(workdir: str, max_size: int) -> Iterator[Callable[[int, bytes], Ops]]:
    from tierstore.tiers.memory import MemoryTier

    tier = MemoryTier()

    def ops_for(size: int, value: bytes) -> Ops:
        array = np.frombuffer(value, dtype=np.uint8)
        writable = array.copy()
        key = f"v/{size}"
        tier.put(key, value)
        return {
            "get": (lambda: tier.get(key), array.copy),
            "put": (lambda: tier.put(f"p/{size}", value), array.copy),
            "put_copy": (lambda: tier.put(f"p/{size}", writable), writable.copy),
        }

    try:
        yield ops_for
    finally:
        tier.close()


@contextlib.contextmanager
def gpu_setup(workdir: str, max_size: int) -> Iterator[Callable[[int, bytes], Ops]]:
    _need_module("gpu")
    try:
        import torch
    except ImportError as exc:
        raise Unavailable("torch is not installed (pip install 'tierstore[kv]')") from exc
    from tierstore.tiers.gpu import GpuTier

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tier = GpuTier(capacity_bytes=4 * max_size + (64 << 20), device=device)

    def ops_for(size: int, value: bytes) -> Ops:
        key = f"v/{size}"
        tier.put(key, value)
        stored = tier.get_tensor(key) if hasattr(tier, "get_tensor") else None
        if stored is None:
            stored = torch.frombuffer(bytearray(value), dtype=torch.uint8).to(device)

        def raw_put():
            out = torch.frombuffer(value, dtype=torch.uint8).to(device, copy=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out

        def tier_put():
            tier.put(f"p/{size}", value)
            if device.type == "cuda":
                torch.cuda.synchronize()

        return {
            "get": (lambda: tier.get(key), lambda: stored.to("cpu", copy=True)),
            "put": (tier_put, raw_put),
        }

    threads = torch.get_num_threads()
    # Torch's intra-op threads make its own host copies erratic on small machines (a
    # 1 MiB clone took 0.05 to 7 ms on 2 cores); the copies are memory-bound anyway.
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        # The raw put wraps a read-only ``bytes`` with torch.frombuffer, which warns; the
        # wrapper is only read by the copy, so the warning does not apply here.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        try:
            yield ops_for
        finally:
            tier.close()
            torch.set_num_threads(threads)


@contextlib.contextmanager
def lmdb_setup(workdir: str, max_size: int) -> Iterator[Callable[[int, bytes], Ops]]:
    _need_module("lmdb")
    import lmdb

    from tierstore.tiers.lmdb import LmdbTier

    map_size = 8 * max_size + (256 << 20)
    tier = LmdbTier(os.path.join(workdir, "lmdb-tier"), map_size=map_size)
    env = lmdb.open(os.path.join(workdir, "lmdb-raw"), map_size=map_size)

    def ops_for(size: int, value: bytes) -> Ops:
        key = f"v/{size}"
        tier.put(key, value)
        with env.begin(write=True) as txn:
            txn.put(key.encode(), value)

        def raw_get():
            with env.begin(buffers=False) as txn:
                return txn.get(key.encode())

        def raw_put():
            with env.begin(write=True) as txn:
                txn.put(f"p/{size}".encode(), value)

        return {"get": (lambda: tier.get(key), raw_get), "put": (lambda: tier.put(f"p/{size}", value), raw_put)}

    try:
        yield ops_for
    finally:
        tier.close()
        env.close()


@contextlib.contextmanager
def file_setup(workdir: str, max_size: int) -> Iterator[Callable[[int, bytes], Ops]]:
    _need_module("file")
    from tierstore.tiers.file import FileTier

    tier = FileTier(os.path.join(workdir, "file-tier"))
    raw_dir = os.path.join(workdir, "file-raw")
    os.makedirs(raw_dir)

    def ops_for(size: int, value: bytes) -> Ops:
        key = f"v-{size}"
        path = os.path.join(raw_dir, key)
        tier.put(key, value)
        _write_durably(path, value)

        def raw_get():
            fd = os.open(path, os.O_RDONLY)
            try:
                return os.read(fd, size)
            finally:
                os.close(fd)

        target = os.path.join(raw_dir, f"p-{size}")
        return {"get": (lambda: tier.get(key), raw_get),
                "put": (lambda: tier.put(f"p-{size}", value), lambda: _write_durably(target, value))}

    try:
        yield ops_for
    finally:
        tier.close()


def _write_durably(path: str, value: bytes) -> None:
    """The durable atomic write that FileTier makes: tmp file, fsync, rename, fsync dir."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(value)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def s3_setup(workdir: str, max_size: int) -> Iterator[Callable[[int, bytes], Ops]]:
    _need_module("s3")
    from tierstore.testing import MotoServer
    from tierstore.tiers.s3 import S3Tier

    with MotoServer() as server:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        tier = S3Tier(BUCKET, prefix="tier", endpoint_url=server.endpoint_url)
        # The same tier with parts larger than any value: one request per get and put, so
        # the tier's own overhead shows apart from its parallel-parts strategy.
        whole = max(max_size + 1, 5 << 20)
        single = S3Tier(BUCKET, prefix="single", endpoint_url=server.endpoint_url,
                        part_size=whole, multipart_threshold=whole)

        def ops_for(size: int, value: bytes) -> Ops:
            key = f"v/{size}"
            tier.put(key, value)
            single.put(key, value)
            client.put_object(Bucket=BUCKET, Key=f"raw/{key}", Body=value)

            def raw_get():
                return client.get_object(Bucket=BUCKET, Key=f"raw/{key}")["Body"].read()

            def raw_put():
                client.put_object(Bucket=BUCKET, Key=f"raw/p/{size}", Body=value)

            ops = {"get": (lambda: tier.get(key), raw_get), "put": (lambda: tier.put(f"p/{size}", value), raw_put)}
            if size > min(tier.part_size, tier.multipart_threshold):
                ops["get_1req"] = (lambda: single.get(key), raw_get)
                ops["put_1req"] = (lambda: single.put(f"p/{size}", value), raw_put)
            return ops

        try:
            yield ops_for
        finally:
            tier.close()
            single.close()
            client.close()


SETUPS = {"memory": memory_setup, "gpu": gpu_setup, "lmdb": lmdb_setup, "file": file_setup, "s3": s3_setup}


# ------------------------------------------------------------------------ running
def measure_tier(name: str, sizes: list[int], values: dict[int, bytes], workdir: str,
                 timing: dict[str, Any]) -> list[dict[str, Any]]:
    """Measure every op of one tier at every size; return the JSON records."""
    records = []
    tier_dir = tempfile.mkdtemp(prefix=f"{name}-", dir=workdir)
    with SETUPS[name](tier_dir, max(sizes)) as ops_for:
        for size in sizes:
            for op, (tier_call, raw_call) in ops_for(size, values[size]).items():
                started = time.perf_counter()
                tier_s, raw_s = paired_medians(tier_call, raw_call, **timing)
                tier_mbps, raw_mbps = mb_per_s(size, tier_s), mb_per_s(size, raw_s)
                records.append({"tier": name, "op": op, "value_bytes": size, "tier_MBps": round(tier_mbps, 2),
                                "raw_MBps": round(raw_mbps, 2), "ratio": round(tier_mbps / raw_mbps, 3)})
                print(f"  {name:6} {op:8} {format_size(size):>6}: ratio {tier_mbps / raw_mbps:6.3f} "
                      f"({time.perf_counter() - started:.1f}s)", file=sys.stderr, flush=True)
    return records


def _torch_device() -> str | None:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--tiers", default=",".join(ALL_TIERS), help="comma-separated, from: " + ",".join(ALL_TIERS))
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"value sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--dir", default=None, help="where temporary tier files go (default: system temp dir)")
    args = parser.parse_args(argv)

    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    unknown = sorted(set(tiers) - set(ALL_TIERS))
    if unknown:
        parser.error(f"unknown tier(s) {unknown}; choose from {','.join(ALL_TIERS)}")
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as exc:
        parser.error(str(exc))
    timing = ({"rounds": 5, "batch_seconds": 0.02, "max_calls": 1000} if args.quick
              else {"rounds": 11, "batch_seconds": 0.1, "max_calls": 20000})
    rng = np.random.default_rng(20240611)
    values = {size: rng.integers(0, 256, size, dtype=np.uint8).tobytes() for size in sizes}

    records: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tierstore-bench-", dir=args.dir) as workdir:
        for name in tiers:
            try:
                records += measure_tier(name, sizes, values, workdir, timing)
            except Unavailable as exc:
                skipped[name] = str(exc)
                print(f"  skipping {name}: {exc}", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started

    rows = [{**r, "size": format_size(r["value_bytes"]),
             "note": "below target" if r["value_bytes"] >= 1 << 20 and r["ratio"] < TARGET_RATIO else ""}
            for r in records]
    print(format_table(rows, [("tier", "tier", ""), ("op", "op", ""), ("size", "size", ""),
                              ("tier_MBps", "tier MB/s", ",.1f"), ("raw_MBps", "raw MB/s", ",.1f"),
                              ("ratio", "ratio", ".3f"), ("note", "", "")]))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print(f"({elapsed:.1f}s; target: ratio >= {TARGET_RATIO} for values of 1MiB and more)")
    if args.json:
        meta = bench_meta(benchmark="tiers", quick=args.quick, sizes=sizes, tiers=tiers, skipped=skipped,
                          timing=timing, elapsed_s=round(elapsed, 1),
                          raw_ops={t: RAW_OPS[t] for t in tiers}, target_ratio=TARGET_RATIO,
                          glibc_tunables=os.environ.get("GLIBC_TUNABLES"), device=_torch_device())
        write_json(args.json, records, meta)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
