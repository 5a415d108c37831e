"""Byte tiers and the hierarchy that stacks them.

Every tier maps string keys (see :mod:`tierstore.tiers.keys`) to immutable byte values
and offers the same surface: ``get``, ``get_range``, ``put(mode=...)``, ``delete``,
``contains``, ``size``, ``list(prefix)``, ``get_many``, ``put_many``, ``stats``,
``close``, and async twins (``get_async``, ...).

=========== ======================== ===============================================
tier        backing                  differences
=========== ======================== ===============================================
GpuTier     torch tensors            byte budget; ``get_tensor`` without host copy
MemoryTier  process memory           byte budget; optional pinned buffers
LmdbTier    one LMDB environment     map grows when full; many reader processes
FileTier    one file per key         atomic tmp+fsync+rename; aiofiles async reads
S3Tier      boto3                    ranged GETs, parallel get_many, create-only puts
=========== ======================== ===============================================

Tiers are imported lazily so that ``import tierstore.tiers`` loads neither torch nor
boto3 until a tier that needs them is used.
"""

from __future__ import annotations

import importlib

from .base import BaseTier
from .keys import MAX_KEY_BYTES, validate_key, validate_prefix
from .stats import TierStats

__all__ = [
    "BaseTier", "TierStats", "MAX_KEY_BYTES", "validate_key", "validate_prefix",
    "MemoryTier", "GpuTier", "LmdbTier", "FileTier", "S3Tier", "TieredStore",
    "LRUPolicy", "LFUPolicy", "CostAwarePolicy", "EvictionPolicy", "make_policy", "POLICY_NAMES",
    "HierarchyStats",
]

_LAZY = {
    "MemoryTier": ".memory",
    "GpuTier": ".gpu",
    "LmdbTier": ".lmdb",
    "FileTier": ".file",
    "S3Tier": ".s3",
    "TieredStore": ".hierarchy",
    "LRUPolicy": ".policy",
    "LFUPolicy": ".policy",
    "CostAwarePolicy": ".policy",
    "EvictionPolicy": ".policy",
    "make_policy": ".policy",
    "POLICY_NAMES": ".policy",
    "HierarchyStats": ".hierarchy",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tierstore.tiers' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


def __dir__():
    return sorted(__all__)
