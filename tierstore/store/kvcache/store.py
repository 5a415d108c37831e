"""KVCacheStore: chunk KV caches kept in the tiers instead of recomputed.

Open one with :meth:`tierstore.Database.kv_cache`::

    kv = db.kv_cache(model="org/model", revision="abc123", codec="int8")
    kv.put(token_ids, past_key_values)     # per layer (key, value), (kv_heads, tokens, head_dim)
    n = kv.lookup_prefix(token_ids)        # leading tokens cached (no side effect)
    layers = kv.get(token_ids[:n])         # same structure, or None on a miss

**Two key modes.** ``mode="prefix"`` (default) cuts tokens into chunks of
``chunk_tokens`` whose keys chain (a chunk's key names its whole prefix; LMCache/vLLM
prefix caching); ``mode="content"`` keys a RAG chunk by its own tokens, so it can be
reused at any position (``get(..., position=p)`` re-rotates its RoPE keys from the
position it was computed at, which the chunk records; see
:mod:`tierstore.store.kvcache.blend` for selective recompute). Every key includes the
model id, revision, dtype, tensor layout and codec (:class:`KVLayout`): a change of any
of them is a miss, never stale KV.

**Layout.** Give ``dtype``, ``layers``, ``kv_heads`` and ``head_dim`` (or a transformers
model as ``model``); otherwise the first ``put`` fixes them and records them under
``kv/layouts/`` so another process opening the store with the same model, revision and
codec finds them.

**Storage.** One blob per chunk (:mod:`~tierstore.store.kvcache.chunks`): all layers,
each layer separately readable by range (:meth:`get_layers` loads only some layers).
``memory_cache=bytes`` keeps recently used chunks in memory above the database's tier
with the cost-aware policy (GreedyDual-Size-Frequency with cost = tokens x layers, so
chunks that are expensive to recompute stay hot). Reads verify checksums: a damaged
chunk is :class:`~tierstore.errors.CorruptData`, never garbage KV.

**Inputs and outputs.** ``past_key_values``: a transformers cache (``DynamicCache``), or
one ``(key, value)`` per layer, each ``(kv_heads, tokens, head_dim)`` or batch-1
``(1, kv_heads, tokens, head_dim)``; its tokens may run past ``token_ids`` (the
leading ones are stored). ``get`` returns ``format="layers"`` (3-D pairs, default),
``"batched"`` (4-D, batch 1) or ``"dynamic_cache"``. A failed ``put`` (bad shape, dtype,
layer count, tokens) raises before anything is written.

Every method has an ``_async`` twin that runs in the store's thread pool, so an
event loop is never blocked by LMDB, S3 or torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from xxhash import xxh3_128

from ...errors import AlreadyExists, ConfigError, InvalidArgument, InvalidType, NotFound, StoreClosed
from ...tiers.base import BaseTier
from ..blob import fetch_header
from . import hf
from .chunks import (ChunkHeader, chunk_header, chunk_payload, decode_chunk, decode_layers, decode_payload, encode_chunk,
                     layer_range, verify_layer)
from .device_cache import DeviceChunkCache
from .codecs import _INPUT_DTYPES, KVCodec, _dtype_name, get_codec
from .keys import KVLayout, check_tokens, checked_content_key, checked_prefix_keys, chunk_spans

__all__ = ["KVCacheStore", "MODES", "FORMATS"]

MODES = ("prefix", "content")
FORMATS = ("layers", "batched", "dynamic_cache")
_HEADER_CACHE = 4096


def _owns_reads(tier: BaseTier) -> bool:
    """True when the tier's reads return bytes no one else holds (safe to view in place)."""
    from ...tiers.file import FileTier
    from ...tiers.lmdb import LmdbTier
    from ...tiers.s3 import S3Tier

    return type(tier) in (LmdbTier, FileTier, S3Tier)


class KVCacheStore:
    """Chunk KV caches of one model revision and codec in a tier; see the module docstring.

    :param tier: where chunks live (the database's tier; a memory level is added in
        front when ``memory_cache`` is set).
    :param model: model id (str) or a transformers model (its config gives the layout).
    :param revision: weights revision; part of every key.
    :param codec: codec name (:data:`~tierstore.store.kvcache.codecs.CODEC_NAMES`) or a
        :class:`KVCodec`; ``codec_options`` go to :func:`get_codec`.
    :param chunk_tokens: tokens per chunk in prefix mode.
    :param mode: ``"prefix"`` or ``"content"``.
    :param dtype, layers, kv_heads, head_dim: the layout (see the module docstring).
    :param memory_cache: bytes of chunks kept in memory (cost-aware eviction), or None.
    :param gpu_cache: bytes of verified chunk payloads kept on ``gpu_device`` (default: CUDA
        when available), so loads to that device skip the host read, the transfer and the
        checksum (:mod:`~tierstore.store.kvcache.device_cache`); or None.
    :param rope: a :class:`~tierstore.store.kvcache.rope.RopeSpec` for re-rotating keys
        in content mode (taken from ``model`` when that is a transformers model).
    """

    def __init__(self, tier: BaseTier, *, model: Any, revision: str, codec: str | KVCodec = "fp16",
                 chunk_tokens: int = 256, mode: str = "prefix", codec_options: dict | None = None,
                 dtype: Any = None, layers: int | None = None, kv_heads: int | None = None,
                 head_dim: int | None = None, memory_cache: int | None = None, rope: Any = None,
                 max_workers: int = 8, gpu_cache: int | None = None, gpu_device: Any = None) -> None:
        if not isinstance(tier, BaseTier):
            raise InvalidType(f"tier must be a tierstore tier, got {type(tier).__name__}")
        if mode not in MODES:
            raise InvalidArgument(f"mode must be one of {MODES}, got {mode!r}")
        chunk_spans(1, chunk_tokens)  # validates chunk_tokens
        if isinstance(codec, KVCodec):
            if codec_options:
                raise InvalidArgument("give codec options to get_codec() or as codec_options, not both")
            self.codec = codec
        else:
            self.codec = get_codec(codec, **(codec_options or {}))
        if not isinstance(revision, str) or not revision:
            raise InvalidType(f"revision must be a non-empty str (a commit hash or tag), got {revision!r}")
        given: dict[str, Any] = {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim}
        if not isinstance(model, str):
            given = {**hf.layout_of_model(model), **{k: v for k, v in given.items() if v is not None}}
            if dtype is None and getattr(model, "dtype", None) is not None:
                dtype = model.dtype
            if rope is None:
                from .rope import RopeSpec

                rope = RopeSpec.from_model(model)
            model = _model_id(model)
        if not isinstance(model, str) or not model:
            raise InvalidType(f"model must be a non-empty str or a transformers model, got {model!r}")
        if dtype is not None:
            given["dtype"] = _dtype_arg(dtype)
        self.model, self.revision, self.mode, self.chunk_tokens, self.rope = model, revision, mode, chunk_tokens, rope
        self._given = {k: v for k, v in given.items() if v is not None}
        self._layout: KVLayout | None = None
        if len(self._given) == 4:
            self._layout = self._make_layout(self._given)
        self._base_tier = tier
        self.tier = self._with_memory_cache(tier, memory_cache)
        self._device_cache = None if gpu_cache is None else DeviceChunkCache(gpu_cache, gpu_device)
        self._borrow = _owns_reads(self.tier)
        # Two pools: calls (batches, async twins) run in one, the tier reads and writes
        # they fan out run in the other, so a batch never waits on its own queue.
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="tierstore-kv")
        self._io = ThreadPoolExecutor(max_workers, thread_name_prefix="tierstore-kv-io")
        self._lock = threading.Lock()
        self._headers: OrderedDict[str, ChunkHeader] = OrderedDict()
        self._counters = {"puts": 0, "chunks_written": 0, "chunks_skipped": 0, "bytes_written": 0, "gets": 0,
                          "hits": 0, "misses": 0, "chunks_read": 0, "bytes_read": 0, "encode_s": 0.0,
                          "decode_s": 0.0, "read_s": 0.0, "write_s": 0.0}
        self._recorded = False
        self._closed = False

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _with_memory_cache(tier: BaseTier, memory_cache: int | None) -> BaseTier:
        if memory_cache is None:
            return tier
        if isinstance(memory_cache, bool) or not isinstance(memory_cache, int) or memory_cache <= 0:
            raise InvalidArgument(f"memory_cache must be a positive byte count or None, got {memory_cache!r}")
        from ...tiers.hierarchy import TieredStore
        from ...tiers.memory import MemoryTier

        return TieredStore([MemoryTier(memory_cache), tier], policy="cost", borrowed=(tier,))

    def _make_layout(self, fields: dict) -> KVLayout:
        return KVLayout(model=self.model, revision=self.revision, dtype=fields["dtype"], layers=fields["layers"],
                        kv_heads=fields["kv_heads"], head_dim=fields["head_dim"], codec=self.codec.key())

    @property
    def layout(self) -> KVLayout | None:
        """The layout keys are made for (None until given, put or found recorded)."""
        return self._layout

    def _records_prefix(self) -> str:
        ident = json.dumps([self.model, self.revision, self.codec.key()], separators=(",", ":"))
        return f"kv/layouts/{xxh3_128(ident.encode('utf-8')).hexdigest()}/"

    def _record_layout(self) -> None:
        if self._recorded:
            return
        layout = self._layout
        key = self._records_prefix() + layout.fingerprint()
        body = json.dumps({f: getattr(layout, f) for f in ("model", "revision", "dtype", "layers", "kv_heads",
                                                            "head_dim", "codec")}, sort_keys=True)
        with contextlib.suppress(AlreadyExists):  # another store recorded it first: the same layout
            self._base_tier.put(key, body.encode("utf-8"), mode="create")
        self._recorded = True

    def _find_layout(self) -> KVLayout | None:
        """The recorded layout matching what was given, for a store that has not put yet."""
        if self._layout is not None:
            return self._layout
        found = []
        for key in self._base_tier.list(self._records_prefix()):
            try:
                fields = json.loads(self._base_tier.get(key))
                layout = self._make_layout(fields)
            except (ValueError, TypeError, KeyError):
                continue  # a damaged record: ignore it, as if absent
            if all(getattr(layout, k) == v for k, v in self._given.items()):
                found.append(layout)
        if len(found) > 1:
            options = ", ".join(f"{l.dtype} {l.layers}x{l.kv_heads}x{l.head_dim}" for l in found)
            raise ConfigError(f"KV caches of {self.model}@{self.revision} exist with several layouts ({options}); "
                              "pass dtype=, layers=, kv_heads=, head_dim= to choose one")
        if found:
            with self._lock:
                self._layout = self._layout or found[0]
                self._recorded = True
        return self._layout

    # ------------------------------------------------------------------ keys
    def chunk_keys(self, token_ids: object) -> list[str]:
        """The tier keys of the chunks of ``token_ids`` ([] while no layout is known)."""
        self._check_open()
        layout = self._find_layout()
        return [] if layout is None else self._keys(layout, check_tokens(token_ids))

    def _keys(self, layout: KVLayout, tokens) -> list[str]:
        """Chunk keys of checked ``tokens`` (see :func:`check_tokens`)."""
        if self.mode == "content":
            return [checked_content_key(layout, tokens)]
        return checked_prefix_keys(layout, tokens, self.chunk_tokens)

    def _spans(self, count: int) -> list[tuple[int, int]]:
        return [(0, count)] if self.mode == "content" else chunk_spans(count, self.chunk_tokens)

    # ------------------------------------------------------------------ put
    def put(self, token_ids: object, past_key_values: Any, *, position: int = 0, saliency: Any = None,
            skip_existing: bool = True) -> int:
        """Store the KV of ``token_ids``; return how many chunks were written.

        ``position`` (content mode): the position of the first token when this KV was
        computed. ``saliency``: per-token scores for the ``mixed`` codec, shape
        ``(tokens,)`` or ``(layers, tokens)``. With ``skip_existing`` chunks already
        stored are not encoded or written again. Everything is checked and encoded
        before the first write.
        """
        self._check_open()
        tokens = check_tokens(token_ids)
        pairs = hf.cache_layers(past_key_values)
        layout = self._layout_for(pairs, tokens.size)
        if self.mode == "prefix" and position != 0:
            raise InvalidArgument("position applies to content mode; prefix chunks start at position 0")
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise InvalidArgument(f"position must be an int >= 0, got {position!r}")
        saliency = self._check_saliency(saliency, layout.layers, tokens.size)
        keys = self._keys(layout, tokens)
        spans = self._spans(tokens.size)
        todo = list(range(len(keys)))
        if skip_existing:
            present = self._exist(keys)
            todo = [i for i in todo if not present[i]]
        t0 = time.perf_counter()
        blobs = []
        for i in todo:
            start, end = spans[i]
            encoded = [self.codec.encode(k[:, start:end], v[:, start:end],
                                         saliency=None if saliency is None else saliency[layer][start:end])
                       for layer, (k, v) in enumerate(pairs)]
            blobs.append((keys[i], encode_chunk(encoded, position=position if self.mode == "content" else start),
                          (end - start) * layout.layers))
        t1 = time.perf_counter()
        self._record_layout()
        self._write(blobs)
        t2 = time.perf_counter()
        with self._lock:
            c = self._counters
            c["puts"] += 1
            c["chunks_written"] += len(blobs)
            c["chunks_skipped"] += len(keys) - len(blobs)
            c["bytes_written"] += sum(len(b) for _, b, _ in blobs)
            c["encode_s"] += t1 - t0
            c["write_s"] += t2 - t1
        return len(blobs)

    def _layout_for(self, pairs: list, count: int) -> KVLayout:
        k0, v0 = pairs[0]
        h, n, d = k0.shape
        fields = {"layers": len(pairs), "kv_heads": int(h), "head_dim": int(d), "dtype": _dtype_name(k0.dtype)}
        if fields["dtype"] not in _INPUT_DTYPES:
            raise InvalidType(f"KV tensors must be float16, bfloat16 or float32, got {fields['dtype']}")
        for i, (k, v) in enumerate(pairs):
            for what, t in (("key", k), ("value", v)):
                if tuple(t.shape) != (h, n, d) or _dtype_name(t.dtype) != fields["dtype"]:
                    raise InvalidArgument(f"layer {i} {what} is {tuple(t.shape)} {_dtype_name(t.dtype)}; layer 0 key "
                                          f"is {(h, n, d)} {fields['dtype']}: every layer must match")
        if n < count:
            raise InvalidArgument(f"past_key_values covers {n} tokens, token_ids has {count}: "
                                  "the KV must cover every token")
        layout = self._layout or self._find_layout()
        expected = {k: getattr(layout, k) for k in fields} if layout is not None else self._given
        for name, value in fields.items():
            if name in expected and expected[name] != value:
                raise InvalidArgument(f"past_key_values has {name} {value}, this store holds {name} "
                                      f"{expected[name]} ({self.model}@{self.revision}); open a store for that layout")
        if layout is None:
            with self._lock:
                self._layout = self._layout or self._make_layout(fields)
            layout = self._layout
        return layout

    @staticmethod
    def _check_saliency(saliency: Any, layers: int, count: int):
        if saliency is None:
            return None
        import torch

        s = saliency if isinstance(saliency, torch.Tensor) else torch.as_tensor(saliency)
        if s.ndim == 1:
            s = s.unsqueeze(0).expand(layers, -1)
        if s.ndim != 2 or s.shape[0] != layers or s.shape[1] < count:
            raise InvalidArgument(f"saliency must be (tokens,) or (layers, tokens) = ({layers}, {count}), "
                                  f"got {tuple(saliency.shape) if hasattr(saliency, 'shape') else saliency!r}")
        return s

    def _write(self, blobs: list[tuple[str, bytes, int]]) -> None:
        from ...tiers.hierarchy import TieredStore

        if isinstance(self.tier, TieredStore):
            list(self._io.map(lambda item: self.tier.put(item[0], item[1], cost=float(item[2])), blobs))
        elif blobs:
            self.tier.put_many([(key, blob) for key, blob, _ in blobs])

    def _exist(self, keys: list[str]) -> list[bool]:
        if len(keys) == 1:
            return [self.tier.contains(keys[0])]
        return list(self._io.map(self.tier.contains, keys))

    # ------------------------------------------------------------------ lookups
    def lookup_prefix(self, token_ids: object) -> int:
        """How many leading tokens of ``token_ids`` are cached (whole chunks); no side effect."""
        self._check_open()
        tokens = check_tokens(token_ids)
        layout = self._find_layout()
        if layout is None:
            return 0
        keys, spans = self._keys(layout, tokens), self._spans(tokens.size)
        cached = 0
        for present, (_, end) in zip(self._exist(keys), spans):
            if not present:
                break
            cached = end
        return cached

    def contains(self, token_ids: object) -> bool:
        """Whether every chunk of ``token_ids`` is cached."""
        self._check_open()
        tokens = check_tokens(token_ids)
        return self.lookup_prefix(tokens) == tokens.size

    # ------------------------------------------------------------------ get
    def get(self, token_ids: object, *, layers: Sequence[int] | None = None, device: Any = None, dtype: Any = None,
            format: str = "layers", position: int | None = None) -> Any:
        """The KV of ``token_ids``, or None unless every chunk is cached.

        ``layers``: only these layer indices (read by range; see :meth:`get_layers`).
        ``device``/``dtype``: where and as what the tensors come back (default: the CPU,
        the dtype put). ``format``: ``"layers"``, ``"batched"`` or ``"dynamic_cache"``.
        ``position`` (content mode): re-rotate the keys to start at this position.
        """
        self._check_open()
        tokens = check_tokens(token_ids)
        if not isinstance(format, str) or format not in FORMATS:
            raise InvalidArgument(f"format must be one of {FORMATS}, got {format!r}")
        if position is not None and self.mode != "content":
            raise InvalidArgument("position applies to content mode (prefix chunks sit at their own positions)")
        out_dtype = None if dtype is None else _torch_dtype(dtype)
        device = _device_arg(device)
        layout = self._find_layout()
        wanted = self._check_layers(layers, layout)
        if layout is None:
            self._count_miss()
            return None
        keys = self._keys(layout, tokens)
        t0 = time.perf_counter()
        if layers is None:
            decoded = self._read_whole(keys, device, out_dtype)
        else:
            decoded = self._read_layers(keys, wanted, device, out_dtype)
        if decoded is None:
            self._count_miss()
            return None
        headers, per_chunk = decoded
        result = _join_chunks(per_chunk)
        if position is not None:
            result = self._rerotate(result, position - headers[0].position)
        with self._lock:
            self._counters["gets"] += 1
            self._counters["hits"] += 1
            self._counters["decode_s"] += time.perf_counter() - t0
        return _format(result, format)

    def get_layers(self, token_ids: object, layers: Sequence[int], **options: Any) -> Any:
        """The KV of only ``layers`` (indices) of ``token_ids``, read by range; see :meth:`get`."""
        if layers is None:
            raise InvalidArgument("get_layers needs the layer indices to load; use get() for all layers")
        return self.get(token_ids, layers=layers, **options)

    def _check_layers(self, layers, layout: KVLayout | None) -> list[int] | None:
        if layers is None:
            return None
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        if not isinstance(layers, (list, tuple, range)) or not layers:
            raise InvalidArgument(f"layers must be a non-empty sequence of layer indices, got {layers!r}")
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0 or (layout is not None and i >= layout.layers):
                bound = f" < {layout.layers}" if layout is not None else ""
                raise InvalidArgument(f"layer index {i!r} is not an int in 0{bound}")
        return list(layers)

    def _read_whole(self, keys: list[str], device, dtype):
        if self._device_cache is not None and self._device_cache.serves(device):
            return self._read_through_device(keys, dtype)
        t0 = time.perf_counter()
        blobs = self.tier.get_many(keys) if len(keys) > 1 else [self._get_or_none(keys[0])]
        t1 = time.perf_counter()
        if any(b is None for b in blobs):
            return None
        headers, chunks = [], []
        for key, blob in zip(keys, blobs):
            header, pairs = decode_chunk(blob, source=key, device=device, dtype=dtype, borrow=self._borrow)
            headers.append(header)
            chunks.append(pairs)
        with self._lock:
            self._counters["chunks_read"] += len(keys)
            self._counters["bytes_read"] += sum(len(b) for b in blobs)
            self._counters["read_s"] += t1 - t0
        return headers, chunks

    def _read_through_device(self, keys: list[str], dtype):
        """Whole chunks for a load to the cache's device: hits are copied on the device,
        misses read, verified and admitted."""
        t0 = time.perf_counter()
        found = {key: self._device_cache.get(key) for key in keys}
        missing = [key for key, entry in found.items() if entry is None]
        blobs = self.tier.get_many(missing) if len(missing) > 1 else [self._get_or_none(k) for k in missing]
        t1 = time.perf_counter()
        if any(b is None for b in blobs):
            return None
        # The cache copies a payload onto its device: a host copy first would be wasted.
        borrow = self._borrow or self._device_cache.device.type != "cpu"
        for key, blob in zip(missing, blobs):
            header, payload = chunk_payload(blob, source=key, borrow=borrow)
            found[key] = (header, self._device_cache.put(key, header, payload))
        headers, chunks = [], []
        for key in keys:
            header, payload = found[key]
            headers.append(header)
            chunks.append(decode_payload(header, payload, dtype=dtype))
        with self._lock:
            self._counters["chunks_read"] += len(missing)
            self._counters["bytes_read"] += sum(len(b) for b in blobs)
            self._counters["read_s"] += t1 - t0
        return headers, chunks

    def _get_or_none(self, key: str):
        try:
            return self.tier.get(key)
        except NotFound:
            return None

    def _headers_of(self, keys: list[str]) -> list[ChunkHeader] | None:
        with self._lock:
            known = {k: self._headers[k] for k in keys if k in self._headers}
        missing = [k for k in keys if k not in known]

        def fetch(key: str) -> ChunkHeader | None:
            try:
                info = fetch_header(functools.partial(self.tier.get_range, key), first_read=16384, source=key)
            except NotFound:
                return None
            return chunk_header(info, key)

        for key, header in zip(missing, self._io.map(fetch, missing)):
            if header is None:
                return None
            known[key] = header
        with self._lock:
            for key in missing:
                self._headers[key] = known[key]
            while len(self._headers) > _HEADER_CACHE:
                self._headers.popitem(last=False)
        return [known[k] for k in keys]

    def _read_layers(self, keys: list[str], layers: list[int], device, dtype):
        headers = self._headers_of(keys)
        if headers is None:
            return None
        requests = [(key, *layer_range(header, layer)) for key, header in zip(keys, headers) for layer in layers]
        t0 = time.perf_counter()
        parts = self.tier.get_ranges(requests)
        t1 = time.perf_counter()
        chunks = []
        for c, (key, header) in enumerate(zip(keys, headers)):
            mine = parts[c * len(layers):(c + 1) * len(layers)]
            sections = [verify_layer(header, layer, part, source=key) for layer, part in zip(layers, mine)]
            chunks.append(decode_layers(header, sections, device=device, dtype=dtype, borrow=False))
        with self._lock:
            self._counters["chunks_read"] += len(keys)
            self._counters["bytes_read"] += sum(len(p) for p in parts)
            self._counters["read_s"] += t1 - t0
        return headers, chunks

    def _rerotate(self, pairs: list, delta: int) -> list:
        if delta == 0:
            return pairs
        if self.rope is None:
            raise ConfigError("re-rotating keys to a new position needs rope=RopeSpec(...) (or a transformers "
                              "model as model=) when the store is opened")
        from .rope import rerotate_keys

        return [(rerotate_keys(k, delta, self.rope), v) for k, v in pairs]

    def _count_miss(self) -> None:
        with self._lock:
            self._counters["gets"] += 1
            self._counters["misses"] += 1

    # ------------------------------------------------------------------ delete, batches, stats
    def delete(self, token_ids: object) -> int:
        """Remove every chunk of ``token_ids``; return how many existed."""
        self._check_open()
        layout = self._find_layout()
        if layout is None:
            return 0
        keys = self._keys(layout, check_tokens(token_ids))
        with self._lock:
            for key in keys:
                self._headers.pop(key, None)
        if self._device_cache is not None:
            for key in keys:
                self._device_cache.discard(key)
        return sum(self._io.map(self.tier.delete, keys))

    def put_many(self, items: Iterable[tuple[object, Any]], **options: Any) -> list[int]:
        """:meth:`put` of each ``(token_ids, past_key_values)``, in parallel; chunks written per item."""
        return list(self._pool.map(lambda item: self.put(item[0], item[1], **options), list(items)))

    def get_many(self, token_id_lists: Iterable[object], **options: Any) -> list[Any]:
        """:meth:`get` of each token list, in parallel (None for each miss)."""
        return list(self._pool.map(lambda tokens: self.get(tokens, **options), list(token_id_lists)))

    def stats(self) -> dict[str, Any]:
        """Counters (puts, hits, misses, chunks and bytes moved, seconds spent) and the tier's stats."""
        with self._lock:
            counters = dict(self._counters)
        layout = self._layout
        return {"model": self.model, "revision": self.revision, "codec": self.codec.key(), "mode": self.mode,
                "chunk_tokens": self.chunk_tokens,
                "layout": None if layout is None else {f: getattr(layout, f) for f in ("dtype", "layers", "kv_heads",
                                                                                        "head_dim")},
                **counters, "hit_rate": counters["hits"] / counters["gets"] if counters["gets"] else 0.0,
                "tier": _stats_dict(self.tier.stats()),
                "gpu_cache": None if self._device_cache is None else self._device_cache.stats()}

    def close(self) -> None:
        """Release the thread pool and the memory level (the database's tier stays open). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        self._io.shutdown(wait=True)
        if self._device_cache is not None:
            self._device_cache.clear()
        if self.tier is not self._base_tier:
            self.tier.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"KV cache store of {self.model}@{self.revision} is closed")

    def __enter__(self) -> KVCacheStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<KVCacheStore {self.model}@{self.revision} {self.codec.key()} {self.mode}>"

    # ------------------------------------------------------------------ async twins
    async def _run(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def put_async(self, token_ids: object, past_key_values: Any, **options: Any) -> int:
        return await self._run(self.put, token_ids, past_key_values, **options)

    async def get_async(self, token_ids: object, **options: Any) -> Any:
        return await self._run(self.get, token_ids, **options)

    async def get_layers_async(self, token_ids: object, layers: Sequence[int], **options: Any) -> Any:
        return await self._run(self.get_layers, token_ids, layers, **options)

    async def lookup_prefix_async(self, token_ids: object) -> int:
        return await self._run(self.lookup_prefix, token_ids)

    async def delete_async(self, token_ids: object) -> int:
        return await self._run(self.delete, token_ids)

    async def put_many_async(self, items: Iterable[tuple[object, Any]], **options: Any) -> list[int]:
        return await asyncio.gather(*(self.put_async(t, kv, **options) for t, kv in list(items)))

    async def get_many_async(self, token_id_lists: Iterable[object], **options: Any) -> list[Any]:
        return await asyncio.gather(*(self.get_async(t, **options) for t in list(token_id_lists)))


# ---------------------------------------------------------------------- helpers
def _model_id(model: Any) -> str:
    config = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
    if not name:
        raise InvalidArgument("this transformers model has no name_or_path; pass model='org/name' and the layout")
    return str(name)


def _dtype_arg(dtype: Any) -> str:
    name = dtype if isinstance(dtype, str) else _dtype_name(dtype)
    if name not in _INPUT_DTYPES:
        raise InvalidType(f"dtype must be one of {', '.join(_INPUT_DTYPES)} (str or torch.dtype), got {dtype!r}")
    return name


def _device_arg(device: Any) -> Any:
    """``device`` as a usable ``torch.device`` (``None`` stays ``None``); checked before any read."""
    if device is None:
        return None
    import torch

    try:
        parsed = torch.device(device)
        torch.empty(1, device=parsed)  # a CUDA index past the last GPU, or no CUDA build, fails here
    except (RuntimeError, TypeError, ValueError, AssertionError) as exc:
        raise InvalidArgument(f"device {device!r} is not a usable torch device ({exc}); "
                              "use 'cpu', 'cuda' or 'cuda:<n>'") from exc
    if parsed.type == "meta":
        raise InvalidArgument("device 'meta' holds no data; load KV to 'cpu' or 'cuda'")
    return parsed


def _torch_dtype(dtype: Any):
    import torch

    return getattr(torch, _dtype_arg(dtype))


def _stats_dict(stats: Any) -> dict[str, Any]:
    out = stats.as_dict()
    if "levels" in out:
        out["levels"] = [level.as_dict() for level in stats.levels]
    return out


def _join_chunks(per_chunk: list[list[tuple[Any, Any]]]) -> list[tuple[Any, Any]]:
    if len(per_chunk) == 1:
        return per_chunk[0]
    import torch

    return [(torch.cat([c[i][0] for c in per_chunk], dim=1), torch.cat([c[i][1] for c in per_chunk], dim=1))
            for i in range(len(per_chunk[0]))]


def _format(pairs: list[tuple[Any, Any]], format: str) -> Any:
    if format == "layers":
        return pairs
    if format == "batched":
        return [(k.unsqueeze(0), v.unsqueeze(0)) for k, v in pairs]
    return hf.to_dynamic_cache(pairs)
