"""KV-cache store: put/get per tier and codec against the raw tier read, codec quality and speed, break-even.

    python bench/kv.py [--quick | --smoke] [--json PATH] [--shared DIR] [--tiers memory,lmdb,s3]
                       [--sections quality,codecs,tiers,breakeven] [--layouts bytelm-man,llama3-8b]

Four sections, on 256-token chunks of two layouts: **bytelm-man** (8 layers, 2 KV heads,
head_dim 64: 4 KiB per token in fp16, its real KV) and a **Llama-3-8B**-shaped one (32
layers, 8 KV heads, head_dim 128: 128 KiB per token, 32 MiB per fp16 chunk; seeded normal
data whose keys have outlier channels, as real keys do).

1. ``quality``: nats/byte of bytelm-man on held-apart text when a 256-token context's KV
   is stored through each codec, minus the same with the KV as computed (paired over
   texts; see ``bench/_kv_quality.py``), and each codec's compression ratio.
2. ``codecs``: encode (every layer, then the chunk blob) and decode (blob check, then
   every layer) of one chunk on the CPU, in GB/s of fp16 KV; ratio and relative error.
3. ``tiers``: ``KVCacheStore.put`` / ``get`` of single-chunk sequences on the memory,
   LMDB and S3 (moto server on loopback) tiers, against the raw read of the very same
   blobs with ``kv.tier.get(key)`` (and ``kv.tier.put`` of them), interleaved in one
   run; ``get_prefix`` is one sequence of several chunks against ``tier.get_many`` of
   its keys. MB/s are of fp16 KV for the store and of stored bytes for the raw call;
   ``ratio = raw seconds / store seconds`` for the same chunks (for fp16 the MB/s ratio).
   The memory tier's raw get returns the stored ``bytes`` without a copy, so it also
   shows ``raw+copy``: that get plus one copy into a fresh tensor (the least any get
   that hands out tensors must do); its raw put likewise keeps the ``bytes`` given.
   A store put includes encoding; a raw put writes the already encoded blob.
4. ``breakeven``: seconds to load a chunk's KV from each tier with each codec against
   seconds to prefill it (bytelm-man forward of 256 tokens, float32 and bfloat16, this
   CPU). For the Llama-3-8B shape, prefill is extrapolated from bytelm-man's by FLOPs
   (labelled: no 8B model runs here).

Targets (issue): get >= 0.8 x raw for fp16 chunks; int8 >= 1.9x smaller at <= 0.01
nats/byte; int4 >= 3.5x smaller at <= 0.05 nats/byte. Codec and store work runs with
one torch thread (see ``_kv_quality.single_thread``), the model with all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))  # run from a checkout: `python bench/kv.py`
sys.path.insert(0, _HERE)

from _common import (bench_meta, calls_within, format_table, interleaved_rates, median,  # noqa: E402
                     median_seconds, write_report)
from _kv_quality import QUALITY_CODECS, codec_quality, load_model, load_sequences, single_thread  # noqa: E402

CHUNK_TOKENS = 256
ALL_SECTIONS = ("quality", "codecs", "tiers", "breakeven")
ALL_TIERS = ("memory", "lmdb", "s3")
BUCKET = "tierstore-bench-kv"
TARGETS = {"get_ratio_fp16": 0.8, "int8": {"ratio": 1.9, "nats_per_byte": 0.01},
           "int4": {"ratio": 3.5, "nats_per_byte": 0.05}}


@dataclass(frozen=True)
class Layout:
    name: str
    layers: int
    kv_heads: int
    head_dim: int

    @property
    def chunk_bytes(self) -> int:
        """fp16 bytes of one chunk's keys and values, all layers."""
        return 2 * self.layers * self.kv_heads * CHUNK_TOKENS * self.head_dim * 2


LAYOUTS = {"bytelm-man": Layout("bytelm-man", 8, 2, 64), "llama3-8b": Layout("llama3-8b", 32, 8, 128)}
# Llama-3-8B's shape, for the FLOPs of a prefill (the model itself is not available here).
LLAMA3_8B = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128, "layers": 32,
             "vocab": 128256}


@dataclass(frozen=True)
class Settings:
    texts: int
    rounds: int
    chunks: dict[str, int]            # layout -> chunks per tier measurement
    quality_codecs: tuple[str, ...]
    speed_codecs: tuple[str, ...]
    tier_codecs: tuple[str, ...]
    prefix_codecs: tuple[str, ...]    # codecs that also get a multi-chunk get_prefix row
    pass_seconds: float


PRESETS = {
    "full": Settings(texts=64, rounds=7, chunks={"bytelm-man": 32, "llama3-8b": 8},
                     quality_codecs=tuple(QUALITY_CODECS), speed_codecs=tuple(QUALITY_CODECS),
                     tier_codecs=("fp16", "int8", "int4-g64"), prefix_codecs=("fp16", "int8", "int4-g64"),
                     pass_seconds=0.3),
    "quick": Settings(texts=8, rounds=3, chunks={"bytelm-man": 8, "llama3-8b": 4},
                      quality_codecs=tuple(QUALITY_CODECS), speed_codecs=tuple(QUALITY_CODECS),
                      tier_codecs=("fp16", "int8", "int4-g64"), prefix_codecs=("fp16",), pass_seconds=0.15),
    "smoke": Settings(texts=3, rounds=1, chunks={"bytelm-man": 2, "llama3-8b": 1},
                      quality_codecs=("fp16", "int8", "int4-g64"), speed_codecs=("fp16", "int8", "int4-g64"),
                      tier_codecs=("fp16", "int8"), prefix_codecs=("fp16",), pass_seconds=0.02),
}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- KV data
def real_chunk(model: Any, shared: str) -> list[tuple[Any, Any]]:
    """bytelm-man's fp16 KV of the first 256 tokens of a held-apart text (3-D per layer)."""
    import torch

    from tierstore.store.kvcache.hf import cache_layers, output_cache

    tokens = load_sequences(shared, tokens=CHUNK_TOKENS, count=1)[0]
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([tokens]), use_cache=True)
    return [(k.to(torch.float16).contiguous(), v.to(torch.float16).contiguous())
            for k, v in cache_layers(output_cache(out))]


def synthetic_chunk(layout: Layout, seed: int = 0) -> list[tuple[Any, Any]]:
    """Seeded fp16 KV shaped like ``layout``: normal values; keys with a few outlier channels
    (scaled x8 and offset, as post-RoPE keys of real models have) per head."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    shape = (layout.kv_heads, CHUNK_TOKENS, layout.head_dim)
    out = []
    for _ in range(layout.layers):
        scale = torch.ones(layout.kv_heads, 1, layout.head_dim)
        offset = torch.zeros_like(scale)
        channels = torch.randint(0, layout.head_dim, (layout.kv_heads, 4), generator=gen)
        scale.scatter_(2, channels.unsqueeze(1), 8.0)
        offset.scatter_(2, channels.unsqueeze(1), 4.0)
        key = torch.randn(shape, generator=gen) * scale + offset
        value = torch.randn(shape, generator=gen)
        out.append((key.to(torch.float16), value.to(torch.float16)))
    return out


def build_codec(label: str) -> Any:
    from tierstore.store.kvcache.codecs import get_codec

    name, options = QUALITY_CODECS[label]
    return get_codec(name, **options)


# ---------------------------------------------------------------------------- 1. quality
def run_quality(model: Any, shared: str, settings: Settings) -> dict[str, Any]:
    sequences = load_sequences(shared, tokens=CHUNK_TOKENS + 128 + 1, count=settings.texts)
    codecs = {label: QUALITY_CODECS[label] for label in settings.quality_codecs}
    started = time.perf_counter()
    result = codec_quality(model, sequences, codecs, context=CHUNK_TOKENS, score=128, batch=8)
    result["seconds"] = time.perf_counter() - started
    result["texts_file"] = "queries_meta.jsonl.gz"
    return result


def quality_table(quality: dict[str, Any]) -> str:
    rows = [{**record, "codec": label} for label, record in quality["codecs"].items()]
    return format_table(rows, [("codec", "codec", "s"), ("compression_ratio", "ratio", ".3f"),
                               ("chunk_blob_bytes", "chunk bytes", ",.0f"), ("nats_per_byte", "nats/byte", ".4f"),
                               ("delta_nats_per_byte", "delta", "+.5f"), ("delta_se", "+- se", ".5f"),
                               ("delta_max_text", "worst text", "+.4f")])


# ---------------------------------------------------------------------------- 2. codec speed
def run_codecs(layouts: dict[str, list], settings: Settings) -> list[dict[str, Any]]:
    from tierstore.store.kvcache.chunks import decode_chunk, encode_chunk

    records = []
    with single_thread():
        for name, layers in layouts.items():
            layout = LAYOUTS[name]
            reference = [(k.float(), v.float()) for k, v in layers]
            for label in settings.speed_codecs:
                codec = build_codec(label)

                def encode(codec=codec) -> bytes:
                    return encode_chunk([codec.encode(k, v) for k, v in layers])

                blob = encode()
                decoded = decode_chunk(blob)[1]
                num = sum(float(((k2.float() - k) ** 2).sum() + ((v2.float() - v) ** 2).sum())
                          for (k, v), (k2, v2) in zip(reference, decoded))
                den = sum(float((k ** 2).sum() + (v ** 2).sum()) for k, v in reference)
                timing = {"rounds": settings.rounds, "batch_seconds": settings.pass_seconds / 3}
                encode_s = median_seconds(encode, **timing)
                decode_s = median_seconds(lambda blob=blob: decode_chunk(blob), **timing)
                records.append({"layout": name, "codec": label, "fp16_bytes": layout.chunk_bytes,
                                "blob_bytes": len(blob), "compression_ratio": layout.chunk_bytes / len(blob),
                                "bits_per_value": len(blob) * 8 / (layout.chunk_bytes / 2),
                                "rel_rmse": math.sqrt(num / den), "encode_ms": encode_s * 1e3,
                                "decode_ms": decode_s * 1e3, "encode_GBps": layout.chunk_bytes / encode_s / 1e9,
                                "decode_GBps": layout.chunk_bytes / decode_s / 1e9})
                log(f"  codecs {name} {label}: encode {encode_s * 1e3:.1f} ms, decode {decode_s * 1e3:.1f} ms")
                del decoded
            del reference
    return records


def codecs_table(records: list[dict[str, Any]]) -> str:
    return format_table(records, [("layout", "layout", "s"), ("codec", "codec", "s"),
                                  ("compression_ratio", "ratio", ".3f"), ("bits_per_value", "bits/value", ".2f"),
                                  ("rel_rmse", "rel. RMSE", ".4f"), ("encode_ms", "encode ms", ".2f"),
                                  ("encode_GBps", "enc GB/s", ".2f"), ("decode_ms", "decode ms", ".2f"),
                                  ("decode_GBps", "dec GB/s", ".2f")])


# ---------------------------------------------------------------------------- 3. tiers
@contextlib.contextmanager
def open_database(tier: str, workdir: str, s3: dict[str, Any] | None) -> Iterator[Any]:
    """A fresh database on ``tier``; closed (and its files removed by the caller) after."""
    import tierstore

    if tier == "memory":
        from tierstore.tiers import MemoryTier

        db = tierstore.connect("memory", tier=MemoryTier())
    elif tier == "lmdb":
        db = tierstore.connect(tempfile.mkdtemp(prefix="kv-lmdb-", dir=workdir), map_size=4 << 30)
    else:
        assert s3 is not None
        db = tierstore.connect(f"s3://{BUCKET}/kv-{uuid.uuid4().hex[:8]}", endpoint_url=s3["endpoint_url"])
    try:
        yield db
    finally:
        db.close()
        if tier == "memory":
            db.tier.close()  # given to connect(), so the database leaves it open


def _tokens(seed: int, count: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, count, dtype=np.int64)


def _rate_passes(fns: list[Callable[[], Any]], rounds: int, pass_seconds: float) -> list[float]:
    """Median seconds per call of each fn, interleaved (N-way), each pass about ``pass_seconds``."""
    passes = []
    for fn in fns:
        calls = calls_within(lambda _i, fn=fn: fn(), 1000, pass_seconds)
        passes.append((lambda _i, fn=fn: fn(), calls))
    rates = interleaved_rates(passes, rounds=rounds)
    return [1.0 / median(r) for r in rates]


def _record(layout: Layout, tier: str, label: str, op: str, chunks: int, stored: int, store_s: float,
            raw_s: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One row: ``store_s``/``raw_s`` are seconds for ``chunks`` chunks of ``stored`` bytes each."""
    per_store, per_raw = store_s / chunks, raw_s / chunks
    return {"layout": layout.name, "tier": tier, "codec": label, "op": op, "chunks": chunks,
            "fp16_bytes": layout.chunk_bytes, "stored_bytes": stored,
            "store_ms": per_store * 1e3, "raw_ms": per_raw * 1e3,
            "store_MBps": layout.chunk_bytes / per_store / 1e6, "raw_MBps": stored / per_raw / 1e6,
            "chunks_per_s": 1.0 / per_store, "ratio": per_raw / per_store, **(extra or {})}


def measure_store(db: Any, tier: str, layout: Layout, layers: list, label: str, settings: Settings,
                  seed: int) -> list[dict[str, Any]]:
    """get, put and (for prefix codecs) get_prefix of one codec on one tier."""
    import torch

    name, options = QUALITY_CODECS[label]
    n = settings.chunks[layout.name]
    kv = db.kv_cache(model=f"bench-{layout.name}", revision="v1", codec=name, codec_options=options,
                     chunk_tokens=CHUNK_TOKENS, dtype="float16", layers=layout.layers, kv_heads=layout.kv_heads,
                     head_dim=layout.head_dim)
    records = []
    try:
        seqs = [_tokens(seed + i, CHUNK_TOKENS) for i in range(n)]
        for s in seqs:
            kv.put(s, layers)
        keys = [kv.chunk_keys(s)[0] for s in seqs]
        blobs = [kv.tier.get(k) for k in keys]
        stored = len(blobs[0])
        got = kv.get(seqs[0])
        if got is None or len(got) != layout.layers or tuple(got[0][0].shape) != tuple(layers[0][0].shape):
            raise RuntimeError(f"{tier} {label}: get returned {type(got).__name__}, not the chunk put")
        if label in ("fp16", "bf16") and not torch.equal(got[-1][1], layers[-1][1]):
            raise RuntimeError(f"{tier} {label}: a lossless chunk did not round-trip exactly")
        del got

        def store_get():
            for s in seqs:
                kv.get(s)

        def raw_get():
            for k in keys:
                kv.tier.get(k)

        fns = [store_get, raw_get]
        if tier == "memory":
            def raw_get_copy():
                for k in keys:
                    torch.frombuffer(bytearray(kv.tier.get(k)), dtype=torch.uint8)
            fns.append(raw_get_copy)
        times = _rate_passes(fns, settings.rounds, settings.pass_seconds)
        extra = {}
        if tier == "memory":
            extra = {"raw_copy_ms": times[2] / n * 1e3, "ratio_vs_raw_copy": times[2] / times[0]}
        records.append(_record(layout, tier, label, "get", n, stored, times[0], times[1], extra))

        # put: fresh sequences every round (a put of stored chunks is skipped), the raw put
        # writes the same blobs under other keys; both deleted between rounds, untimed.
        put_s, raw_s = [], []
        for r in range(settings.rounds):
            fresh = [_tokens(seed + 10_000 * (r + 1) + i, CHUNK_TOKENS) for i in range(n)]
            raw_keys = [f"bench/raw/{uuid.uuid4().hex}" for _ in range(n)]

            def store_put():
                for s in fresh:
                    kv.put(s, layers)

            def raw_put():
                for k, b in zip(raw_keys, blobs):
                    kv.tier.put(k, b)

            for which in ((store_put, raw_put) if r % 2 == 0 else (raw_put, store_put)):
                t0 = time.perf_counter()
                which()
                (put_s if which is store_put else raw_s).append(time.perf_counter() - t0)
            for s in fresh:
                kv.delete(s)
            for k in raw_keys:
                kv.tier.delete(k)
        records.append(_record(layout, tier, label, "put", n, stored, median(put_s), median(raw_s)))

        if label in settings.prefix_codecs and n > 1:
            long_tokens = _tokens(seed + 999, n * CHUNK_TOKENS)
            long_layers = [(k.repeat(1, n, 1), v.repeat(1, n, 1)) for k, v in layers]
            kv.put(long_tokens, long_layers)
            del long_layers
            long_keys = kv.chunk_keys(long_tokens)
            times = _rate_passes([lambda: kv.get(long_tokens), lambda: kv.tier.get_many(long_keys)],
                                 settings.rounds, settings.pass_seconds)
            records.append(_record(layout, tier, label, "get_prefix", n, stored, times[0], times[1]))
            kv.delete(long_tokens)
        for s in seqs:
            kv.delete(s)
    finally:
        kv.close()
    for rec in records:
        log(f"  tiers {layout.name} {tier:6} {label:9} {rec['op']:10}: {rec['store_MBps']:9.1f} MB/s, "
            f"ratio {rec['ratio']:.3f}")
    return records


@contextlib.contextmanager
def s3_endpoint(tiers: list[str]) -> Iterator[dict[str, Any] | None]:
    if "s3" not in tiers:
        yield None
        return
    from tierstore.testing import MotoServer

    with MotoServer() as server:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        try:
            yield {"endpoint_url": server.endpoint_url}
        finally:
            client.close()


def run_tiers(layouts: dict[str, list], tiers: list[str], settings: Settings, workdir: str,
              notes: list[str]) -> list[dict[str, Any]]:
    records = []
    with single_thread(), s3_endpoint(tiers) as s3:
        for seed, (name, layers) in enumerate(layouts.items()):
            for tier in tiers:
                for label in settings.tier_codecs:
                    try:
                        with open_database(tier, workdir, s3) as db:
                            records += measure_store(db, tier, LAYOUTS[name], layers, label, settings,
                                                     seed=1000 * seed)
                    except ImportError as exc:
                        notes.append(f"tier {tier} skipped: {exc}")
                        log(f"  tiers: {tier} skipped ({exc})")
                        break
    return records


def tiers_table(records: list[dict[str, Any]]) -> str:
    return format_table(records, [("layout", "layout", "s"), ("tier", "tier", "s"), ("codec", "codec", "s"),
                                  ("op", "op", "s"), ("chunks", "chunks", "d"), ("stored_bytes", "stored B", ",d"),
                                  ("store_ms", "store ms", ".3f"), ("store_MBps", "store MB/s", ",.1f"),
                                  ("chunks_per_s", "chunks/s", ",.1f"), ("raw_ms", "raw ms", ".3f"),
                                  ("raw_MBps", "raw MB/s", ",.1f"), ("ratio", "raw/store", ".3f"),
                                  ("raw_copy_ms", "raw+copy ms", ".3f"),
                                  ("ratio_vs_raw_copy", "(raw+copy)/store", ".3f")])


# ---------------------------------------------------------------------------- 4. break-even
def prefill_seconds(shared: str, settings: Settings) -> dict[str, dict[str, float]]:
    """Median seconds of one bytelm-man forward over a 256-token chunk (batch 1, cache on),
    per model dtype and torch thread count (all threads, and one: on a loaded small machine
    one thread can be the faster)."""
    import torch

    tokens = torch.tensor([load_sequences(shared, tokens=CHUNK_TOKENS, count=1)[0]])
    threads = torch.get_num_threads()
    out: dict[str, dict[str, float]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(shared, dtype)
        timings = {}
        for count in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(count)
            try:
                with torch.inference_mode():
                    timings[f"threads_{count}"] = median_seconds(
                        lambda model=model: model(input_ids=tokens, use_cache=True),
                        rounds=max(5, settings.rounds), batch_seconds=0.0)
            finally:
                torch.set_num_threads(threads)
        timings["best"] = min(timings.values())
        out[str(dtype).removeprefix("torch.")] = timings
        del model
    return out


def prefill_flops(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int,
                  vocab: int, tokens: int) -> float:
    """Multiply-adds x2 of a causal prefill: projections, MLP, LM head, attention scores/values."""
    per_layer = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2 + 3 * hidden * intermediate
    attention = 2 * 2 * layers * heads * head_dim * tokens * (tokens + 1) / 2
    return 2.0 * tokens * (layers * per_layer + hidden * vocab) + attention


def run_breakeven(tier_records: list[dict[str, Any]], prefill: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Load seconds (the tiers section's get, per chunk) against prefill seconds (the faster
    thread setting). ``breakeven_MBps``: the fp16 KV throughput at which loading a chunk
    takes as long as recomputing it in bfloat16; a tier slower than that loses."""
    bytelm = prefill_flops(8, 512, 1408, 8, 2, 64, 258, CHUNK_TOKENS)
    llama = prefill_flops(LLAMA3_8B["layers"], LLAMA3_8B["hidden"], LLAMA3_8B["intermediate"], LLAMA3_8B["heads"],
                          LLAMA3_8B["kv_heads"], LLAMA3_8B["head_dim"], LLAMA3_8B["vocab"], CHUNK_TOKENS)
    measured = {dt: t["best"] for dt, t in prefill.items()}
    extrapolated = {dt: s * llama / bytelm for dt, s in measured.items()}
    rows = []
    for rec in tier_records:
        if rec["op"] != "get":
            continue
        base = measured if rec["layout"] == "bytelm-man" else extrapolated
        load_s = rec["store_ms"] / 1e3
        rows.append({"layout": rec["layout"], "tier": rec["tier"], "codec": rec["codec"], "load_ms": rec["store_ms"],
                     "prefill_fp32_ms": base["float32"] * 1e3, "prefill_bf16_ms": base["bfloat16"] * 1e3,
                     "speedup_fp32": base["float32"] / load_s, "speedup_bf16": base["bfloat16"] / load_s,
                     "breakeven_MBps": rec["fp16_bytes"] / base["bfloat16"] / 1e6,
                     "prefill": "measured" if rec["layout"] == "bytelm-man" else "extrapolated by FLOPs"})
    return {"prefill_s_bytelm": prefill, "prefill_s_llama3_8b_extrapolated": extrapolated,
            "flops_bytelm_chunk": bytelm, "flops_llama3_8b_chunk": llama, "rows": rows}


def breakeven_table(rows: list[dict[str, Any]]) -> str:
    return format_table(rows, [("layout", "layout", "s"), ("tier", "tier", "s"), ("codec", "codec", "s"),
                               ("load_ms", "load ms", ".3f"), ("prefill_fp32_ms", "prefill fp32 ms", ",.1f"),
                               ("speedup_fp32", "x faster", ",.1f"), ("prefill_bf16_ms", "prefill bf16 ms", ",.1f"),
                               ("speedup_bf16", "x faster", ",.1f"), ("breakeven_MBps", "break-even MB/s", ",.1f"),
                               ("prefill", "prefill", "s")])


# ---------------------------------------------------------------------------- targets and main
def check_targets(quality: dict | None, codecs: list[dict], tiers: list[dict]) -> dict[str, Any]:
    """Each target of the issue against what was measured.

    fp16 get: ``raw/store`` against ``kv.tier.get``; on the memory tier, whose raw get
    hands out the stored bytes without a copy, against raw get + one copy instead.
    A codec's ratio is the smallest measured (quality chunks and the codec section)."""
    out: dict[str, Any] = {}
    fp16_gets = [r for r in tiers if r["codec"] == "fp16" and r["op"] == "get"]
    if fp16_gets:
        ratios = {f"{r['layout']}/{r['tier']}": r.get("ratio_vs_raw_copy", r["ratio"]) for r in fp16_gets}
        out["get_ratio_fp16"] = ratios
        out["get_ratio_fp16_baseline"] = {"memory": "raw get + one copy", "other tiers": "raw get"}
        out["get_ratio_fp16_met"] = {k: v >= TARGETS["get_ratio_fp16"] for k, v in ratios.items()}
    for family in ("int8", "int4"):
        rows = {}
        for label in QUALITY_CODECS:
            if QUALITY_CODECS[label][0] != family:
                continue
            ratios = [r["compression_ratio"] for r in codecs if r["codec"] == label]
            q = (quality or {}).get("codecs", {}).get(label)
            if q is not None:
                ratios.append(q["compression_ratio"])
            if not ratios:
                continue
            loss = q["delta_nats_per_byte"] if q is not None else None
            rows[label] = {"min_ratio": min(ratios), "delta_nats_per_byte": loss,
                           "met": min(ratios) >= TARGETS[family]["ratio"]
                           and (loss is None or loss <= TARGETS[family]["nats_per_byte"])}
        if rows:
            out[family] = rows
    return out


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "torch_interop_threads":
                            torch.get_num_interop_threads(), "machine": platform.machine()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                                     None)
        with open("/proc/meminfo", encoding="utf-8") as f:
            info["mem_total_kib"] = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
        info["loadavg"] = os.getloadavg()
    except (OSError, StopIteration, ValueError):
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer texts, chunks and rounds (about 3 minutes)")
    mode.add_argument("--smoke", action="store_true", help="a tiny run that exercises everything (tests)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--shared", default=os.path.join(os.path.dirname(_HERE), "..", "shared"),
                        help="the shared folder with models/bytelm-man and data/manpages-minilm")
    parser.add_argument("--sections", default=",".join(ALL_SECTIONS), help="from: " + ",".join(ALL_SECTIONS))
    parser.add_argument("--tiers", default=",".join(ALL_TIERS), help="from: " + ",".join(ALL_TIERS))
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="from: " + ",".join(LAYOUTS))
    parser.add_argument("--texts", type=int, help="held-apart texts scored in the quality section")
    parser.add_argument("--dir", default=None, help="where temporary LMDB files go (default: system temp dir)")
    args = parser.parse_args(argv)

    preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    settings = PRESETS[preset]
    if args.texts:
        settings = Settings(**{**settings.__dict__, "texts": args.texts})
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    layout_names = [name.strip() for name in args.layouts.split(",") if name.strip()]
    for what, given, allowed in (("section", sections, ALL_SECTIONS), ("tier", tiers, ALL_TIERS),
                                 ("layout", layout_names, tuple(LAYOUTS))):
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            parser.error(f"unknown {what}(s) {unknown}; choose from {','.join(allowed)}")
    shared = os.path.abspath(args.shared)
    if not os.path.isdir(os.path.join(shared, "models", "bytelm-man")):
        parser.error(f"{shared} has no models/bytelm-man; pass --shared DIR")
    if "breakeven" in sections and "tiers" not in sections:
        parser.error("the breakeven section uses the tiers section's loads: add tiers to --sections")

    import torch

    started = time.perf_counter()
    meta = bench_meta(bench="kv", preset=preset, chunk_tokens=CHUNK_TOKENS, sections=sections, tiers=tiers,
                      layouts={n: LAYOUTS[n].__dict__ for n in layout_names}, settings=settings.__dict__,
                      targets=TARGETS, **machine_info())
    report: dict[str, Any] = {}
    notes: list[str] = []
    section_s: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        section_s[name] = now - mark
        mark = now

    model = load_model(shared, torch.float32)

    quality = None
    if "quality" in sections:
        log(f"quality: {settings.texts} texts x {len(settings.quality_codecs)} codecs")
        quality = run_quality(model, shared, settings)
        report["quality"] = quality
        lap("quality")
    data = {}
    if "bytelm-man" in layout_names:
        data["bytelm-man"] = real_chunk(model, shared)
    if "llama3-8b" in layout_names:
        data["llama3-8b"] = synthetic_chunk(LAYOUTS["llama3-8b"])
    del model
    codecs: list[dict[str, Any]] = []
    if "codecs" in sections:
        log("codecs: encode/decode of one chunk")
        codecs = run_codecs(data, settings)
        report["codecs"] = codecs
        lap("codecs")
    tier_records: list[dict[str, Any]] = []
    if "tiers" in sections:
        log("tiers: put/get against the raw tier")
        workdir = tempfile.mkdtemp(prefix="kv-bench-", dir=args.dir)
        try:
            tier_records = run_tiers(data, tiers, settings, workdir, notes)
        finally:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        report["tiers"] = tier_records
        lap("tiers")
    if "breakeven" in sections:
        log("breakeven: prefill of a 256-token chunk")
        report["breakeven"] = run_breakeven(tier_records, prefill_seconds(shared, settings))
        lap("breakeven")
    report["targets"] = check_targets(quality, codecs, tier_records)
    meta["seconds"] = time.perf_counter() - started
    meta["section_seconds"] = section_s
    meta["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    meta["notes"] = notes

    print(f"KV-cache benchmark ({preset}): {CHUNK_TOKENS}-token chunks; torch threads {meta['torch_threads']} "
          f"(codec and store work on 1); {meta['seconds']:.0f} s, peak RSS {meta['peak_rss_mib']:.0f} MiB")
    if quality is not None:
        print(f"\n1. quality: bytelm-man ({quality['model_dtype']}) on {quality['texts']} held-apart texts, "
              f"{quality['context_tokens']} context tokens stored, next {quality['scored_tokens']} scored; "
              f"reference {quality['reference']['nats_per_byte']:.4f} nats/byte")
        print(quality_table(quality))
    if codecs:
        print("\n2. codecs: one chunk, encode = every layer + chunk blob, decode = blob check + every layer (1 thread)")
        print(codecs_table(codecs))
    if tier_records:
        print("\n3. tiers: per chunk; store MB/s of fp16 KV, raw MB/s of stored bytes; raw/store = raw s / store s")
        print(tiers_table(tier_records))
    if "breakeven" in report:
        b = report["breakeven"]
        timings = "; ".join(f"{dt} " + ", ".join(f"{k.replace('_', ' ')} {v * 1e3:.1f} ms" for k, v in t.items()
                                                  if k != "best") for dt, t in b["prefill_s_bytelm"].items())
        print(f"\n4. break-even: load a chunk (tiers' get) vs prefill it. bytelm-man, 256 tokens, this CPU: {timings} "
              f"(the faster is used). Llama-3-8B: that x{b['flops_llama3_8b_chunk'] / b['flops_bytelm_chunk']:.0f} "
              f"by FLOPs, a CPU extrapolation, not a GPU figure")
        print(breakeven_table(b["rows"]))
    print("\ntargets:\n  " + summarize_targets(report["targets"]))
    for note in notes:
        print("note: " + note)
    if args.json:
        write_report(args.json, meta, **report)
    return 0


def summarize_targets(targets: dict[str, Any]) -> str:
    lines = []
    if "get_ratio_fp16" in targets:
        lines.append(f"fp16 get >= {TARGETS['get_ratio_fp16']} x raw (memory: x raw+copy): " + ", ".join(
            f"{where} {ratio:.2f} {'met' if targets['get_ratio_fp16_met'][where] else 'NOT met'}"
            for where, ratio in targets["get_ratio_fp16"].items()))
    for family in ("int8", "int4"):
        rows = targets.get(family, {})
        if rows:
            lines.append(f"{family} >= {TARGETS[family]['ratio']}x at <= {TARGETS[family]['nats_per_byte']} "
                         "nats/byte: " + ", ".join(
                             f"{label} {row['min_ratio']:.2f}x"
                             + (f" {row['delta_nats_per_byte']:+.4f}" if row["delta_nats_per_byte"] is not None
                                else "") + (" met" if row["met"] else " NOT met")
                             for label, row in rows.items()))
    return "\n  ".join(lines) if lines else "none measured"


if __name__ == "__main__":
    raise SystemExit(main())
