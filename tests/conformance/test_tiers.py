"""Every tier, and a TieredStore of memory+LMDB+S3, runs the same conformance suite."""

from __future__ import annotations

import pytest

from tests.conformance.suite import TierConformance


class TestMemoryTier(TierConformance):
    @pytest.fixture
    def make_tier(self):
        from tierstore.tiers import MemoryTier

        return lambda: MemoryTier()


class TestGpuTier(TierConformance):
    @pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
    def make_tier(self, request):
        torch = pytest.importorskip("torch")
        if request.param == "cuda" and not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        from tierstore.tiers import GpuTier

        return lambda: GpuTier(capacity_bytes=256 * 1024 * 1024, device=request.param)


class TestLmdbTier(TierConformance):
    persistent = True

    @pytest.fixture
    def make_tier(self, tmp_path):
        from tierstore.tiers import LmdbTier

        return lambda: LmdbTier(tmp_path / "lmdb", map_size=16 * 1024 * 1024)


class TestFileTier(TierConformance):
    persistent = True

    @pytest.fixture
    def make_tier(self, tmp_path):
        from tierstore.tiers import FileTier

        return lambda: FileTier(tmp_path / "files")


class TestS3Tier(TierConformance):
    persistent = True

    @pytest.fixture
    def make_tier(self, s3_location):
        from tierstore.tiers import S3Tier

        return lambda: S3Tier(s3_location["bucket"], prefix=s3_location["prefix"],
                              endpoint_url=s3_location["endpoint_url"])


class TestTieredStore(TierConformance):
    """memory (small budget, so the 64 MiB value and others get demoted) over LMDB over S3."""

    persistent = True

    @pytest.fixture(params=["write-through", "write-back"])
    def make_tier(self, request, tmp_path, s3_location):
        from tierstore.tiers import LmdbTier, MemoryTier, S3Tier, TieredStore

        def make():
            return TieredStore(
                [MemoryTier(capacity_bytes=8 * 1024 * 1024),
                 LmdbTier(tmp_path / "lmdb-cache", map_size=16 * 1024 * 1024),
                 S3Tier(s3_location["bucket"], prefix=s3_location["prefix"],
                        endpoint_url=s3_location["endpoint_url"])],
                budgets=[8 * 1024 * 1024, 96 * 1024 * 1024, None],
                write_policy=request.param)

        return make


@pytest.mark.gpu
class TestPinnedMemoryTier(TierConformance):
    """MemoryTier holding page-locked buffers (needs CUDA; runs on the GPU machine)."""

    @pytest.fixture
    def make_tier(self):
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("pinned memory needs CUDA")
        from tierstore.tiers import MemoryTier

        return lambda: MemoryTier(pinned=True)
