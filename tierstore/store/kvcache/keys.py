"""Chunk keys of the KV-cache store: stable, chained for prefixes, content-addressed for RAG.

A cached chunk is only valid for the exact model, weights, dtype, tensor layout and codec
that produced it, so every key starts from a :class:`KVLayout` fingerprint: change any of
them and every key changes (a miss, never stale KV). Two key kinds:

* **prefix keys** (:func:`prefix_keys`): the tokens are cut into chunks of
  ``chunk_tokens``; chunk ``i``'s key hashes the layout, the key of chunk ``i - 1`` and
  chunk ``i``'s tokens, so a chunk's key names its whole prefix (LMCache / vLLM prefix
  caching). The keys of a prompt's first chunks equal those of any longer prompt that
  starts with the same tokens, which is what :meth:`lookup_prefix` walks.
* **content keys** (:func:`content_key`): a RAG chunk reused at any position is keyed
  by its own tokens alone (Cache-Craft / CacheBlend; its KV is re-rotated on reuse).

Hashes are xxh3-128 over an explicit byte encoding (little-endian int64 tokens, UTF-8
canonical JSON for the layout), never Python's ``hash``: equal on every process and
machine. Keys read ``kv/<layout 16 hex>/p/<32 hex>`` and ``kv/<layout>/c/<32 hex>``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

import numpy as np
from xxhash import xxh3_128

from ...errors import InvalidArgument, InvalidType
from .._ids import as_id_array

__all__ = ["KVLayout", "check_tokens", "chunk_spans", "prefix_keys", "content_key", "KEY_FORMAT"]

KEY_FORMAT = 1


@dataclass(frozen=True, kw_only=True)
class KVLayout:
    """What a cached KV depends on; its :meth:`fingerprint` prefixes every key.

    :param model: model id (e.g. ``"org/model"``).
    :param revision: weights revision (commit hash, tag); a new revision never reuses KV.
    :param dtype: dtype of the tensors put (``"float16"``, ``"bfloat16"``, ``"float32"``).
    :param layers, kv_heads, head_dim: the per-layer tensor layout ``(kv_heads, tokens, head_dim)``.
    :param codec: the codec's identity string (every option included).
    """

    model: str
    revision: str
    dtype: str
    layers: int
    kv_heads: int
    head_dim: int
    codec: str

    def __post_init__(self) -> None:
        for name in ("model", "revision", "dtype", "codec"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise InvalidType(f"{name} must be a non-empty str, got {value!r}")
        for name in ("layers", "kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{name} must be a positive int, got {value!r}")

    def fingerprint(self) -> str:
        """32 hex digits naming this layout (and the key format)."""
        return _fingerprint(self)


@functools.lru_cache(maxsize=256)
def _fingerprint(layout: KVLayout) -> str:
    canonical = json.dumps({"key_format": KEY_FORMAT, **asdict(layout)}, sort_keys=True, separators=(",", ":"))
    return xxh3_128(canonical.encode("utf-8")).hexdigest()


def check_tokens(token_ids: object) -> np.ndarray:
    """Token ids as a read-only little-endian int64 array; typed errors for anything else."""
    if isinstance(token_ids, (str, bytes)):
        raise InvalidType("token_ids must be a sequence of ints, not a str/bytes; tokenize first")
    try:
        arr = token_ids if isinstance(token_ids, np.ndarray) else np.asarray(token_ids)
    except (ValueError, TypeError, OverflowError) as exc:  # ragged nested lists, objects numpy cannot convert
        raise InvalidArgument(f"token_ids cannot be read as an array ({exc}); pass a list of ints") from exc
    if hasattr(token_ids, "detach") and not isinstance(token_ids, np.ndarray):  # a torch tensor
        arr = np.asarray(token_ids.detach().cpu())
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]  # a batch of one, as tokenizers return it
    if arr.ndim != 1:
        raise InvalidArgument(f"token_ids must be 1-D (or a batch of one), got shape {arr.shape}")
    return as_id_array(arr, "token ids", empty="token_ids is empty; a KV cache needs at least one token")


def chunk_spans(count: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each chunk of ``count`` tokens; the last one may be shorter."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise InvalidArgument(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    return [(start, min(start + chunk_tokens, count)) for start in range(0, count, chunk_tokens)]


def prefix_keys(layout: KVLayout, token_ids: object, chunk_tokens: int) -> list[str]:
    """The chained key of every chunk of ``token_ids`` (see the module docstring)."""
    return checked_prefix_keys(layout, check_tokens(token_ids), chunk_tokens)


def checked_prefix_keys(layout: KVLayout, tokens: np.ndarray, chunk_tokens: int) -> list[str]:
    """:func:`prefix_keys` of tokens already through :func:`check_tokens`."""
    fingerprint = layout.fingerprint()
    keys, parent = [], bytes.fromhex(fingerprint)
    for start, end in chunk_spans(tokens.size, chunk_tokens):
        digest = xxh3_128(b"prefix" + parent + tokens[start:end].tobytes()).digest()
        keys.append(f"kv/{fingerprint[:16]}/p/{digest.hex()}")
        parent = digest
    return keys


def content_key(layout: KVLayout, token_ids: object) -> str:
    """The key of one chunk by its tokens alone (position-independent reuse)."""
    return checked_content_key(layout, check_tokens(token_ids))


def checked_content_key(layout: KVLayout, tokens: np.ndarray) -> str:
    """:func:`content_key` of tokens already through :func:`check_tokens`."""
    fingerprint = layout.fingerprint()
    digest = xxh3_128(b"chunk" + bytes.fromhex(fingerprint) + tokens.tobytes()).hexdigest()
    return f"kv/{fingerprint[:16]}/c/{digest}"
