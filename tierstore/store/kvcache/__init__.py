"""The chunk KV-cache store: per-layer keys and values kept instead of recomputed.

* :mod:`~tierstore.store.kvcache.codecs`: how one layer's ``key`` / ``value`` tensors
  become bytes and back (lossless casts, int8, KIVI int4 / int2, mixed precision).
* :mod:`~tierstore.store.kvcache.keys`: stable chunk keys (chained for prefixes,
  content-addressed for RAG chunks) under a :class:`KVLayout` fingerprint.
* :mod:`~tierstore.store.kvcache.chunks`: one checked blob per chunk, layers readable by range.
* :mod:`~tierstore.store.kvcache.store`: :class:`KVCacheStore` (``db.kv_cache(...)``).
* :mod:`~tierstore.store.kvcache.rope` / :mod:`~tierstore.store.kvcache.blend`: RoPE
  re-rotation and CacheBlend selective recompute for non-prefix reuse.
* :mod:`~tierstore.store.kvcache.hf`: transformers cache objects and model loading.

Importing this package does not load torch: the codecs import it when they run.
"""

from __future__ import annotations

from .codecs import CODEC_NAMES, KV_FORMAT_VERSION, EncodedLayer, KVCodec, decode_layer, get_codec
from .keys import KVLayout, content_key, prefix_keys
from .store import KVCacheStore

__all__ = ["get_codec", "KVCodec", "EncodedLayer", "decode_layer", "CODEC_NAMES", "KV_FORMAT_VERSION",
           "KVLayout", "prefix_keys", "content_key", "KVCacheStore"]
