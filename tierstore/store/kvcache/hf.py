"""transformers interop: cache objects to per-layer tensors and back, and model loading.

The KV-cache store speaks per-layer ``(key, value)`` tensors of shape
``(kv_heads, tokens, head_dim)``. transformers keeps a model's cache in a
``DynamicCache`` whose layout moved between versions (``key_cache`` / ``value_cache``
lists up to 4.5x, ``layers[i].keys`` / ``.values`` after) and whose forward argument was
renamed (``past_key_values`` -> ``cache`` in 5.x). This module hides those differences:

* :func:`cache_layers` turns a ``DynamicCache``, a legacy tuple of per-layer pairs, or a
  list of 3-D or batch-1 4-D pairs into a list of 3-D ``(key, value)`` pairs (views, no copy);
* :func:`cache_tensors` returns a cache object's own per-layer tensors (any batch size);
* :func:`to_dynamic_cache` builds a ``DynamicCache`` from such pairs;
* :func:`cache_argument` names the keyword a model's ``forward`` takes its cache by, and
  :func:`output_cache` finds the cache in what it returned;
* :func:`layout_of_model` reads ``layers, kv_heads, head_dim`` from a model's config;
* :func:`load_llama` loads a Llama-architecture checkpoint directory (``config.json`` and
  safetensors shards) into ``LlamaForCausalLM`` without the hub.

transformers is imported only by the functions that need it (extra ``tierstore[hf]``).
"""

from __future__ import annotations

import glob
import inspect
import json
import os
from typing import Any

from ..._optional import torch as _torch
from ..._optional import transformers as _transformers
from ...errors import ConfigError, InvalidArgument, InvalidType

__all__ = ["cache_layers", "cache_tensors", "to_dynamic_cache", "cache_argument", "output_cache", "layout_of_model",
           "load_llama", "is_cache_object"]


def is_cache_object(obj: object) -> bool:
    """True for a transformers ``Cache`` (``DynamicCache`` and relatives), without importing it."""
    return hasattr(obj, "get_seq_length") and (hasattr(obj, "layers") or hasattr(obj, "key_cache"))


def cache_tensors(cache: Any) -> list[tuple[Any, Any]]:
    """The per-layer ``(key, value)`` tensors of a transformers cache object, as it holds them
    (4-D, any batch size); see :func:`cache_layers` for the store's 3-D form."""
    if hasattr(cache, "layers") and not hasattr(cache, "key_cache"):
        pairs = []
        for i, layer in enumerate(cache.layers):
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if keys is None or values is None:
                raise InvalidArgument(f"cache layer {i} holds no keys/values yet (an empty or lazy cache)")
            pairs.append((keys, values))
        return pairs
    return list(zip(cache.key_cache, cache.value_cache))


def cache_layers(past_key_values: Any) -> list[tuple[Any, Any]]:
    """Per-layer 3-D ``(key, value)`` pairs of ``past_key_values`` (views, no copy).

    Accepts a transformers cache object, or a sequence with one ``(key, value)`` per layer
    where each tensor is ``(kv_heads, tokens, head_dim)`` or batch-1
    ``(1, kv_heads, tokens, head_dim)``. Anything else is an :class:`InvalidType` /
    :class:`InvalidArgument` naming the layer and what was wrong.
    """
    torch = _torch()
    if is_cache_object(past_key_values):
        pairs = cache_tensors(past_key_values)
    elif isinstance(past_key_values, (list, tuple)):
        pairs = list(past_key_values)
    else:
        raise InvalidType("past_key_values must be a transformers cache (DynamicCache) or a sequence of "
                          f"per-layer (key, value) tensors, got {type(past_key_values).__name__}")
    if not pairs:
        raise InvalidArgument("past_key_values has no layers")
    out = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (list, tuple)) or len(pair) < 2:
            raise InvalidType(f"layer {i} must be a (key, value) pair of tensors, got {type(pair).__name__}")
        key, value = pair[0], pair[1]
        for what, t in (("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise InvalidType(f"layer {i} {what} must be a torch.Tensor, got {type(t).__name__}")
            if t.ndim == 4:
                if t.shape[0] != 1:
                    raise InvalidArgument(f"layer {i} {what} has batch size {t.shape[0]}; the store takes one "
                                          "sequence at a time: put each batch row separately")
            elif t.ndim != 3:
                raise InvalidArgument(f"layer {i} {what} must be (kv_heads, tokens, head_dim) or "
                                      f"(1, kv_heads, tokens, head_dim), got shape {tuple(t.shape)}")
        out.append((key[0] if key.ndim == 4 else key, value[0] if value.ndim == 4 else value))
    return out


def to_dynamic_cache(layers: Any, config: Any = None) -> Any:
    """A transformers ``DynamicCache`` holding ``layers``: 3-D pairs (batch 1) or 4-D pairs of any batch."""
    transformers = _transformers()
    if isinstance(layers, (list, tuple)) and layers and all(
            isinstance(p, (list, tuple)) and len(p) >= 2 and getattr(p[0], "ndim", 0) == 4 for p in layers):
        pairs = [(p[0], p[1]) for p in layers]  # already batched
    else:
        pairs = [(k.unsqueeze(0), v.unsqueeze(0)) for k, v in cache_layers(layers)]
    cache = transformers.DynamicCache(config=config) if config is not None else transformers.DynamicCache()
    for i, (k, v) in enumerate(pairs):
        cache.update(k, v, i)
    return cache


def cache_argument(model: Any) -> str:
    """``"cache"`` (transformers 5.x) or ``"past_key_values"``: how ``model.forward`` takes a cache."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output: Any) -> Any:
    """The cache a model's forward returned (``output.cache`` in 5.x, else ``past_key_values``)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def layout_of_model(model: Any) -> dict[str, int]:
    """``{"layers", "kv_heads", "head_dim"}`` from a transformers model (or its config)."""
    config = getattr(model, "config", model)
    try:
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    except AttributeError as exc:
        raise InvalidType(f"cannot read the KV layout from {type(config).__name__}: {exc}") from None
    return {"layers": layers, "kv_heads": kv_heads, "head_dim": int(head_dim)}


def load_llama(directory: str | os.PathLike, *, dtype: Any = None, device: Any = None) -> Any:
    """Load a Llama-architecture checkpoint (``config.json`` + ``*.safetensors``) offline.

    Tied ``lm_head`` weights may be absent from the shards (they are tied after loading).
    Returns the model in eval mode, in ``dtype`` (default: as stored) on ``device``; its
    ``name_or_path`` is the directory's name (the model id a KV-cache store keys by).
    """
    transformers = _transformers()
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{directory!r} has no config.json; give a checkpoint directory")
    with open(config_path, encoding="utf-8") as f:
        config = transformers.LlamaConfig(**json.load(f))
    shards = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not shards:
        raise ConfigError(f"{directory!r} has no *.safetensors weights")
    state: dict[str, Any] = {}
    for shard in shards:
        state.update(load_file(shard))
    model = transformers.LlamaForCausalLM(config)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise ConfigError(f"checkpoint {directory!r} does not match its config: missing {missing[:5]}, "
                          f"unexpected {list(result.unexpected_keys)[:5]}")
    model.tie_weights()
    model.config._name_or_path = os.path.basename(os.path.normpath(directory))  # its id in KV cache keys
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()
