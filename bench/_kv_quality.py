"""Quality loss of a KV codec: bytelm-man's perplexity on held-apart text with a round-tripped cache.

The protocol (used by bench/kv.py and tests/test_bench_kv.py)::

    tokens  = [BOS] + the first context + score bytes of a held-apart text
    prefill   tokens[:context]                      -> the context's KV (the "stored chunk")
    round-trip the KV through the codec:  encode -> one chunk blob (bytes) -> decode
    score     tokens[context:context + score] teacher-forced with that cache, predicting
              tokens[context + 1:context + score + 1]

and the same with the cache as computed (no round trip): the reference. Only the
context's KV is lossy, as when a chunk is loaded from the store and the new tokens are
computed fresh. Tokens are bytes, so the mean negative log-likelihood per scored token
is nats per byte; a codec's loss is its mean minus the reference's, paired text by text
(the standard error is over texts). Texts come from ``queries_meta.jsonl.gz`` of
manpages-minilm, paragraphs the nearest-neighbour benchmarks hold apart from the base set.

Every sequence's context is one chunk, encoded as the store encodes it: each layer
``(kv_heads, context, head_dim)`` by the codec, all layers framed into one checked chunk
blob (:func:`~tierstore.store.kvcache.chunks.encode_chunk`) and read back with
:func:`~tierstore.store.kvcache.chunks.decode_chunk`. The compression ratio is the
chunk's fp16 size over the length of those blobs (header, alignment and checksums
included).

Codec work runs with one torch thread (see ``single_thread``); the model with all.

The model runs in float32 by default: the fp16 weights load exactly, the reference is
as precise as the CPU allows, and the ``fp16`` codec shows the (tiny) cost of storing a
float32 cache in half precision. ``dtype=torch.bfloat16`` is about twice as fast on CPU.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = ["BOS", "MODEL_DIR", "TEXTS", "QUALITY_CODECS", "load_model", "load_sequences", "codec_quality",
           "single_thread"]

BOS = 256
MODEL_DIR = os.path.join("models", "bytelm-man")
TEXTS = os.path.join("data", "manpages-minilm", "queries_meta.jsonl.gz")

#: label -> (codec name, options): the configurations the benchmark compares.
QUALITY_CODECS: dict[str, tuple[str, dict[str, Any]]] = {
    "fp16": ("fp16", {}),
    "bf16": ("bf16", {}),
    "int8": ("int8", {}),
    "int4-g32": ("int4", {"group_size": 32}),
    "int4-g64": ("int4", {"group_size": 64}),
    "int4-g128": ("int4", {"group_size": 128}),
    "int2-g32": ("int2", {"group_size": 32}),
    "mixed-g64": ("mixed", {"group_size": 64, "keep_ratio": 0.1}),
}


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block.

    The codecs' many small element-wise ops are memory-bound; with two OpenMP threads on
    a loaded two-core machine each op waits on a busy core (a 0.5 MiB clone took 8 ms
    instead of 13 us, a layer's encode 120 ms instead of 1.3 ms).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def load_model(shared: str, dtype: Any = None) -> Any:
    """bytelm-man from ``<shared>/models/bytelm-man`` in ``dtype`` (default float32), eval mode."""
    import torch

    from tierstore.store.kvcache.hf import load_llama

    return load_llama(os.path.join(shared, MODEL_DIR), dtype=dtype or torch.float32)


def load_sequences(shared: str, *, tokens: int, count: int, skip: int = 0) -> list[list[int]]:
    """The first ``count`` held-apart texts (after ``skip``) long enough for ``tokens`` tokens,
    each as ``[BOS] + bytes`` cut to ``tokens`` ids. Fewer if the file has fewer."""
    out: list[list[int]] = []
    seen = 0
    with gzip.open(os.path.join(shared, TEXTS), "rt", encoding="utf-8") as handle:
        for line in handle:
            data = json.loads(line)["text"].encode("utf-8")
            if len(data) + 1 < tokens:
                continue
            seen += 1
            if seen <= skip:
                continue
            out.append([BOS, *data[: tokens - 1]])
            if len(out) == count:
                break
    return out


def _pairs(cache: Any) -> list[tuple[Any, Any]]:
    """Per-layer (key, value) of a batched transformers cache, 4-D (batch, heads, tokens, dim)."""
    if hasattr(cache, "layers") and not hasattr(cache, "key_cache"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _batched_cache(layers: Sequence[tuple[Any, Any]]) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


def _round_trip(pairs: Sequence[tuple[Any, Any]], codec: Any) -> tuple[list[tuple[Any, Any]], int]:
    """Each sequence's layers as one chunk blob and back; (batched layers, total blob bytes)."""
    import torch

    from tierstore.store.kvcache.chunks import decode_chunk, encode_chunk

    rows = pairs[0][0].shape[0]
    decoded, nbytes = [], 0
    with single_thread():
        for row in range(rows):
            blob = encode_chunk([codec.encode(k[row], v[row]) for k, v in pairs])
            nbytes += len(blob)
            decoded.append(decode_chunk(blob, dtype=pairs[0][0].dtype)[1])
    return [(torch.stack([seq[i][0] for seq in decoded]), torch.stack([seq[i][1] for seq in decoded]))
            for i in range(len(pairs))], nbytes


def _nll(model: Any, layers: Sequence[tuple[Any, Any]], follow: Any, targets: Any) -> Any:
    """Per-sequence mean NLL (nats) of ``targets`` given the cache ``layers`` and inputs ``follow``."""
    import torch

    from tierstore.store.kvcache.hf import cache_argument

    out = model(input_ids=follow, use_cache=True, **{cache_argument(model): _batched_cache(layers)})
    logp = torch.log_softmax(out.logits.float(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean(dim=1)


def codec_quality(model: Any, sequences: Sequence[Sequence[int]], codecs: Mapping[str, tuple[str, dict]],
                  *, context: int = 256, score: int = 128, batch: int = 16,
                  check_reference: bool = True) -> dict[str, Any]:
    """Nats/byte of ``model`` on ``sequences`` with the context's KV round-tripped per codec.

    Each sequence needs ``context + score + 1`` tokens (longer ones are cut). Returns
    ``{"reference": {...}, "codecs": {label: {...}}, ...}`` where each codec record has
    ``nats_per_byte``, ``delta_nats_per_byte`` (mean over texts of codec minus reference),
    ``delta_se``, ``compression_ratio`` and ``chunk_blob_bytes``. With
    ``check_reference`` the reference is also compared with one forward over the whole
    sequence (no cache): ``max_logit_gap_full_vs_cached`` should be rounding-sized.
    """
    import torch

    from tierstore.store.kvcache.codecs import get_codec
    from tierstore.store.kvcache.hf import cache_argument, layout_of_model, output_cache

    need = context + score + 1
    if not sequences or any(len(s) < need for s in sequences):
        raise ValueError(f"every sequence needs {need} tokens (context {context} + score {score} + 1)")
    layout = layout_of_model(model)
    fp16_chunk = 2 * layout["kv_heads"] * context * layout["head_dim"] * 2 * layout["layers"]
    built = {label: get_codec(name, **options) for label, (name, options) in codecs.items()}
    ref_nll: list[Any] = []
    nll: dict[str, list[Any]] = {label: [] for label in built}
    blob_bytes = dict.fromkeys(built, 0)
    logit_gap = 0.0
    with torch.inference_mode():
        for start in range(0, len(sequences), batch):
            ids = torch.tensor([list(s[:need]) for s in sequences[start:start + batch]], dtype=torch.long)
            prefill = model(input_ids=ids[:, :context], use_cache=True)
            pairs = [(k.contiguous(), v.contiguous()) for k, v in _pairs(output_cache(prefill))]
            follow, targets = ids[:, context:context + score], ids[:, context + 1:need]
            ref_nll.append(_nll(model, pairs, follow, targets))
            if check_reference and start == 0:
                full = model(input_ids=ids[:, :context + score]).logits[:, context:].float()
                cached = model(input_ids=follow, use_cache=True,
                               **{cache_argument(model): _batched_cache(pairs)}).logits.float()
                logit_gap = float((full - cached).abs().max())
            for label, codec in built.items():
                layers, nbytes = _round_trip(pairs, codec)
                blob_bytes[label] += nbytes
                nll[label].append(_nll(model, layers, follow, targets))
    reference = torch.cat(ref_nll).double()
    n = reference.numel()
    records = {}
    for label in built:
        values = torch.cat(nll[label]).double()
        delta = values - reference
        records[label] = {
            "codec": codecs[label][0], "options": dict(built[label].options),
            "nats_per_byte": float(values.mean()),
            "delta_nats_per_byte": float(delta.mean()),
            "delta_se": float(delta.std(unbiased=True) / math.sqrt(n)) if n > 1 else None,
            "delta_max_text": float(delta.max()),
            "chunk_blob_bytes": blob_bytes[label] / n,
            "compression_ratio": fp16_chunk * n / blob_bytes[label],
        }
    return {"texts": n, "context_tokens": context, "scored_tokens": score,
            "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "layout": layout, "fp16_chunk_bytes": fp16_chunk,
            "reference": {"nats_per_byte": float(reference.mean())},
            "max_logit_gap_full_vs_cached": logit_gap if check_reference else None,
            "codecs": records}
