"""The prefill and decode engines of :class:`tierstore.client.rag.RagPipeline`.

Prefix reuse (load the cached leading chunks, prefill the rest in pieces cut at the KV
store's chunk boundaries), CacheBlend reuse (load or compute each chunk's own KV, blend
with selective recompute), greedy decoding, and writing what an answer computed back
to the store. A mixin: the pipeline provides ``model``, ``kv_cache``, ``recompute_ratio``,
``_cache_arg`` and ``_tokens``. torch is imported inside the methods.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PrefillEngine"]


@dataclass(frozen=True)
class _Prompt:
    """A prompt's token pieces: ``head`` (BOS + system prompt), one list per chunk, the question."""

    head: list[int]
    chunks: list[list[int]]
    question: list[int]

    @property
    def context(self) -> list[int]:
        return self.head + [t for chunk in self.chunks for t in chunk]

    @property
    def tokens(self) -> list[int]:
        return self.context + self.question


@dataclass
class _Prefill:
    """A prefilled prompt: last logits and cache, what was reused, and what to store afterwards."""

    logits: Any
    cache: Any
    reused: int
    computed: int
    hits: int
    misses: int
    load_s: float
    store_context: bool = False                      # prefix mode: put the context's new chunks
    pending: list[tuple[list[int], list, int]] = field(default_factory=list)  # blend: (tokens, kv, position)


class PrefillEngine:
    """Prefill, decode and store for a pipeline (see the module docstring)."""

    def _device(self) -> Any:
        return next(self.model.parameters()).device

    def _forward(self, ids: Any, cache: Any) -> Any:
        options = {self._cache_arg: cache} if cache is not None else {}
        return self.model(ids, use_cache=True, logits_to_keep=1, **options)

    def _prefix_prefill(self, prompt: _Prompt, *, lookup: bool) -> _Prefill:
        """Prefill in pieces cut at the store's chunk boundaries, after the cached prefix."""
        import torch

        from ..store.kvcache.hf import output_cache
        from ..store.kvcache.keys import chunk_spans

        t0 = time.perf_counter()
        context = prompt.context
        spans = chunk_spans(len(context), self.kv_cache.chunk_tokens) if context else []
        cached, cache = 0, None
        if lookup and context:
            cached = self.kv_cache.lookup_prefix(context)
            if cached:
                cache = self.kv_cache.get(context[:cached], format="dynamic_cache", device=self._device())
                if cache is None:  # evicted between lookup and get: compute it all
                    cached = 0
        load_s = time.perf_counter() - t0
        tokens = prompt.tokens
        ids = torch.tensor([tokens], dtype=torch.long, device=self._device())
        out = None
        for start, end in [s for s in spans if s[0] >= cached] + [(len(context), len(tokens))]:
            out = self._forward(ids[:, start:end], cache)
            cache = output_cache(out)
        hits = sum(1 for _, end in spans if end <= cached)
        return _Prefill(out.logits[0, -1], cache, reused=cached, computed=len(tokens) - cached,
                        hits=hits if lookup else 0, misses=len(spans) - hits if lookup else 0, load_s=load_s,
                        store_context=lookup and cached < len(context))

    def _standalone(self, tokens: list[int], *, head: bool) -> tuple[list, int]:
        """A chunk's own KV, computed after a BOS (the head starts with it): (layers, position)."""
        import torch

        from ..store.kvcache.hf import cache_layers, output_cache

        lead = [] if head or self._tokens.bos is None else [self._tokens.bos]
        ids = torch.tensor([lead + tokens], dtype=torch.long, device=self._device())
        layers = cache_layers(output_cache(self._forward(ids, None)))
        return [(k[:, len(lead):], v[:, len(lead):]) for k, v in layers], len(lead)

    def _blend_prefill(self, prompt: _Prompt) -> _Prefill:
        """Load or compute every chunk's KV, then CacheBlend the prompt with the question."""
        import torch

        from ..store.kvcache.blend import Segment, blend_prefill

        t0 = time.perf_counter()
        pieces = ([(prompt.head, True)] if prompt.head else []) + [(c, False) for c in prompt.chunks]
        segments, pending, hit_rows, computed = [], [], [], 0
        position = 0
        for tokens, head in pieces:
            kv = self.kv_cache.get(tokens, position=position, device=self._device())
            hit = kv is not None
            if hit:
                segments.append(Segment(tokens, kv, position))
            else:
                kv, own = self._standalone(tokens, head=head)
                pending.append((tokens, kv, own))
                segments.append(Segment(tokens, kv, own))
                computed += len(tokens)
            hit_rows.append(torch.full((len(tokens),), hit, dtype=torch.bool))
            position += len(tokens)
        load_s = time.perf_counter() - t0
        result = blend_prefill(self.model, segments + [Segment(prompt.question)],
                               recompute_ratio=self.recompute_ratio)
        from_store = torch.cat(hit_rows + [torch.zeros(len(prompt.question), dtype=torch.bool)])
        from_store[result.recomputed.cpu()] = False
        return _Prefill(result.logits, result.cache, reused=int(from_store.sum()),
                        computed=computed + int(result.recomputed.numel()), hits=len(pieces) - len(pending),
                        misses=len(pending), load_s=load_s, pending=pending)

    def _decode(self, first: int, cache: Any, max_new_tokens: int) -> tuple[list[int], Any]:
        """Greedy decoding from ``first`` with the model's own forward and cache."""
        import torch

        from ..store.kvcache.hf import output_cache

        device, eos, out, token = self._device(), self._tokens.eos, [], first
        while token != eos:
            out.append(token)
            if len(out) == max_new_tokens:
                break
            step = self.model(torch.tensor([[token]], device=device), use_cache=True,
                              **{self._cache_arg: cache})
            cache = output_cache(step)
            token = int(step.logits[0, -1].argmax())
        return out, cache

    def _store(self, prompt: _Prompt, step: _Prefill, cache: Any) -> None:
        """Write what this answer computed and the store lacks (after decoding: off the TTFT path)."""
        if step.store_context:
            self.kv_cache.put(prompt.context, cache)  # the context's leading rows; stored chunks skipped
        for tokens, kv, position in step.pending:
            self.kv_cache.put(tokens, kv, position=position)


def _synchronize(tensor: Any) -> None:
    """Wait for the device so that a timestamp taken next covers the work, not its launch."""
    if tensor.device.type == "cuda":
        import torch

        torch.cuda.synchronize(tensor.device)
