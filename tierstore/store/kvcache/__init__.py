"""The chunk KV-cache store: per-layer keys and values kept instead of recomputed.

* :mod:`~tierstore.store.kvcache.codecs`: how one layer's ``key`` / ``value`` tensors
  become bytes and back (lossless casts, int8, KIVI int4 / int2, mixed precision).

Importing this package does not load torch: the codecs import it when they run.
"""

from __future__ import annotations

from .codecs import CODEC_NAMES, KV_FORMAT_VERSION, EncodedLayer, KVCodec, decode_layer, get_codec

__all__ = ["get_codec", "KVCodec", "EncodedLayer", "decode_layer", "CODEC_NAMES", "KV_FORMAT_VERSION"]
