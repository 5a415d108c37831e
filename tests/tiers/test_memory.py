"""MemoryTier specifics: budgets, zero-copy gets, pinned buffers."""

from __future__ import annotations

import pickle

import pytest

from tierstore.errors import CapacityError, ConfigError
from tierstore.tiers import MemoryTier


def test_capacity_is_enforced_and_accounted():
    tier = MemoryTier(capacity_bytes=100)
    with pytest.raises(CapacityError, match="larger than"):
        tier.put("big", b"x" * 101)
    tier.put("a", b"x" * 60)
    with pytest.raises(CapacityError, match="full"):
        tier.put("b", b"x" * 50)
    assert tier.list("") == ["a"]
    tier.put("a", b"x" * 90)  # overwrite counts the old size out
    assert tier.stats().bytes_stored == 90
    tier.delete("a")
    tier.put("b", b"x" * 100)
    assert tier.bytes_used == 100


def test_get_of_bytes_is_zero_copy():
    tier = MemoryTier()
    value = b"y" * 1000
    tier.put("k", value)
    assert tier.get("k") is value


def test_pickle_gives_an_empty_tier_with_the_same_configuration():
    tier = MemoryTier(capacity_bytes=123, name="cache")
    tier.put("k", b"v")
    clone = pickle.loads(pickle.dumps(tier))
    assert clone.capacity_bytes == 123 and clone.name == "cache" and clone.list("") == []


def test_pinned_needs_cuda():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the pinned path is tested below")
    with pytest.raises(ConfigError, match="CUDA"):
        MemoryTier(pinned=True)


@pytest.mark.gpu
def test_pinned_buffers_are_page_locked_and_upload_exactly():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    tier = MemoryTier(pinned=True)
    payload = bytes(range(256)) * 4096
    tier.put("p", payload)
    buf = tier.get_tensor("p")
    assert buf.is_pinned() and buf.dtype == torch.uint8
    on_gpu = buf.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert bytes(on_gpu.cpu().numpy()) == payload
    assert tier.get("p") == payload
