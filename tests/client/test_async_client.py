"""AsyncClient: the same calls as coroutines, many in flight, the event loop never blocked."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

import tierstore
from tierstore.errors import StoreClosed


def test_async_client_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2_000, 16)).astype(np.float32)

    async def main():
        async with tierstore.connect_async(tmp_path, max_workers=4) as client:
            col = await client.create_collection("c", dim=16, attributes={"kind": "keyword"})
            await col.add(np.arange(2_000), x, [{"kind": "a" if i % 2 else "b"} for i in range(2_000)])
            await col.build_index()
            assert await client.list_collections() == ["c"]
            results = await asyncio.gather(*(col.search(x[i], k=5) for i in range(64)))
            assert [r.ids[0, 0] for r in results] == list(range(64))
            filtered = await col.search(x[:4], k=3, filter={"kind": "a"})
            assert (filtered.ids % 2 == 1).all()
            t = col.tenant("acme")
            await t.add([5_000], x[:1] * 3)
            assert await t.count() == 1 and (await t.search(x[0] * 3, k=2)).ids[0].tolist() == [5_000, -1]
            assert await col.count() == 2_001
            again = await client.collection("c")
            assert await again.count() == 2_001
        with pytest.raises(StoreClosed):
            await col.count()

    asyncio.run(main())
    with tierstore.connect(tmp_path) as db:  # closed cleanly: everything durable
        assert db.collection("c").count() == 2_001


def test_the_event_loop_keeps_running_during_calls(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20_000, 64)).astype(np.float32)

    async def main():
        async with tierstore.connect_async(tmp_path) as client:
            col = await client.create_collection("c", dim=64)
            ticks = []

            async def ticker():
                while True:
                    ticks.append(time.perf_counter())
                    await asyncio.sleep(0.005)

            task = asyncio.create_task(ticker())
            await col.add(np.arange(20_000), x)
            await col.build_index()  # seconds of faiss work, off the loop
            task.cancel()
            gaps = np.diff(ticks)
            assert len(ticks) > 20 and gaps.max() < 0.5, (len(ticks), gaps.max())

    asyncio.run(main())


def test_async_kv_cache(tmp_path):
    torch = pytest.importorskip("torch")
    kv = [(torch.randn(2, 40, 8).half(), torch.randn(2, 40, 8).half()) for _ in range(3)]
    tokens = list(range(40))

    async def main():
        async with tierstore.connect_async(tmp_path) as client:
            store = await client.kv_cache("org/m", "r1", chunk_tokens=16)
            assert await store.put(tokens, kv) == 3
            assert await store.lookup_prefix(tokens) == 40
            got = await store.get(tokens)
            assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(got, kv))
            assert (await store.stats())["chunks_written"] == 3

    asyncio.run(main())


def test_async_client_on_s3_with_local_cache(moto_server, s3_location, tmp_path):
    """The same client over S3 (moto server on loopback) with a local file cache: searches and KV
    loads in flight together share the pool, and a second client sees everything."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3_000, 32)).astype(np.float32)
    uri = f"s3://{s3_location['bucket']}/{s3_location['prefix']}"
    tokens = list(range(64))
    kv = [(torch.randn(2, 64, 8, dtype=torch.float16), torch.randn(2, 64, 8, dtype=torch.float16)) for _ in range(2)]

    async def main():
        async with tierstore.connect_async(uri, endpoint_url=s3_location["endpoint_url"],
                                           cache_dir=str(tmp_path / "cache"), max_workers=8) as client:
            col = await client.create_collection("c", dim=32)
            await col.add(np.arange(3_000), x)
            await col.build_index()
            store = await client.kv_cache("org/m", "r1", chunk_tokens=16)
            await store.put(tokens, kv)
            searches = [col.search(x[i], k=3) for i in range(32)]
            loads = [store.get(tokens) for _ in range(8)]
            results = await asyncio.gather(*searches, *loads)
            assert [r.ids[0, 0] for r in results[:32]] == list(range(32))
            for layers in results[32:]:
                assert all(torch.equal(k, kv[i][0]) and torch.equal(v, kv[i][1]) for i, (k, v) in enumerate(layers))

    asyncio.run(main())
    with tierstore.connect(uri, endpoint_url=s3_location["endpoint_url"]) as db:  # no cache: straight from S3
        assert db.collection("c").search(x[7], k=1).ids[0, 0] == 7
        assert db.kv_cache("org/m", "r1", chunk_tokens=16).lookup_prefix(tokens) == 64
