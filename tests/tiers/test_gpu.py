"""GpuTier specifics: byte budget, tensor surface, no aliasing, device handling.

Every test runs on device="cpu"; the "cuda" variants (marked ``gpu``) repeat the same
assertions on a CUDA device and are skipped where there is none. The shared behaviour of
all tiers is covered by tests/conformance.
"""

from __future__ import annotations

import asyncio
import sys
import threading

import numpy as np
import pytest

from tests.conftest import random_bytes
from tierstore.errors import (AlreadyExists, CapacityError, ConfigError, InvalidArgument, InvalidKey, InvalidType,
                              NotFound, StoreClosed, TierUnavailable)

torch = pytest.importorskip("torch")

from tierstore.tiers.gpu import GpuTier  # noqa: E402

CUDA = torch.cuda.is_available()
needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
CAPACITY = 1024


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def tier(device):
    with GpuTier(capacity_bytes=CAPACITY, device=device) as tier:
        yield tier


def raw_bytes(tensor) -> bytes:
    """The reference encoding: the tensor's bytes in its logical (contiguous) order."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# ------------------------------------------------------------------ basics
def test_round_trips_bytes_like_values(tier):
    values = {"b": random_bytes(300, 1), "ba": bytearray(random_bytes(200, 2)), "empty": b"",
              "np": np.arange(50, dtype=np.float32), "mv": memoryview(random_bytes(10, 3))}
    for key, value in values.items():
        tier.put(key, value)
    for key, value in values.items():
        got = tier.get(key)
        assert type(got) is bytes and got == bytes(memoryview(value).cast("B"))
        assert tier.size(key) == len(got)
    assert tier.get_range("b", 10, 20) == values["b"][10:20]
    assert tier.get_range("b", 290) == values["b"][290:]
    assert tier.get_range("b", 500, 600) == b""
    assert tier.get_range("empty", 0) == b""


def test_stored_tensors_live_on_the_device(tier, device):
    tier.put("k", b"abc")
    stored = tier.get_tensor("k")
    assert stored.device.type == device and stored.device == tier.device
    assert stored.dtype == torch.uint8 and stored.dim() == 1
    assert tier.stats().extra == {"device": str(tier.device)}


def test_stats_count_bytes_and_items(tier):
    tier.put("a", b"x" * 100)
    tier.put_tensor("b", torch.zeros(25, dtype=torch.int32, device=tier.device))
    tier.get("a")
    tier.get_tensor("b")
    with pytest.raises(NotFound):
        tier.get_tensor("missing")
    stats = tier.stats()
    assert (stats.items, stats.bytes_stored, stats.capacity_bytes) == (2, 200, CAPACITY)
    assert (stats.puts, stats.bytes_written) == (2, 200)
    assert (stats.gets, stats.hits, stats.misses, stats.bytes_read) == (3, 2, 1, 200)


# ----------------------------------------------------------------- capacity
def test_value_larger_than_capacity(tier):
    with pytest.raises(CapacityError, match=rf"{CAPACITY + 1} bytes is larger than .*capacity of {CAPACITY}"):
        tier.put("big", bytes(CAPACITY + 1))
    with pytest.raises(CapacityError, match="raise capacity_bytes"):
        tier.put_tensor("big", torch.zeros(CAPACITY // 8 + 1, dtype=torch.float64))
    assert tier.stats().items == 0 and tier.bytes_used == 0 and not tier.contains("big")


def test_full_tier_refuses_and_says_what_to_do(tier):
    tier.put("a", bytes(600))
    with pytest.raises(CapacityError, match=rf"600 of {CAPACITY} bytes used.*cannot add 500 bytes.*delete"):
        tier.put("b", bytes(500))
    assert not tier.contains("b")
    tier.put("b", bytes(CAPACITY - 600))  # exactly full is fine
    assert tier.bytes_used == CAPACITY
    with pytest.raises(CapacityError):
        tier.put("c", b"x")
    with pytest.raises(CapacityError):
        tier.put_tensor("c", torch.ones(1, dtype=torch.uint8))


def test_accounting_after_overwrite_and_delete(tier):
    tier.put("a", bytes(600))
    tier.put("a", bytes(1000))  # the old 600 bytes are freed by the overwrite
    assert tier.bytes_used == 1000 and tier.stats().items == 1
    tier.put_tensor("a", torch.zeros(25, dtype=torch.float32))
    assert tier.bytes_used == 100
    assert tier.delete("a") and not tier.delete("a")
    assert tier.bytes_used == 0 and tier.stats().bytes_stored == 0
    tier.put("full", bytes(CAPACITY))
    assert tier.bytes_used == CAPACITY


def test_failed_writes_leave_the_old_value(tier):
    tier.put("a", b"old")
    with pytest.raises(CapacityError):
        tier.put("a", bytes(CAPACITY + 1))
    with pytest.raises(AlreadyExists):
        tier.put_tensor("a", torch.ones(3, dtype=torch.uint8), mode="create")
    assert tier.get("a") == b"old" and tier.bytes_used == 3


def test_concurrent_puts_never_pass_the_budget(tier):
    errors, barrier = [], threading.Barrier(8)

    def writer(worker):
        barrier.wait()
        for i in range(5):
            try:
                tier.put(f"w{worker}/{i}", bytes(50))
            except CapacityError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = tier.stats()
    assert stats.bytes_stored == 50 * stats.items == sum(tier.size(k) for k in tier.list())
    assert stats.items == CAPACITY // 50 and len(errors) == 40 - CAPACITY // 50


# ---------------------------------------------------------- tensor surface
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64, torch.float32, torch.bool])
def test_put_tensor_round_trips_raw_bytes(tier, dtype):
    generator = torch.Generator().manual_seed(0)
    source = (torch.randn(6, 7, generator=generator) * 1000).to(dtype).to(tier.device)
    tier.put_tensor("t", source)
    expected = raw_bytes(source)
    assert tier.get("t") == expected
    assert tier.size("t") == source.numel() * source.element_size() == len(expected)
    restored = tier.get_tensor("t").view(dtype).reshape(source.shape)
    assert torch.equal(restored, source)


def test_put_tensor_from_the_host(tier):
    source = torch.arange(40, dtype=torch.int16)  # always on the CPU
    tier.put_tensor("t", source)
    assert tier.get_tensor("t").device == tier.device
    assert tier.get("t") == raw_bytes(source)


def test_put_tensor_of_non_contiguous_and_odd_shapes(tier):
    matrix = torch.arange(24, dtype=torch.float32, device=tier.device).reshape(4, 6)
    tier.put_tensor("transposed", matrix.t())
    tier.put_tensor("strided", matrix[:, ::2])
    tier.put_tensor("scalar", torch.tensor(1.5, device=tier.device))
    tier.put_tensor("empty", torch.empty(0, 3, device=tier.device))
    tier.put_tensor("grad", torch.ones(2, requires_grad=True, device=tier.device))
    assert tier.get("transposed") == raw_bytes(matrix.t())
    assert tier.get("strided") == raw_bytes(matrix[:, ::2])
    assert tier.get("scalar") == np.float32(1.5).tobytes()
    assert tier.get("empty") == b""
    assert tier.get("grad") == np.ones(2, np.float32).tobytes()
    assert not tier.get_tensor("grad").requires_grad


def test_tensor_surface_needs_no_host_round_trip(tier, monkeypatch):
    source = torch.arange(16, dtype=torch.float16, device=tier.device)
    expected = raw_bytes(source)

    def host_copy(*args, **kwargs):
        raise AssertionError("a host round trip happened")

    for method in ("cpu", "numpy", "tolist"):
        monkeypatch.setattr(torch.Tensor, method, host_copy)
    tier.put_tensor("t", source)
    first, second = tier.get_tensor("t"), tier.get_tensor("t")
    assert first.data_ptr() == second.data_ptr()  # the stored tensor itself, not a copy
    assert torch.equal(first, source.view(torch.uint8))
    monkeypatch.undo()
    assert tier.get("t") == expected


def test_get_tensor_checks_keys_and_state(tier):
    with pytest.raises(InvalidKey):
        tier.get_tensor("../x")
    with pytest.raises(InvalidKey):
        tier.put_tensor("a//b", torch.ones(1))
    with pytest.raises(NotFound, match="missing"):
        tier.get_tensor("missing")
    tier.close()
    with pytest.raises(StoreClosed):
        tier.get_tensor("a")
    with pytest.raises(StoreClosed):
        tier.put_tensor("a", torch.ones(1))


def test_put_tensor_rejects_what_is_not_a_dense_tensor(tier):
    with pytest.raises(InvalidType, match="use put"):
        tier.put_tensor("a", b"bytes")
    with pytest.raises(InvalidArgument, match="to_dense"):
        tier.put_tensor("a", torch.eye(3).to_sparse())
    with pytest.raises(InvalidArgument, match="meta"):
        tier.put_tensor("a", torch.empty(3, device="meta"))
    with pytest.raises(InvalidArgument, match="mode"):
        tier.put_tensor("a", torch.ones(1), mode="append")
    assert tier.stats().items == 0


def test_put_tensor_create_mode(tier):
    tier.put_tensor("a", torch.ones(2, dtype=torch.uint8), mode="create")
    with pytest.raises(AlreadyExists):
        tier.put_tensor("a", torch.zeros(2, dtype=torch.uint8), mode="create")
    assert tier.get("a") == b"\x01\x01"


# ------------------------------------------------------------- no aliasing
def test_put_never_aliases_the_callers_buffer(tier):
    buffer = bytearray(b"original")
    array = np.arange(8, dtype=np.uint8)
    tier.put("ba", buffer)
    tier.put("np", array)
    buffer[:] = b"CHANGED!"
    array[:] = 0
    assert tier.get("ba") == b"original"
    assert tier.get("np") == bytes(range(8))


def test_put_tensor_never_aliases_the_source(tier):
    contiguous = torch.arange(8, dtype=torch.int32, device=tier.device)
    view = torch.arange(16, dtype=torch.uint8, device=tier.device)[4:12]
    tier.put_tensor("c", contiguous)
    tier.put_tensor("v", view)
    expected_c, expected_v = raw_bytes(contiguous), raw_bytes(view)
    contiguous.fill_(-1)
    view.fill_(0)
    assert tier.get("c") == expected_c and tier.get("v") == expected_v
    assert tier.get_tensor("v").numel() == 8  # stores exactly its bytes, not the base storage
    assert tier.get_tensor("v").untyped_storage().nbytes() == 8


def test_get_returns_an_independent_copy(tier):
    tier.put("a", b"abc")
    first = tier.get("a")
    tier.put("a", b"xyz")
    assert first == b"abc" and tier.get("a") == b"xyz"


# ----------------------------------------------------------------- errors
def test_device_errors_are_translated_and_chained(tier, monkeypatch):
    # A real out-of-memory or CUDA fault cannot be provoked on demand, so inject them.
    tier.put("kept", b"abc")

    def fail(exc):
        def raiser(*args, **kwargs):
            raise exc
        return raiser

    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(tier, "_raw_bytes", fail(oom))
    with pytest.raises(CapacityError, match="out of memory.*lower capacity_bytes") as info:
        tier.put_tensor("t", torch.ones(4))
    assert info.value.__cause__ is oom

    fault = RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(tier, "_upload", fail(fault))
    with pytest.raises(TierUnavailable, match="illegal memory access") as info:
        tier.put("t", b"abcd")
    assert info.value.__cause__ is fault
    assert tier.stats().items == 1 and tier.bytes_used == 3 and not tier.contains("t")

    monkeypatch.setattr(torch.Tensor, "numpy", fail(fault))
    with pytest.raises(TierUnavailable) as info:
        tier.get("kept")
    assert info.value.__cause__ is fault


# ---------------------------------------------------------- configuration
def test_default_device_follows_cuda_availability():
    with GpuTier(capacity_bytes=16) as tier:
        assert tier.device.type == ("cuda" if CUDA else "cpu")
        assert tier.stats().extra["device"] == str(tier.device)


@pytest.mark.parametrize("bad", ["nope", "meta", "cuda:99"])
def test_unusable_device_is_a_config_error(bad):
    with pytest.raises(ConfigError, match=f"device '{bad}' is not usable.*'cpu', or None"):
        GpuTier(capacity_bytes=16, device=bad)


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match="'cuda' is not usable") as info:
        GpuTier(capacity_bytes=16, device="cuda")
    assert info.value.__cause__ is not None


def test_device_of_wrong_type():
    with pytest.raises(InvalidType, match="device must be"):
        GpuTier(capacity_bytes=16, device=1.5)


def test_capacity_is_required_and_positive():
    with pytest.raises(ConfigError, match="capacity_bytes"):
        GpuTier(None, device="cpu")
    with pytest.raises(InvalidArgument, match="capacity_bytes"):
        GpuTier(0, device="cpu")
    with pytest.raises(InvalidArgument, match="max_workers"):
        GpuTier(16, device="cpu", max_workers=0)


def test_missing_torch_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ConfigError, match=r"GpuTier needs torch: pip install 'tierstore\[kv\]'") as info:
        GpuTier(capacity_bytes=16, device="cpu")
    assert isinstance(info.value.__cause__, ImportError)


def test_name_kind_and_durability():
    with GpuTier(16, device="cpu", name="hot") as tier:
        assert (tier.name, tier.kind, tier.durable) == ("hot", "gpu", False)
        assert tier.stats().name == "hot"
    assert tier.closed


def test_close_drops_values_and_is_idempotent(tier):
    tier.put("a", b"abc")
    tier.close()
    tier.close()
    assert tier.bytes_used == 0
    with pytest.raises(StoreClosed):
        tier.get("a")


def test_async_twins_run_on_the_pool(tier):
    async def scenario():
        await tier.put_async("a", b"abc")
        await tier.put_many_async({"b": b"de", "c": b""})
        return await asyncio.gather(tier.get_async("a"), tier.get_range_async("b", 1), tier.get_many_async(["c", "x"]))

    assert asyncio.run(scenario()) == [b"abc", b"e", [b"", None]]
    assert type(tier)._inline_async is False


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_tier_takes_tensors_from_another_device_kind():
    with GpuTier(CAPACITY, device="cuda") as tier, GpuTier(CAPACITY, device="cpu") as host:
        source = torch.randn(32, device="cuda").to(torch.bfloat16)
        host.put_tensor("t", source)  # device -> host tier
        tier.put_tensor("t", host.get_tensor("t"))  # host tier -> device
        assert tier.get_tensor("t").is_cuda and host.get_tensor("t").device.type == "cpu"
        assert tier.get("t") == host.get("t") == raw_bytes(source)
