"""CacheBlend selective recompute: prefill a prompt from independently cached chunks.

A RAG prompt is several retrieved chunks followed by a question. Each chunk's KV can be
cached on its own (computed at some position, usually 0) and reused wherever the chunk
appears, but such KV lacks the chunk's attention to the chunks before it (cross-attention)
and its keys sit at the wrong positions. CacheBlend (Yao et al., "CacheBlend: Fast Large
Language Model Serving for RAG with Cached Knowledge Fusion", EuroSys 2025,
arXiv:2405.16444) repairs it cheaply; :func:`blend_prefill` implements it for a
transformers Llama-architecture model, running the model's own modules layer by layer:

1. The segments are concatenated; each cached segment's keys are re-rotated from the
   position they were computed at to their position in the prompt
   (:func:`~tierstore.store.kvcache.rope.rerotate_keys`).
2. Layers ``0 .. check_layer - 1`` are recomputed for every token (causal attention over
   the recomputed KV). At ``check_layer`` every token's key and value are recomputed and
   compared with the cache: the squared L2 distance summed over heads and channels is
   each token's *KV deviation*.
3. The ``recompute_ratio`` fraction of cached tokens with the highest deviation is
   selected, together with every uncached token (the question) and the last prompt
   token (whose logits are returned). From ``check_layer`` on only the selected tokens'
   hidden states go forward: at each later layer their key/value rows are recomputed
   and overwrite the cached rows, and their queries attend causally over the merged KV.

The resulting cache holds, per layer, recomputed KV for layers ``<= check_layer`` and
cached-plus-recomputed KV above; at ratio 1.0 it is a full prefill (to float rounding),
at ratio 0.0 only the uncached tokens (and the last) are computed beyond ``check_layer``.
The cost beyond ``check_layer`` scales with the number of selected tokens.
:func:`kv_deviation` measures how far a cache is from a reference (e.g. a full prefill).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ...errors import InvalidArgument, InvalidType
from ..._optional import torch as _torch
from .hf import cache_layers, layout_of_model, to_dynamic_cache
from .rope import RopeSpec, rerotate_keys

__all__ = ["Segment", "BlendResult", "blend_prefill", "kv_deviation"]


@dataclass
class Segment:
    """One piece of the prompt, in order.

    :param token_ids: the segment's tokens (1-D integer tensor or sequence of int).
    :param kv: its cached KV: a transformers cache or one ``(key, value)`` per layer, each
        ``(kv_heads, tokens, head_dim)`` (or batch-1 4-D) computed with the segment's first
        token at ``position``; ``None`` for a segment to compute (e.g. the question).
    :param position: position of the first token when ``kv`` was computed (``0`` for a
        chunk prefilled alone; ``1`` when it was prefilled after a BOS that was dropped).
    """

    token_ids: Any
    kv: Any = None
    position: int = 0


@dataclass
class BlendResult:
    """What :func:`blend_prefill` returns.

    :param cache: a ``DynamicCache`` (batch 1) for the whole prompt; continue decoding with
        ``model(next_ids, **{cache_argument(model): result.cache})``.
    :param logits: the last prompt token's logits, shape ``(vocab,)``.
    :param recomputed: sorted prompt positions recomputed in every layer (LongTensor).
    :param stats: ``tokens``, ``reused`` (cached tokens taken from the cache above
        ``check_layer``), ``recomputed``, ``check_layer``, ``recompute_ratio``, ``seconds``.
    """

    cache: Any
    logits: Any
    recomputed: Any
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Prompt:
    """The concatenated segments: token ids, which rows are cached, and their per-layer KV."""

    token_ids: Any          # (tokens,) long
    cached: Any             # (tokens,) bool
    shift: Any              # (tokens,) long: prompt position - cached position
    segments: list[tuple[int, list[tuple[Any, Any]] | None]]  # (tokens, per-layer kv) per segment

    def layer_kv(self, layer: int, rope: RopeSpec, like: Any) -> tuple[Any, Any]:
        """Layer ``layer``'s cached keys (re-rotated to prompt positions) and values; zeros where uncached."""
        torch = _torch()
        keys, values = [], []
        for tokens, kv in self.segments:
            if kv is None:
                empty = like.new_zeros((like.shape[0], tokens, like.shape[-1]))
                keys.append(empty)
                values.append(empty)
            else:
                keys.append(kv[layer][0].to(like))
                values.append(kv[layer][1].to(like))
        return rerotate_keys(torch.cat(keys, dim=1), self.shift, rope), torch.cat(values, dim=1)


def _token_tensor(token_ids: Any, index: int, device: Any) -> Any:
    torch = _torch()
    ids = token_ids if isinstance(token_ids, torch.Tensor) else torch.as_tensor(list(token_ids))
    if ids.ndim != 1 or ids.numel() == 0:
        raise InvalidArgument(f"segment {index} token_ids must be a non-empty 1-D sequence, "
                              f"got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise InvalidType(f"segment {index} token_ids must be integers, got dtype {ids.dtype}")
    return ids.to(device=device, dtype=torch.long)


def _segment_kv(segment: Segment, index: int, tokens: int, layout: dict[str, int]) -> list[tuple[Any, Any]]:
    pairs = cache_layers(segment.kv)
    if len(pairs) != layout["layers"]:
        raise InvalidArgument(f"segment {index} kv has {len(pairs)} layers, the model has {layout['layers']}")
    want = (layout["kv_heads"], tokens, layout["head_dim"])
    for i, (key, value) in enumerate(pairs):
        if tuple(key.shape) != want or tuple(value.shape) != want:
            raise InvalidArgument(f"segment {index} layer {i} kv is {tuple(key.shape)} / {tuple(value.shape)}, "
                                  f"expected (kv_heads, tokens, head_dim) = {want}")
    return pairs


def _gather_prompt(segments: Sequence[Segment], layout: dict[str, int], device: Any) -> _Prompt:
    torch = _torch()
    if isinstance(segments, Segment) or not isinstance(segments, Sequence):
        raise InvalidType("segments must be a sequence of Segment")
    if not segments:
        raise InvalidArgument("segments is empty: give at least one Segment")
    ids, cached, shift, parts, start = [], [], [], [], 0
    for index, segment in enumerate(segments):
        if not isinstance(segment, Segment):
            raise InvalidType(f"segment {index} must be a Segment, got {type(segment).__name__}")
        if isinstance(segment.position, bool) or not isinstance(segment.position, int) or segment.position < 0:
            raise InvalidArgument(f"segment {index} position must be an int >= 0, got {segment.position!r}")
        tokens = _token_tensor(segment.token_ids, index, device)
        n = tokens.numel()
        kv = None if segment.kv is None else _segment_kv(segment, index, n, layout)
        ids.append(tokens)
        cached.append(torch.full((n,), kv is not None, dtype=torch.bool, device=device))
        shift.append(torch.full((n,), start - segment.position, dtype=torch.long, device=device))
        parts.append((n, kv))
        start += n
    return _Prompt(torch.cat(ids), torch.cat(cached), torch.cat(shift), parts)


def _decoder(model: Any) -> Any:
    """``model.model`` of a Llama-architecture causal LM, checked for the modules the blend runs."""
    base = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if base is None or not hasattr(model, "lm_head") or not all(hasattr(base, name) for name in needed):
        raise InvalidType(f"{type(model).__name__} is not a Llama-architecture causal LM "
                          "(expected model.model.{embed_tokens, layers, norm, rotary_emb} and model.lm_head)")
    return base


def _check_options(recompute_ratio: Any, check_layer: Any, layers: int) -> None:
    if isinstance(recompute_ratio, bool) or not isinstance(recompute_ratio, (int, float)):
        raise InvalidType(f"recompute_ratio must be a float in [0, 1], got {type(recompute_ratio).__name__}")
    if not 0.0 <= recompute_ratio <= 1.0:
        raise InvalidArgument(f"recompute_ratio must be in [0, 1], got {recompute_ratio}")
    if isinstance(check_layer, bool) or not isinstance(check_layer, int):
        raise InvalidType(f"check_layer must be an int, got {type(check_layer).__name__}")
    if not 0 <= check_layer < layers:
        raise InvalidArgument(f"check_layer must be in [0, {layers - 1}] for this model, got {check_layer}")


def _select(deviation: Any, cached: Any, ratio: float) -> Any:
    """Sorted rows to recompute: every uncached row, the last row, and the top ``ratio`` of the rest."""
    torch = _torch()
    forced = ~cached  # a new tensor: setting the last row leaves ``cached`` alone
    forced[-1] = True
    budget = int(forced.sum()) + round(ratio * int((~forced).sum()))
    score = deviation.masked_fill(forced, math.inf)
    return torch.topk(score, budget, sorted=False).indices.sort().values


def _project(attn: Any, normed: Any, cos: Any, sin: Any, heads: int, kv_heads: int,
             head_dim: int) -> tuple[Any, Any, Any]:
    """Post-RoPE queries ``(1, heads, n, d)`` and keys / values ``(kv_heads, n, d)`` of ``normed`` rows."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    n = normed.shape[1]
    q = attn.q_proj(normed).view(1, n, heads, head_dim).transpose(1, 2)
    k = attn.k_proj(normed).view(1, n, kv_heads, head_dim).transpose(1, 2)
    v = attn.v_proj(normed).view(1, n, kv_heads, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k[0], v[0]


def _attend(attn: Any, q: Any, keys: Any, values: Any, rows: Any, head_dim: int) -> Any:
    """Causal attention of the queries at prompt positions ``rows`` over all keys, through ``o_proj``."""
    torch = _torch()
    groups = q.shape[1] // keys.shape[0]
    keys = keys.repeat_interleave(groups, dim=0)[None]
    values = values.repeat_interleave(groups, dim=0)[None]
    mask = torch.arange(keys.shape[2], device=rows.device)[None, :] <= rows[:, None]
    scale = getattr(attn, "scaling", head_dim ** -0.5)
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return attn.o_proj(out.transpose(1, 2).reshape(1, rows.numel(), -1))


def _kv_distance(key: Any, value: Any, cached_key: Any, cached_value: Any) -> Any:
    """Per-token squared L2 distance between two KVs ``(kv_heads, tokens, head_dim)``, in float32."""
    torch = _torch()
    dk = (key.to(torch.float32) - cached_key.to(torch.float32)).square().sum(dim=(0, 2))
    return dk + (value.to(torch.float32) - cached_value.to(torch.float32)).square().sum(dim=(0, 2))


def blend_prefill(model: Any, segments: Sequence[Segment], *, recompute_ratio: float = 0.15,
                  check_layer: int = 1, rope: RopeSpec | None = None) -> BlendResult:
    """Prefill the concatenation of ``segments`` reusing their cached KV (CacheBlend).

    :param model: a transformers ``LlamaForCausalLM`` (or a model with the same module
        layout), in eval mode, on any device and dtype; cached KV is moved to them.
    :param segments: the prompt in order; each :class:`Segment` brings its KV or not.
    :param recompute_ratio: fraction of cached tokens recomputed above ``check_layer``,
        those whose KV deviates most there. 1.0 is a full prefill.
    :param check_layer: the layer whose KV deviation selects the tokens; layers below it
        are recomputed for every token. 1 (the first layer whose KV depends on context)
        is CacheBlend's choice; 0 makes ``recompute_ratio=0`` plain reuse.
    :param rope: the model's frequencies; default :meth:`RopeSpec.from_model`.
    :returns: a :class:`BlendResult` (cache, last-token logits, recomputed positions, stats).
    """
    torch = _torch()
    started = time.perf_counter()
    base = _decoder(model)
    layout = layout_of_model(model)
    _check_options(recompute_ratio, check_layer, layout["layers"])
    rope = RopeSpec.from_model(model) if rope is None else rope
    if not isinstance(rope, RopeSpec):
        raise InvalidType(f"rope must be a RopeSpec or None, got {type(rope).__name__}")
    device = base.embed_tokens.weight.device
    prompt = _gather_prompt(segments, layout, device)
    heads, kv_heads, head_dim = model.config.num_attention_heads, layout["kv_heads"], layout["head_dim"]

    with torch.no_grad():
        rows = torch.arange(prompt.token_ids.numel(), device=device)
        hidden = base.embed_tokens(prompt.token_ids)[None]
        kv_out = []
        for index, layer in enumerate(base.layers):
            cos, sin = base.rotary_emb(hidden, rows[None])
            q, key, value = _project(layer.self_attn, layer.input_layernorm(hidden), cos, sin,
                                     heads, kv_heads, head_dim)
            if index == check_layer:
                cached_key, cached_value = prompt.layer_kv(index, rope, key)
                keep = _select(_kv_distance(key, value, cached_key, cached_value), prompt.cached,
                               recompute_ratio)
                rows, hidden, q = rows[keep], hidden[:, keep], q[:, :, keep]
            elif index > check_layer and rows.numel() < prompt.token_ids.numel():
                cached_key, cached_value = prompt.layer_kv(index, rope, key)
                cached_key[:, rows], cached_value[:, rows] = key, value
                key, value = cached_key, cached_value
            kv_out.append((key, value))
            hidden = hidden + _attend(layer.self_attn, q, key, value, rows, head_dim)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits = model.lm_head(base.norm(hidden[:, -1]))[0]
    if logits.device.type == "cuda":  # time the work, not its launch
        torch.cuda.synchronize(logits.device)

    tokens, selected = prompt.token_ids.numel(), rows.numel()
    return BlendResult(
        cache=to_dynamic_cache(kv_out),
        logits=logits,
        recomputed=rows,
        stats={"tokens": tokens, "reused": tokens - selected, "recomputed": selected,
               "check_layer": check_layer, "recompute_ratio": float(recompute_ratio),
               "seconds": time.perf_counter() - started},
    )


def kv_deviation(cache: Any, reference: Any, *, layers: Sequence[int] | None = None) -> float:
    """Relative L2 distance ``||cache - reference|| / ||reference||`` over keys and values.

    Both are anything :func:`~tierstore.store.kvcache.hf.cache_layers` accepts, with the
    same layer count and shapes; ``layers`` restricts the sum to some layer indices.
    0.0 means identical; a blended cache against a full prefill of the same prompt gives
    the error that selective recompute left.
    """
    torch = _torch()
    ours, theirs = cache_layers(cache), cache_layers(reference)
    if len(ours) != len(theirs):
        raise InvalidArgument(f"caches have {len(ours)} and {len(theirs)} layers")
    chosen = range(len(ours)) if layers is None else list(layers)
    if any(not 0 <= i < len(ours) for i in chosen):
        raise InvalidArgument(f"layers must be indices in [0, {len(ours) - 1}], got {chosen}")
    diff = total = 0.0
    for i in chosen:
        for a, b in zip(ours[i], theirs[i]):
            if a.shape != b.shape:
                raise InvalidArgument(f"layer {i} shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
            a32, b32 = a.to(torch.float32), b.to(device=a.device, dtype=torch.float32)
            diff += float((a32 - b32).square().sum())
            total += float(b32.square().sum())
    return math.sqrt(diff / total) if total else math.sqrt(diff)
