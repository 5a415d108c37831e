"""Fixtures shared by the manifest and WAL tests: real tiers on one fixed location."""

from __future__ import annotations

import pytest

MiB = 1024 * 1024
TIER_KINDS = ["lmdb", "file", "s3", "memory+lmdb", "memory+file"]


@pytest.fixture(params=TIER_KINDS)
def make_tier(request, tmp_path):
    """A factory of tiers on one fixed location: each call opens a new tier object there."""
    from tierstore.tiers import FileTier, LmdbTier, MemoryTier, S3Tier, TieredStore

    kind = request.param
    s3 = request.getfixturevalue("s3_location") if kind == "s3" else None
    opened = []

    def make():
        if kind == "lmdb":
            tier = LmdbTier(tmp_path / "lmdb", map_size=64 * MiB)
        elif kind == "file":
            tier = FileTier(tmp_path / "files")
        elif kind == "s3":
            tier = S3Tier(s3["bucket"], prefix=s3["prefix"], endpoint_url=s3["endpoint_url"])
        else:
            bottom = LmdbTier(tmp_path / "lmdb", map_size=64 * MiB) if kind.endswith("lmdb") \
                else FileTier(tmp_path / "files")
            tier = TieredStore([MemoryTier(capacity_bytes=4 * MiB), bottom])
        opened.append(tier)
        return tier

    make.kind = kind
    yield make
    for tier in opened:
        tier.close()


@pytest.fixture
def tier(make_tier):
    return make_tier()


@pytest.fixture
def lmdb_tier(tmp_path):
    """One LMDB tier, for checks that fail before any I/O (the same code path on every tier)."""
    from tierstore.tiers import LmdbTier

    with LmdbTier(tmp_path / "single", map_size=16 * MiB) as tier:
        yield tier


def flip_byte(tier, key, position):
    """Flip one bit of the stored value at ``position`` (negative counts from the end)."""
    data = bytearray(tier.get(key))
    data[position % len(data)] ^= 0x40
    tier.put(key, bytes(data))
