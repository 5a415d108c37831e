"""Non-prefix KV reuse on a real trained model: RoPE re-rotation and CacheBlend recompute.

The model is ``shared/models/bytelm-man`` (byte-level Llama, 8 layers, GQA); prompts are
man-page paragraphs, each cached standalone at position 0, followed by an uncached
question. References are full prefills of the concatenated prompt in float32.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tierstore.errors import ConfigError, InvalidArgument, InvalidType  # noqa: E402
from tierstore.store.kvcache.blend import Segment, blend_prefill, kv_deviation  # noqa: E402
from tierstore.store.kvcache.hf import (  # noqa: E402
    cache_argument, cache_layers, load_llama, output_cache, to_dynamic_cache)
from tierstore.store.kvcache.rope import RopeSpec, rerotate_keys  # noqa: E402

SHARED = Path(__file__).resolve().parents[3] / "shared"
MODEL_DIR = SHARED / "models/bytelm-man"
TEXTS = SHARED / "data/manpages-minilm/base_meta.jsonl.gz"
BOS = 256
RATIOS = (0.0, 0.15, 0.5, 1.0)


@pytest.fixture(scope="module")
def model():
    if not (MODEL_DIR / "config.json").is_file():
        pytest.skip(f"{MODEL_DIR} is absent")
    return load_llama(MODEL_DIR, dtype=torch.float32)


@pytest.fixture(scope="module")
def paragraphs():
    """Man-page paragraphs of 150-300 bytes, in file order."""
    if not TEXTS.is_file():
        pytest.skip(f"{TEXTS} is absent")
    found = []
    with gzip.open(TEXTS, "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            if 150 <= len(text.encode()) <= 300:
                found.append(text)
            if len(found) == 12:
                return found
    pytest.skip("too few paragraphs of 150-300 bytes")


def prefill(model, ids, start=0):
    """A full forward of ``ids`` at positions ``start..``: (last-token logits, per-layer KV)."""
    ids = torch.as_tensor(ids)[None]
    with torch.no_grad():
        out = model(ids, position_ids=torch.arange(start, start + ids.shape[1])[None])
    return out.logits[0, -1], cache_layers(output_cache(out))


def rag_prompt(model, paragraphs, index):
    """Three cached paragraphs (each prefilled alone at position 0) + a 40-byte uncached question.

    Returns the segments, the full prompt ids and the full prefill's last logits and KV.
    """
    chosen = paragraphs[4 * index: 4 * index + 4]
    chunks = [[BOS] + list(chosen[0].encode())] + [list((" " + text).encode()) for text in chosen[1:3]]
    question = list((" " + chosen[3]).encode())[:40]
    segments = [Segment(chunk, prefill(model, chunk)[1]) for chunk in chunks] + [Segment(question)]
    ids = sum(chunks, []) + question
    return (segments, ids, *prefill(model, ids))


@pytest.fixture(scope="module")
def prompts(model, paragraphs):
    """Two RAG prompts of about 600 bytes: (segments, ids, full-prefill logits, full-prefill KV)."""
    return [rag_prompt(model, paragraphs, index) for index in range(2)]


def logit_kl(logits, reference):
    """KL(reference || logits) of the next-token distributions."""
    return float(torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1),
                                            log_target=True, reduction="sum"))


def greedy(model, logits, cache, steps):
    """``steps`` greedy tokens continuing from a prompt's last logits and cache."""
    out = []
    for _ in range(steps):
        token = int(logits.argmax())
        out.append(token)
        with torch.no_grad():
            step = model(torch.tensor([[token]]), **{cache_argument(model): cache})
        logits, cache = step.logits[0, -1], output_cache(step)
    return out


# --- re-rotation ------------------------------------------------------------------------

@pytest.mark.parametrize("delta", [37, 500])
def test_rerotated_keys_equal_keys_computed_at_the_offset(model, paragraphs, delta):
    ids = [BOS] + list(paragraphs[0].encode())
    _, at_zero = prefill(model, ids)
    _, at_delta = prefill(model, ids, start=delta)
    rope = RopeSpec.from_model(model)
    keys, expected = at_zero[0][0], at_delta[0][0]
    assert not torch.allclose(keys, expected, atol=1e-2)  # the offset does move layer-0 keys
    # float32 angles (position * inv_freq) round to ~6e-8 * position radians, here and in the model
    atol = 1e-4 * float(expected.abs().max())
    torch.testing.assert_close(rerotate_keys(keys, delta, rope), expected, rtol=1e-4, atol=atol)
    # batch-1 4-D keys, a per-token delta tensor, and a round trip back to position 0
    torch.testing.assert_close(rerotate_keys(keys[None], delta, rope)[0], rerotate_keys(keys, delta, rope))
    per_token = torch.full((keys.shape[1],), delta)
    torch.testing.assert_close(rerotate_keys(keys, per_token, rope), rerotate_keys(keys, delta, rope))
    torch.testing.assert_close(rerotate_keys(expected, -delta, rope), keys, rtol=1e-4, atol=atol)
    # rotations are relative: every later layer moves alike (to accumulated rounding)
    torch.testing.assert_close(rerotate_keys(at_zero[-1][0], delta, rope), at_delta[-1][0], rtol=1e-3, atol=1e-3)


def test_per_token_delta_moves_each_token_by_its_own_offset(model, paragraphs):
    _, kv = prefill(model, [BOS] + list(paragraphs[1].encode()))
    keys, rope = kv[0][0], RopeSpec.from_model(model)
    split = keys.shape[1] // 2
    delta = torch.cat([torch.full((split,), 11), torch.full((keys.shape[1] - split,), 300)])
    moved = rerotate_keys(keys, delta, rope)
    torch.testing.assert_close(moved[:, :split], rerotate_keys(keys[:, :split], 11, rope))
    torch.testing.assert_close(moved[:, split:], rerotate_keys(keys[:, split:], 300, rope))


def test_rerotation_does_not_apply_attention_scaling_twice():
    # YaRN multiplies cos/sin by attention_scaling != 1; cached keys already carry it once
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                          "original_max_position_embeddings": 64})
    tiny = LlamaForCausalLM(config).eval()
    rope = RopeSpec.from_model(tiny)
    assert rope.attention_scaling > 1.1
    assert not torch.allclose(rope.inv_freq, RopeSpec.from_theta(16).inv_freq)  # YaRN frequencies, not plain
    ids = torch.randint(0, 64, (40,)).tolist()
    _, at_zero = prefill(tiny, ids)
    _, at_delta = prefill(tiny, ids, start=123)
    torch.testing.assert_close(rerotate_keys(at_zero[0][0], 123, rope), at_delta[0][0], rtol=1e-4, atol=1e-4)


def test_length_dependent_rope_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ConfigError, match="dynamic"):
        RopeSpec.from_model(LlamaForCausalLM(config))


# --- selective recompute ----------------------------------------------------------------

@pytest.mark.parametrize("check_layer", [0, 1, 7])
def test_full_ratio_equals_full_prefill(model, prompts, check_layer):
    segments, ids, logits, kv = prompts[0]
    result = blend_prefill(model, segments, recompute_ratio=1.0, check_layer=check_layer)
    torch.testing.assert_close(result.logits, logits, rtol=1e-4, atol=1e-4)
    blended = cache_layers(result.cache)
    for (key, value), (full_key, full_value) in zip(blended, kv, strict=True):
        torch.testing.assert_close(key, full_key, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(value, full_value, rtol=1e-4, atol=1e-4)
    assert result.recomputed.tolist() == list(range(len(ids)))
    assert result.stats["tokens"] == result.stats["recomputed"] == len(ids) and result.stats["reused"] == 0


@pytest.fixture(scope="module")
def errors_by_ratio(model, prompts):
    """Per prompt: {ratio: (KV deviation above check_layer, last-token logit KL)} against full prefill,
    plus "unrotated": ratio 0.15 with the cached keys left at the positions they were computed at."""
    rows = []
    for segments, _, logits, kv in prompts:
        above = range(2, len(kv))
        row = {}
        for ratio in RATIOS:
            result = blend_prefill(model, segments, recompute_ratio=ratio, check_layer=1)
            row[ratio] = (kv_deviation(result.cache, kv, layers=above), logit_kl(result.logits, logits))
        # claiming each segment was computed where it now sits means no re-rotation
        starts = torch.tensor([0] + [len(s.token_ids) for s in segments]).cumsum(0).tolist()
        unrotated = [Segment(s.token_ids, s.kv, start) for s, start in zip(segments, starts)]
        result = blend_prefill(model, unrotated, recompute_ratio=0.15, check_layer=1)
        row["unrotated"] = (kv_deviation(result.cache, kv, layers=above), logit_kl(result.logits, logits))
        rows.append(row)
    return rows


def test_error_falls_as_the_ratio_grows(errors_by_ratio):
    for row in errors_by_ratio:
        kv_error = {ratio: row[ratio][0] for ratio in RATIOS}
        assert kv_error[0.0] > kv_error[0.15] >= kv_error[0.5] - 1e-3, kv_error
        assert kv_error[0.0] > 0.05  # reuse without recompute does miss cross-attention
        assert kv_error[1.0] < 1e-5
    mean_kl = {ratio: sum(row[ratio][1] for row in errors_by_ratio) / len(errors_by_ratio) for ratio in RATIOS}
    assert mean_kl[0.0] > mean_kl[0.15] > mean_kl[0.5], mean_kl
    assert mean_kl[1.0] < 1e-6


def test_rerotation_matters(errors_by_ratio):
    for row in errors_by_ratio:
        assert row["unrotated"][0] > 3 * row[0.15][0], row
        assert row["unrotated"][0] > row[0.0][0], row


def test_selection_takes_the_question_the_last_token_and_the_ratio(model, prompts):
    segments, ids, _, _ = prompts[1]
    question = len(segments[-1].token_ids)
    cached = len(ids) - question
    result = blend_prefill(model, segments, recompute_ratio=0.15)
    recomputed = result.recomputed.tolist()
    assert recomputed == sorted(set(recomputed))
    assert recomputed[-question:] == list(range(cached, len(ids)))
    assert len(recomputed) == question + round(0.15 * cached)
    assert result.stats["reused"] == len(ids) - len(recomputed)
    assert result.cache.get_seq_length() == len(ids)


def test_zero_ratio_at_layer_zero_reuses_every_cached_token(model, prompts):
    segments, ids, _, _ = prompts[0]
    result = blend_prefill(model, segments, recompute_ratio=0.0, check_layer=0)
    question = len(segments[-1].token_ids)
    assert result.recomputed.tolist() == list(range(len(ids) - question, len(ids)))
    # above layer 0 the cached rows are the segments' own values, untouched
    first = segments[0].kv
    for layer in (1, len(first) - 1):
        value = cache_layers(result.cache)[layer][1]
        torch.testing.assert_close(value[:, :first[layer][1].shape[1]], first[layer][1], rtol=0, atol=0)


def test_greedy_decoding_after_full_ratio_blend_equals_full_prefill(model, prompts):
    segments, _, logits, kv = prompts[1]
    expected = greedy(model, logits, to_dynamic_cache(kv), 16)
    result = blend_prefill(model, segments, recompute_ratio=1.0)
    assert greedy(model, result.logits, result.cache, 16) == expected


# --- bad input --------------------------------------------------------------------------

def test_bad_input_is_a_typed_error(model, paragraphs):
    chunk = list(paragraphs[0].encode())[:20]
    _, kv = prefill(model, chunk)
    good = [Segment(chunk, kv), Segment([65, 66])]
    with pytest.raises(InvalidArgument, match="empty"):
        blend_prefill(model, [])
    for ratio in (-0.1, 1.5):
        with pytest.raises(InvalidArgument, match="recompute_ratio"):
            blend_prefill(model, good, recompute_ratio=ratio)
    with pytest.raises(InvalidType, match="recompute_ratio"):
        blend_prefill(model, good, recompute_ratio="0.5")
    with pytest.raises(InvalidArgument, match="check_layer"):
        blend_prefill(model, good, check_layer=8)
    with pytest.raises(InvalidArgument, match="layers"):
        blend_prefill(model, [Segment(chunk, kv[:-1])])
    with pytest.raises(InvalidArgument, match="expected"):
        blend_prefill(model, [Segment(chunk[:-1], kv)])
    with pytest.raises(InvalidArgument, match="position"):
        blend_prefill(model, [Segment(chunk, kv, position=-1)])
    with pytest.raises(InvalidArgument, match="non-empty"):
        blend_prefill(model, [Segment([])])
    with pytest.raises(InvalidType, match="Segment"):
        blend_prefill(model, [chunk])
    with pytest.raises(InvalidType, match="Llama"):
        blend_prefill(torch.nn.Linear(2, 2), good)
    with pytest.raises(InvalidArgument, match="layers"):
        kv_deviation(kv, kv[:-1])


def test_bad_rerotation_input_is_a_typed_error():
    rope = RopeSpec.from_theta(8)
    keys = torch.zeros(2, 5, 8)
    with pytest.raises(InvalidArgument, match="one offset per token"):
        rerotate_keys(keys, torch.zeros(4, dtype=torch.long), rope)
    with pytest.raises(InvalidType, match="integer"):
        rerotate_keys(keys, torch.zeros(5), rope)
    with pytest.raises(InvalidArgument, match="head_dim"):
        rerotate_keys(torch.zeros(2, 5, 6), 1, rope)
    with pytest.raises(InvalidArgument, match="shape"):
        rerotate_keys(torch.zeros(5, 8), 1, rope)
    with pytest.raises(InvalidArgument, match="even"):
        RopeSpec.from_theta(7)
    with pytest.raises(ConfigError, match="rotary"):
        RopeSpec.from_model(torch.nn.Linear(2, 2))


def test_chunks_from_a_content_mode_store_blend_like_cached_ones(model, paragraphs, tmp_path):
    """RAG chunks kept in the store by content, loaded re-rotated to their place, then blended.

    The model runs in float32 and the store keeps fp16 (rounding the KV slightly), so the
    result is compared with blending the same chunks' KV directly: same tokens chosen,
    logits within fp16 rounding."""
    import tierstore

    segments, ids, full_logits, _ = rag_prompt(model, paragraphs, 0)
    with tierstore.connect(tmp_path) as db:
        kv = db.kv_cache(model, "bytelm-man@test", codec="fp16", mode="content")
        for seg in segments[:-1]:
            kv.put(seg.token_ids, seg.kv)  # computed alone, at position 0
        stored, start = [], 0
        for seg in segments[:-1]:
            n = len(seg.token_ids)
            assert kv.lookup_prefix(seg.token_ids) == n
            # loaded with its keys already re-rotated to where the chunk sits in this prompt
            stored.append(Segment(seg.token_ids, kv.get(seg.token_ids, position=start, dtype=torch.float32),
                                  position=start))
            start += n
        assert kv.get(list(segments[-1].token_ids)) is None  # the question was never cached
    from_store = blend_prefill(model, stored + [segments[-1]], recompute_ratio=0.15)
    direct = blend_prefill(model, segments, recompute_ratio=0.15)
    # the only difference is the fp16 rounding of the stored KV: the same tokens are picked and
    # the logits agree closely; both are far closer to the full prefill than plain reuse
    assert torch.equal(from_store.recomputed, direct.recomputed)
    assert (from_store.logits - direct.logits).abs().max() < 0.05
    assert torch.argmax(from_store.logits) == torch.argmax(direct.logits)
