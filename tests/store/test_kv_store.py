"""KVCacheStore: byte-exact round trips on every tier, prefix lookups, misses, corruption, bad input."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tierstore  # noqa: E402
from tierstore.errors import ConfigError, CorruptData, InvalidArgument, InvalidType, StoreClosed  # noqa: E402
from tierstore.store.kvcache import KVCacheStore  # noqa: E402
from tierstore.tiers import MemoryTier  # noqa: E402

LAYERS, HEADS, DIM = 4, 2, 32


def make_kv(n: int, *, dtype=torch.float16, layers=LAYERS, heads=HEADS, dim=DIM, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(heads, n, dim, generator=g).to(dtype), torch.randn(heads, n, dim, generator=g).to(dtype))
            for _ in range(layers)]


def tokens_of(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n)


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(p, q) for (x, p), (y, q) in zip(a, b))


def sliced(kv, start, end):
    return [(k[:, start:end], v[:, start:end]) for k, v in kv]


@pytest.fixture(params=["memory", "lmdb", "s3"])
def db(request, tmp_path, s3_location):
    if request.param == "memory":
        database = tierstore.connect("memory", tier=MemoryTier())
    elif request.param == "lmdb":
        database = tierstore.connect(tmp_path / "db")
    else:
        loc = s3_location
        database = tierstore.connect(f"s3://{loc['bucket']}/{loc['prefix']}", endpoint_url=loc["endpoint_url"])
    yield database
    database.close()


@pytest.mark.parametrize("codec,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_lossless_round_trip_is_byte_exact(db, codec, dtype):
    kv = make_kv(600, dtype=dtype)
    tokens = tokens_of(600)
    store = db.kv_cache("org/model", "rev1", codec=codec, chunk_tokens=256)
    assert store.put(tokens, kv) == 3  # 256 + 256 + 88
    assert same(store.get(tokens), kv)
    assert same(store.get(tokens[:512]), sliced(kv, 0, 512))
    assert store.get(tokens[:300]) is None  # the chunk 256..300 was never stored
    assert store.put(tokens, kv) == 0  # everything already there


def test_lookup_prefix_walks_the_chain(db):
    store = db.kv_cache("org/model", "rev1", chunk_tokens=128)
    tokens = tokens_of(400)
    assert store.lookup_prefix(tokens) == 0
    store.put(tokens, make_kv(400))
    assert store.lookup_prefix(tokens) == 400
    other = tokens_of(400, seed=1)
    assert store.lookup_prefix(np.r_[tokens[:300], other[:100]]) == 256
    assert store.lookup_prefix(np.r_[tokens, other]) == 384  # the partial chunk 384..400 differs
    assert store.lookup_prefix(other) == 0
    changed = tokens.copy()
    changed[5] = (changed[5] + 1) % 256
    assert store.lookup_prefix(changed) == 0  # a chunk's key names its whole prefix


def test_get_layers_reads_only_those_layers(db):
    store = db.kv_cache("org/model", "rev1", chunk_tokens=64)
    kv, tokens = make_kv(150), tokens_of(150)
    store.put(tokens, kv)
    before = store.stats()["bytes_read"]
    part = store.get_layers(tokens, [3, 1])
    assert same(part, [kv[3], kv[1]])
    read = store.stats()["bytes_read"] - before
    assert read == sum(k.numel() * 2 * 2 for k, _ in kv) / 2  # two of four layers, by range
    assert same(store.get_layers(tokens, [0]), [kv[0]])  # headers cached: ranged reads only
    with pytest.raises(InvalidArgument, match="layer index"):
        store.get_layers(tokens, [LAYERS])


def test_formats_and_transformers_cache_objects(tmp_path):
    pytest.importorskip("transformers")
    from transformers import DynamicCache

    with tierstore.connect(tmp_path) as db:
        store = db.kv_cache("org/model", "rev1", chunk_tokens=32)
        kv, tokens = make_kv(40), tokens_of(40)
        cache = DynamicCache()
        for i, (k, v) in enumerate(kv):
            cache.update(k.unsqueeze(0), v.unsqueeze(0), i)
        store.put(tokens, cache)  # a DynamicCache in
        batched = store.get(tokens, format="batched")
        assert all(k.shape == (1, HEADS, 40, DIM) for k, _ in batched)
        assert same(store.get(torch.from_numpy(tokens[None])), kv)  # tokens as a batch-1 tensor
        out = store.get(tokens, format="dynamic_cache")
        assert isinstance(out, DynamicCache) and out.get_seq_length() == 40
        store.put(tokens_of(40, seed=3), [(k.unsqueeze(0), v.unsqueeze(0)) for k, v in kv])  # 4-D pairs in
        assert same(store.get(tokens_of(40, seed=3)), kv)
        longer = make_kv(50)
        store.put(tokens_of(30, seed=4), longer)  # KV running past the tokens: the leading ones are kept
        assert same(store.get(tokens_of(30, seed=4)), sliced(longer, 0, 30))


def test_quantized_codecs_round_trip_within_their_error(tmp_path):
    kv, tokens = make_kv(256), tokens_of(256)
    with tierstore.connect(tmp_path) as db:
        for codec, bound in (("int8", 0.01), ("int4", 0.15), ("int2", 0.6), ("mixed", 0.15)):
            store = db.kv_cache("org/model", "rev1", codec=codec)
            store.put(tokens, kv)
            out = store.get(tokens)
            err = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                      for (a, _), (b, _) in zip(out, kv))
            assert 0 < err < bound, codec


def test_a_change_of_revision_dtype_or_codec_misses(tmp_path):
    kv, tokens = make_kv(64), tokens_of(64)
    with tierstore.connect(tmp_path) as db:
        db.kv_cache("org/model", "rev1", codec="int8").put(tokens, kv)
        assert db.kv_cache("org/model", "rev1", codec="int8").get(tokens) is not None
        assert db.kv_cache("org/model", "rev2", codec="int8").get(tokens) is None
        assert db.kv_cache("org/other", "rev1", codec="int8").lookup_prefix(tokens) == 0
        assert db.kv_cache("org/model", "rev1", codec="int4").get(tokens) is None
        assert db.kv_cache("org/model", "rev1", codec="int8", codec_options={"scale_dtype": "float32"}) \
            .get(tokens) is None
        assert db.kv_cache("org/model", "rev1", codec="int8", dtype="bfloat16").get(tokens) is None
        assert db.kv_cache("org/model", "rev1", codec="int8", chunk_tokens=32).lookup_prefix(tokens) == 0


def test_layout_is_found_by_a_new_process_store(tmp_path):
    kv, tokens = make_kv(64), tokens_of(64)
    with tierstore.connect(tmp_path) as db:
        db.kv_cache("org/model", "rev1").put(tokens, kv)
    with tierstore.connect(tmp_path) as db:
        store = db.kv_cache("org/model", "rev1")
        assert store.layout is None or store.layout.layers == LAYERS
        assert same(store.get(tokens), kv)
        # a second layout of the same model and revision makes an unqualified store ambiguous
        db.kv_cache("org/model", "rev1", dtype="bfloat16").put(tokens, make_kv(64, dtype=torch.bfloat16))
        with pytest.raises(ConfigError, match="several layouts"):
            db.kv_cache("org/model", "rev1").get(tokens)
        assert same(db.kv_cache("org/model", "rev1", dtype="float16").get(tokens), kv)


def test_a_corrupted_chunk_is_an_error_not_garbage(tmp_path):
    kv, tokens = make_kv(64), tokens_of(64)
    with tierstore.connect(tmp_path) as db:
        store = db.kv_cache("org/model", "rev1")
        store.put(tokens, kv)
        (key,) = store.chunk_keys(tokens)
        data = bytearray(db.tier.get(key))
        data[len(data) // 2] ^= 0x40
        db.tier.put(key, bytes(data))
        with pytest.raises(CorruptData):
            store.get(tokens)
        with pytest.raises(CorruptData):
            db.kv_cache("org/model", "rev1").get_layers(tokens, list(range(LAYERS)))
        db.tier.put(key, bytes(data[: len(data) // 3]))  # torn
        with pytest.raises(CorruptData):
            store.get(tokens)


def test_bad_input_is_a_typed_error_and_stores_nothing(tmp_path):
    with tierstore.connect(tmp_path) as db:
        store = db.kv_cache("org/model", "rev1", layers=LAYERS, kv_heads=HEADS, head_dim=DIM, dtype="float16")
        kv, tokens = make_kv(64), tokens_of(64)
        cases = [
            (lambda: store.put(tokens, kv[:-1]), InvalidArgument, "layers"),
            (lambda: store.put(tokens, make_kv(64, heads=4)), InvalidArgument, "kv_heads"),
            (lambda: store.put(tokens, make_kv(64, dim=16)), InvalidArgument, "head_dim"),
            (lambda: store.put(tokens, make_kv(64, dtype=torch.bfloat16)), InvalidArgument, "dtype"),
            (lambda: store.put(tokens, kv[:2] + [(kv[2][0][:, :10], kv[2][1])] + kv[3:]), InvalidArgument,
             "every layer"),
            (lambda: store.put(tokens_of(80), kv), InvalidArgument, "covers 64 tokens"),
            (lambda: store.put(np.array([1.5, 2.0]), kv), InvalidType, "integers"),
            (lambda: store.put("some text", kv), InvalidType, "tokenize"),
            (lambda: store.put([], kv), InvalidArgument, "empty"),
            (lambda: store.put([-1, 2], kv), InvalidArgument, "from 0"),
            (lambda: store.put(tokens, "not a cache"), InvalidType, "past_key_values"),
            (lambda: store.put(tokens, [(kv[0][0], "x")]), InvalidType, "torch.Tensor"),
            (lambda: store.put(tokens, [(torch.zeros(2, 64, 32, 3), kv[0][1])]), InvalidArgument, "batch size"),
            (lambda: store.put(tokens, [(k.int(), v.int()) for k, v in kv]), InvalidType, "float16"),
            (lambda: store.get(tokens, format="numpy"), InvalidArgument, "format"),
            (lambda: store.put(tokens, kv, position=5), InvalidArgument, "content mode"),
            (lambda: db.kv_cache("org/model", "rev1", codec="int3"), InvalidArgument, "unknown KV codec"),
            (lambda: db.kv_cache("org/model", "rev1", codec="int4", codec_options={"bits": 3}), InvalidArgument,
             "no option"),
            (lambda: db.kv_cache("org/model", "", codec="fp16"), InvalidType, "revision"),
            (lambda: db.kv_cache("org/model", "rev1", chunk_tokens=0), InvalidArgument, "chunk_tokens"),
            (lambda: db.kv_cache("org/model", "rev1", mode="suffix"), InvalidArgument, "mode"),
        ]
        for call, error, words in cases:
            with pytest.raises(error, match=words):
                call()
        assert [k for k in db.tier.list("kv/") if not k.startswith("kv/layouts/")] == []
        fp16 = db.kv_cache("org/model", "rev2")
        huge = [(torch.full((HEADS, 8, DIM), 1e6), torch.zeros(HEADS, 8, DIM)) for _ in range(LAYERS)]
        with pytest.raises(InvalidArgument, match="float16's range"):
            fp16.put(tokens_of(8), huge)
        assert [k for k in db.tier.list("kv/") if "/p/" in k] == []


def test_delete_and_stats(tmp_path):
    with tierstore.connect(tmp_path) as db:
        store = db.kv_cache("org/model", "rev1", chunk_tokens=32)
        tokens = tokens_of(100)
        store.put(tokens, make_kv(100))
        assert store.delete(tokens[:64]) == 2
        assert store.lookup_prefix(tokens) == 0
        assert store.delete(tokens[:64]) == 0
        store.get(tokens)
        stats = store.stats()
        assert stats["chunks_written"] == 4 and stats["misses"] == 1
        assert stats["layout"] == {"dtype": "float16", "layers": LAYERS, "kv_heads": HEADS, "head_dim": DIM}


def test_memory_cache_keeps_expensive_chunks_with_cost_aware_eviction(tmp_path):
    with tierstore.connect(tmp_path) as db:
        chunk = make_kv(64)
        nbytes = 2 * LAYERS * HEADS * 64 * DIM * 2
        store = db.kv_cache("org/model", "rev1", chunk_tokens=64, memory_cache=int(nbytes * 3.5))
        hot = tokens_of(64, seed=100)
        store.put(hot, chunk)
        for _ in range(5):
            assert store.get(hot) is not None
        for seed in range(10):  # a scan of one-off chunks must not push the often used one out
            store.put(tokens_of(64, seed=seed), chunk)
        levels = store.stats()["tier"]["levels"]
        top_hits_before = levels[0]["hits"]
        assert same(store.get(hot), chunk)
        assert store.stats()["tier"]["levels"][0]["hits"] == top_hits_before + 1  # served from memory
        assert db.kv_cache("org/model", "rev1", chunk_tokens=64).lookup_prefix(tokens_of(64, seed=0)) == 64
        assert store.tier._stack.costs[store.chunk_keys(hot)[0]] == 64 * LAYERS  # cost = tokens x layers


def test_async_twins_and_batches(tmp_path):
    with tierstore.connect(tmp_path) as db:
        store = db.kv_cache("org/model", "rev1", chunk_tokens=32)
        items = [(tokens_of(70, seed=s), make_kv(70, seed=s)) for s in range(6)]

        async def main():
            written = await store.put_many_async(items)
            got = await store.get_many_async([t for t, _ in items])
            prefix = await asyncio.gather(*(store.lookup_prefix_async(t) for t, _ in items))
            layers = await store.get_layers_async(items[0][0], [2])
            return written, got, prefix, layers

        written, got, prefix, layers = asyncio.run(main())
        assert written == [3] * 6 and prefix == [70] * 6
        assert all(same(g, kv) for g, (_, kv) in zip(got, items))
        assert same(layers, [items[0][1][2]])
        assert store.put_many(items) == [0] * 6
        assert all(same(g, kv) for g, (_, kv) in zip(store.get_many([t for t, _ in items]), items))
    with pytest.raises(StoreClosed):
        store.get(items[0][0])


def test_store_is_importable_without_a_database(tmp_path):
    tier = MemoryTier()
    store = KVCacheStore(tier, model="m", revision="r")
    store.put(tokens_of(10), make_kv(10))
    assert store.lookup_prefix(tokens_of(10)) == 10
    store.close()


def test_batches_larger_than_the_pool_do_not_deadlock(tmp_path):
    with tierstore.connect(tmp_path) as db:
        store = db.kv_cache("org/model", "rev1", chunk_tokens=16, max_workers=2)
        items = [(tokens_of(40, seed=s), make_kv(40, seed=s)) for s in range(12)]
        assert store.put_many(items) == [3] * 12
        assert all(same(g, kv) for g, (_, kv) in zip(store.get_many([t for t, _ in items]), items))
        assert asyncio.run(store.put_many_async(items)) == [0] * 12


def test_content_mode_reuses_a_chunk_at_any_position(tmp_path):
    from tierstore.store.kvcache.rope import RopeSpec, rerotate_keys

    rope = RopeSpec.from_theta(DIM)
    kv, chunk = make_kv(48), tokens_of(48)
    with tierstore.connect(tmp_path) as db:
        store = db.kv_cache("org/model", "rev1", mode="content", rope=rope)
        store.put(chunk, kv, position=5)  # computed with its first token at position 5
        assert store.lookup_prefix(chunk) == 48 and store.lookup_prefix(chunk[:47]) == 0
        assert same(store.get(chunk), kv)  # as stored
        assert same(store.get(chunk, position=5), kv)
        moved = store.get(chunk, position=300)
        assert all(torch.equal(k, rerotate_keys(k0, 295, rope)) and torch.equal(v, v0)
                   for (k, v), (k0, v0) in zip(moved, kv))
        assert not same(moved, kv)
        # the same tokens in prefix mode are another key
        assert db.kv_cache("org/model", "rev1").lookup_prefix(chunk) == 0
        with pytest.raises(ConfigError, match="rope"):
            db.kv_cache("org/model", "rev1", mode="content").get(chunk, position=7)


@pytest.mark.parametrize("codec", ["fp16", "int4"])
def test_get_onto_a_device_and_dtype(tmp_path, codec):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kv, tokens = make_kv(80), tokens_of(80)
    with tierstore.connect(tmp_path) as db:
        store = db.kv_cache("org/model", "rev1", codec=codec, chunk_tokens=32)
        store.put(tokens, kv)
        host = store.get(tokens)
        out = store.get(tokens, device=device, dtype=torch.float32)
        assert all(k.device.type == device and k.dtype == torch.float32 for k, _ in out)
        assert all(torch.equal(k.cpu().to(hk.dtype), hk) and torch.equal(v.cpu().to(hv.dtype), hv)
                   for (k, v), (hk, hv) in zip(out, host))
        part = store.get_layers(tokens, [2], device=device)
        assert part[0][0].device.type == device and torch.equal(part[0][0].cpu(), host[2][0])


def test_mixed_codec_keeps_the_salient_tokens_exact(tmp_path):
    kv, tokens = make_kv(100), tokens_of(100)
    saliency = torch.zeros(100)
    saliency[[3, 50, 77]] = 10.0  # e.g. the attention mass these tokens receive
    with tierstore.connect(tmp_path) as db:
        store = db.kv_cache("org/model", "rev1", codec="mixed", codec_options={"keep_ratio": 0.03},
                            chunk_tokens=100)
        store.put(tokens, kv, saliency=saliency)
        out = store.get(tokens)
        for (k, v), (k0, v0) in zip(out, kv):
            assert torch.equal(k[:, [3, 50, 77]], k0[:, [3, 50, 77]]) and torch.equal(v[:, [3, 50, 77]],
                                                                                     v0[:, [3, 50, 77]])
            assert not torch.equal(k, k0)
        with pytest.raises(InvalidArgument, match="saliency"):
            store.put(tokens_of(100, seed=9), kv, saliency=torch.zeros(7))


def test_gpu_cache_serves_repeat_loads_from_the_device(tmp_path):
    """gpu_cache keeps verified payloads on the device (the CPU device here: the logic is the
    same on CUDA): a repeat load reads nothing from the tier, returns exact tensors that do not
    alias the cache, and the budget evicts least recently used chunks."""
    with tierstore.connect(tmp_path, gpu_cache=3 * 16 * 2 * 2 * 8 * 2 * 2 + 4096, gpu_device="cpu") as db:
        kv = db.kv_cache("org/m", "r1", codec="fp16", chunk_tokens=16)
        tokens = list(range(48))  # three chunks
        layers = [(torch.randn(2, 48, 8, dtype=torch.float16), torch.randn(2, 48, 8, dtype=torch.float16))
                  for _ in range(2)]
        kv.put(tokens, layers)
        first = kv.get(tokens, device="cpu")
        read = kv.stats()["chunks_read"]
        assert read == 3 and kv.stats()["gpu_cache"]["chunks"] == 3
        again = kv.get(tokens, device="cpu")
        assert kv.stats()["chunks_read"] == read  # served from the device cache
        assert kv.stats()["gpu_cache"]["hits"] == 3
        for (k, v), (k0, v0), (k1, v1) in zip(layers, first, again):
            assert torch.equal(k, k0) and torch.equal(v, v0) and torch.equal(k, k1) and torch.equal(v, v1)
        again[0][0].zero_()  # the caller's tensors are its own
        assert torch.equal(kv.get(tokens, device="cpu")[0][0], layers[0][0])
        assert kv.get(tokens)[0][0].data_ptr() != 0  # a load without device= bypasses the cache
        other = list(range(1000, 1048))
        kv.put(other, layers)
        kv.get(other, device="cpu")  # three more chunks: the budget holds about three
        stats = kv.stats()["gpu_cache"]
        assert stats["bytes"] <= stats["capacity_bytes"] and stats["evictions"] == 6 - stats["chunks"] >= 1
        read = kv.stats()["chunks_read"]
        kv.get(tokens, device="cpu")  # least recently used: the first chunks went first
        assert kv.stats()["chunks_read"] > read
        kv.delete(other)
        assert kv.get(other, device="cpu") is None and kv.stats()["gpu_cache"]["chunks"] <= 3


def test_gpu_cache_needs_a_usable_device(tmp_path):
    with tierstore.connect(tmp_path, gpu_cache=1 << 20, gpu_device="meta") as db:
        with pytest.raises(ConfigError):
            db.kv_cache("org/m", "r1")
    with tierstore.connect(tmp_path, gpu_cache=0) as db:
        with pytest.raises(InvalidArgument):
            db.kv_cache("org/m", "r1")
