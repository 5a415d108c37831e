"""RAG with KV reuse: retrieve chunks, reuse their cached KV, generate with a transformers model.

::

    import torch, tierstore
    from tierstore.client.rag import ByteTokenizer, RagPipeline
    from tierstore.store.kvcache.hf import load_llama

    db = tierstore.connect("./data")
    col = db.create_collection("docs", dim=384, metric="cosine")
    model = load_llama("models/bytelm-man", dtype=torch.bfloat16)       # or any transformers causal LM
    kv = db.kv_cache(model, "v1", codec="bf16", chunk_tokens=64)         # prefix mode, lossless for bf16
    rag = RagPipeline(col, kv, model, ByteTokenizer(), embed=embedder)   # embedder: list[str] -> (n, 384)
    rag.add_texts(paragraphs)
    ans = rag.answer("How do I extract a tar archive?", k=3)            # RagAnswer
    rag.compare("How do I extract a tar archive?")                       # TTFT with / without reuse

**Prompt.** ``[BOS] + system_prompt + chunk_1 + sep + ... + chunk_k + sep + template(question)``,
the chunks in retrieval order. Each piece is tokenized on its own (without special
tokens) and the token lists are concatenated, so a chunk has the same tokens in every
prompt it appears in. The part before the question is the *context*.

**Reuse modes** (``reuse=``):

- ``"prefix"`` (LMCache-style) with a prefix-mode :class:`KVCacheStore`: the store keeps
  the context's KV in chunks of ``chunk_tokens`` chained by prefix (a partial last chunk
  too). ``lookup_prefix`` says how many leading context tokens are cached; those are
  loaded, the rest is prefilled, and the newly computed chunks are stored after the
  answer. Prefill always runs in pieces cut at the store's chunk boundaries (and at the
  end of the context), with or without reuse, so a loaded chunk is bit for bit the KV a
  run without reuse computes at that point and every later piece sees the same inputs:
  with a lossless codec (``fp16`` for a float16 model, ``bf16`` for bfloat16;
  :attr:`RagPipeline.lossless`) the output is **identical** to no reuse.
- ``"blend"`` (CacheBlend-style, non-prefix) with a content-mode store opened with the
  model (or ``rope=``): every chunk's KV is cached on its own, computed on a miss right
  after a BOS (position 1) and stored; on a hit it is loaded re-rotated to its place in
  this prompt. :func:`~tierstore.store.kvcache.blend.blend_prefill` then recomputes
  ``recompute_ratio`` of the cached tokens (those whose KV deviates most at layer 1)
  plus the question. Cross-chunk attention is approximated: the output is close to,
  not identical with, a full prefill (``compare`` measures how close).

**Timing.** ``ttft_s`` runs from the end of retrieval (prompt assembly, KV lookup and
load, prefill) to the first generated token's logits; ``retrieval_s`` is the search
before it and ``total_s`` the whole call, retrieval, decoding and storing new KV
included. ``answer(reuse=False)`` is the baseline: the same pieces, nothing read from or
written to the KV store.

Bad input raises :mod:`tierstore.errors` types naming what to fix. torch and
transformers are imported when a pipeline is built, not by importing this module.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, InvalidArgument, InvalidType
from ._rag_prefill import PrefillEngine, _Prompt, _synchronize
from .integrations._common import string_id_to_int

__all__ = ["RagPipeline", "RagAnswer", "Chunk", "ByteTokenizer", "REUSE_MODES", "DEFAULT_TEMPLATE", "agreement",
           "common_prefix"]

REUSE_MODES = ("prefix", "blend")
DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
_STORE_MODE = {"prefix": "prefix", "blend": "content"}
_CAST_CODECS = {"fp16": "float16", "bf16": "bfloat16"}  # lossless for a model of exactly this dtype
_COMPARE_OPTIONS = ("k", "max_new_tokens", "filter")


@dataclass(frozen=True)
class Chunk:
    """One retrieved chunk: its collection id, text and distance to the question."""

    id: int
    text: str
    distance: float


@dataclass
class RagAnswer:
    """What :meth:`RagPipeline.answer` returns.

    ``token_ids`` are the generated tokens (EOS excluded), ``text`` their decoding,
    ``chunk_ids`` the retrieved chunks in prompt order. ``ttft_s``: end of retrieval to
    the first token's logits; ``total_s``: the whole call. ``reused_tokens``: prompt
    tokens whose KV came from the store (in blend mode, less those recomputed);
    ``prefill_tokens``: tokens the model computed through every layer (blend: the
    recomputed ones plus chunks prefilled on a miss; every token also passes the
    layers up to the check layer). ``kv_hits`` / ``kv_misses``: store chunks loaded /
    computed. ``mode``: ``"prefix"``, ``"blend"`` or ``"none"`` (no reuse).
    ``timings``: seconds per phase: ``load`` (KV lookup and load; blend: also chunks
    computed alone on a miss), ``prefill``, ``decode``, ``store`` (new KV written).
    """

    text: str
    token_ids: list[int]
    chunk_ids: list[int]
    ttft_s: float
    total_s: float
    reused_tokens: int
    prefill_tokens: int
    kv_hits: int
    kv_misses: int
    mode: str
    prompt_tokens: int = 0
    retrieval_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


class ByteTokenizer:
    """Bytes as tokens, for byte-level models such as bytelm-man: ids 0-255 are UTF-8
    bytes, ``bos_token_id`` 256, ``eos_token_id`` 257 (ids >= 256 are dropped by
    :meth:`decode`, an incomplete UTF-8 sequence decodes to U+FFFD). ``bos_token_id=None``
    starts prompts without a BOS; ``eos_token_id=None`` never stops before ``max_new_tokens``."""

    def __init__(self, *, bos_token_id: int | None = 256, eos_token_id: int | None = 257) -> None:
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``, no special tokens."""
        if not isinstance(text, str):
            raise InvalidType(f"text must be str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of the byte tokens in ``token_ids``."""
        return bytes(int(t) for t in token_ids if 0 <= int(t) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(bos_token_id={self.bos_token_id}, eos_token_id={self.eos_token_id})"


class _Tokenizer:
    """An HF tokenizer (special tokens left to the pipeline) or any encode/decode object."""

    def __init__(self, tokenizer: Any) -> None:
        for name in ("encode", "decode"):
            if not callable(getattr(tokenizer, name, None)):
                raise InvalidType(f"tokenizer must have encode(str) -> list[int] and decode(list[int]) -> str; "
                                  f"{type(tokenizer).__name__} has no {name}()")
        try:
            params = inspect.signature(tokenizer.encode).parameters
        except (TypeError, ValueError):
            params = {}
        self._options = {"add_special_tokens": False} if "add_special_tokens" in params else {}
        self._tokenizer = tokenizer
        self.bos = _special_id(tokenizer, "bos_token_id")
        self.eos = _special_id(tokenizer, "eos_token_id")

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self._tokenizer.encode(text, **self._options)]

    def decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids)


def _special_id(tokenizer: Any, name: str) -> int | None:
    value = getattr(tokenizer, name, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InvalidType(f"tokenizer.{name} must be an int >= 0 or None, got {value!r}")
    return int(value)


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidType(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise InvalidArgument(f"{name} must be >= 1, got {value}")
    return int(value)


def _text(name: str, value: object, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidType(f"{name} must be str, got {type(value).__name__}")
    if not empty and not value.strip():
        raise InvalidArgument(f"{name} is empty: give some text")
    return value


class RagPipeline(PrefillEngine):
    """Retrieval from a collection, KV reuse from a KV-cache store, greedy generation.

    :param collection: a :class:`~tierstore.client.collection.Collection` whose rows
        carry their text in the attribute ``text_field`` (:meth:`add_texts` does that).
    :param kv_cache: a :class:`~tierstore.store.kvcache.KVCacheStore` of this model:
        ``mode="prefix"`` for ``reuse="prefix"``, ``mode="content"`` (opened with the
        transformers model, or ``rope=``) for ``reuse="blend"``.
    :param model: a transformers causal LM in eval mode (blend: Llama architecture).
    :param tokenizer: an HF tokenizer or anything with ``encode``/``decode`` and
        ``bos_token_id``/``eos_token_id`` (e.g. :class:`ByteTokenizer`).
    :param embed: ``list[str] -> (n, dim) float32`` array, ``dim`` the collection's.
    :param text_field: attribute holding a row's text (``_`` names are stored unfiltered).
    :param reuse: ``"prefix"`` or ``"blend"`` (see the module docstring).
    :param recompute_ratio: blend mode: fraction of cached tokens recomputed.
    :param template: the question's text, containing ``{question}``
        (default :data:`DEFAULT_TEMPLATE`).
    :param system_prompt: text after BOS, before the chunks.
    :param separator: text after every chunk.
    """

    def __init__(self, collection: Any, kv_cache: Any, model: Any, tokenizer: Any, *,
                 embed: Callable[[list[str]], np.ndarray], text_field: str = "_text", reuse: str = "prefix",
                 recompute_ratio: float = 0.15, template: str | None = None, system_prompt: str = "",
                 separator: str = "\n\n") -> None:
        from ..store.kvcache import hf
        from ..store.kvcache.store import KVCacheStore

        for method in ("search", "get", "add"):
            if not callable(getattr(collection, method, None)):
                raise InvalidType(f"collection must be a tierstore Collection (db.collection(name)), "
                                  f"got {type(collection).__name__}")
        if not callable(embed):
            raise InvalidType(f"embed must be a callable list[str] -> (n, dim) array, got {type(embed).__name__}")
        if reuse not in REUSE_MODES:
            raise InvalidArgument(f"reuse must be one of {REUSE_MODES}, got {reuse!r}")
        if not isinstance(kv_cache, KVCacheStore):
            raise InvalidType(f"kv_cache must be a KVCacheStore (db.kv_cache(model, revision, ...)), "
                              f"got {type(kv_cache).__name__}")
        if kv_cache.mode != _STORE_MODE[reuse]:
            raise ConfigError(f"reuse={reuse!r} needs a KV store in mode={_STORE_MODE[reuse]!r}, this one is "
                              f"mode={kv_cache.mode!r}: open it with db.kv_cache(..., mode={_STORE_MODE[reuse]!r})")
        if reuse == "blend" and kv_cache.rope is None:
            raise ConfigError("reuse='blend' loads chunk KV re-rotated to new positions: open the KV store with "
                              "the transformers model as model= (or rope=RopeSpec.from_model(model))")
        if isinstance(recompute_ratio, bool) or not isinstance(recompute_ratio, (int, float)):
            raise InvalidType(f"recompute_ratio must be a float in [0, 1], got {type(recompute_ratio).__name__}")
        if not 0.0 <= recompute_ratio <= 1.0:
            raise InvalidArgument(f"recompute_ratio must be in [0, 1], got {recompute_ratio}")
        self.template = DEFAULT_TEMPLATE if template is None else _text("template", template)
        if "{question}" not in self.template:
            raise InvalidArgument(f"template must contain '{{question}}', got {self.template!r}")
        self.text_field = _text("text_field", text_field)
        self.system_prompt = _text("system_prompt", system_prompt, empty=True)
        self.separator = _text("separator", separator, empty=True)
        if not callable(model) or getattr(model, "config", None) is None:
            raise InvalidType(f"model must be a transformers causal LM, got {type(model).__name__}")
        layout = hf.layout_of_model(model)
        self._dtype = str(getattr(model, "dtype", "")).removeprefix("torch.")
        known = kv_cache.layout
        if known is not None:
            mine = {**layout, "dtype": self._dtype}
            theirs = {name: getattr(known, name) for name in mine}
            if mine != theirs:
                raise ConfigError(f"the KV store holds KV of layout {theirs}, the model's is {mine}: open a KV "
                                  "store for this model (db.kv_cache(model, revision, ...))")
        if reuse == "blend":
            from ..store.kvcache.blend import _decoder

            _decoder(model)  # a Llama-architecture model, or InvalidType now rather than at the first answer
        self.collection, self.kv_cache, self.model, self.embed = collection, kv_cache, model, embed
        self.tokenizer = tokenizer
        self._tokens = _Tokenizer(tokenizer)
        self.reuse, self.recompute_ratio = reuse, float(recompute_ratio)
        self._cache_arg = hf.cache_argument(model)
        self._vocab = getattr(model.config, "vocab_size", None)
        self._max_positions = getattr(model.config, "max_position_embeddings", None)

    def __repr__(self) -> str:
        return f"<RagPipeline reuse={self.reuse!r} {self.kv_cache!r} collection={self.collection.name!r}>"

    @property
    def lossless(self) -> bool:
        """Whether ``answer()`` with reuse gives exactly the output without: prefix mode and a
        cast codec matching the model's dtype (``fp16``/float16, ``bf16``/bfloat16)."""
        codec = self.kv_cache.codec
        return self.reuse == "prefix" and codec.lossless and _CAST_CODECS.get(codec.name) == self._dtype

    # ------------------------------------------------------------------ documents
    def add_texts(self, texts: Sequence[str], ids: Sequence[int] | None = None,
                  attributes: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Embed ``texts`` and upsert them into the collection, each text in ``text_field``.

        ``ids`` default to a stable hash of each text (xxh3, 63 bits), so adding a text
        again replaces it. ``attributes``: one dict per text (filterable per the
        collection's schema). Returns the ids.
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise InvalidType("texts must be a list of str (wrap a single text: [text])")
        texts = [_text(f"texts[{i}]", t) for i, t in enumerate(texts)]
        if not texts:
            raise InvalidArgument("texts is empty: give at least one text")
        if ids is None:
            row_ids = [string_id_to_int(t, "texts") for t in texts]
        else:
            if not _int_sequence(ids):
                raise InvalidType(f"ids must be a 1-D sequence of int, got {type(ids).__name__}")
            row_ids = np.asarray(ids, dtype=np.int64).tolist()
            if len(row_ids) != len(texts):
                raise InvalidArgument(f"got {len(row_ids)} ids for {len(texts)} texts: give one id per text")
        attributes = [{}] * len(texts) if attributes is None else \
            [attributes] if isinstance(attributes, Mapping) else list(attributes)
        if len(attributes) != len(texts):
            raise InvalidArgument(f"attributes must be a list with one dict per text ({len(texts)}), "
                                  f"got {len(attributes)}")
        rows = []
        for i, (text, extra) in enumerate(zip(texts, attributes)):
            if not isinstance(extra, Mapping):
                raise InvalidType(f"attributes[{i}] must be a dict, got {type(extra).__name__}")
            if self.text_field in extra:
                raise InvalidArgument(f"attributes[{i}] has {self.text_field!r}, where the pipeline keeps the "
                                      "text: leave it out")
            rows.append({**extra, self.text_field: text})
        self.collection.add(np.asarray(row_ids, dtype=np.int64), self._embed(texts), rows)
        return row_ids

    def _embed(self, texts: list[str]) -> np.ndarray:
        vectors = np.asarray(self.embed(texts))
        dim = getattr(self.collection, "dim", None)
        if vectors.ndim != 2 or vectors.shape[0] != len(texts) or (dim is not None and vectors.shape[1] != dim):
            raise InvalidArgument(f"embed returned shape {vectors.shape} for {len(texts)} texts; the collection "
                                  f"needs ({len(texts)}, {dim}): give an embedder of the collection's dim")
        return vectors.astype(np.float32, copy=False)

    def retrieve(self, question: str, *, k: int = 3, filter: Mapping | None = None) -> list[Chunk]:
        """The ``k`` chunks nearest to ``question`` (fewer if the collection or filter has
        fewer), nearest first."""
        question = _text("question", question)
        k = _count("k", k)
        result = self.collection.search(self._embed([question])[0], k=k, filter=filter)
        ids, distances = np.asarray(result.ids)[0], np.asarray(result.distances)[0]
        keep = ids >= 0
        ids, distances = ids[keep], distances[keep]
        rows = self.collection.get(ids, include_vectors=False) if ids.size else []
        chunks = []
        for row_id, distance, row in zip(ids.tolist(), distances.tolist(), rows):
            text = None if row is None else (row.get("attributes") or {}).get(self.text_field)
            if not isinstance(text, str):
                raise ConfigError(f"row {row_id} has no text in attribute {self.text_field!r}: add documents with "
                                  "RagPipeline.add_texts, or pass the attribute that holds them as text_field=")
            chunks.append(Chunk(row_id, text, float(distance)))
        return chunks

    # ------------------------------------------------------------------ answering
    def _prompt(self, question: str, chunks: list[Chunk]) -> _Prompt:
        encode = self._tokens.encode
        head = ([self._tokens.bos] if self._tokens.bos is not None else []) + \
            (encode(self.system_prompt) if self.system_prompt else [])
        prompt = _Prompt(head, [encode(c.text + self.separator) for c in chunks],
                         encode(self.template.replace("{question}", question)))
        if not prompt.question:
            raise InvalidArgument("the question encodes to no tokens: give some text")
        low, high = min(prompt.tokens), max(prompt.tokens)
        if low < 0 or (self._vocab is not None and high >= self._vocab):
            raise ConfigError(f"the tokenizer produced token ids {low}..{high}, the model has {self._vocab}: "
                              "use the model's own tokenizer")
        return prompt

    def answer(self, question: str, *, k: int = 3, max_new_tokens: int = 32, filter: Mapping | None = None,
               reuse: bool = True) -> RagAnswer:
        """Retrieve ``k`` chunks, prefill (reusing cached KV unless ``reuse=False``) and
        decode greedily up to ``max_new_tokens`` tokens or EOS. See :class:`RagAnswer`."""
        import torch

        max_new_tokens = _count("max_new_tokens", max_new_tokens)
        if not isinstance(reuse, bool):
            raise InvalidType(f"reuse must be a bool, got {type(reuse).__name__}")
        started = time.perf_counter()
        chunks = self.retrieve(question, k=k, filter=filter)
        retrieved = time.perf_counter()
        prompt = self._prompt(question, chunks)
        total = len(prompt.tokens) + max_new_tokens
        if self._max_positions is not None and total > self._max_positions:
            raise InvalidArgument(f"prompt ({len(prompt.tokens)} tokens) plus max_new_tokens ({max_new_tokens}) "
                                  f"exceed the model's {self._max_positions} positions: lower k or max_new_tokens, "
                                  "or add shorter chunks")
        mode = "none" if not reuse else self.reuse
        with torch.no_grad():
            if mode == "blend":
                step = self._blend_prefill(prompt)
            else:
                step = self._prefix_prefill(prompt, lookup=mode == "prefix")
            first = int(step.logits.argmax())
            _synchronize(step.logits)
            first_token = time.perf_counter()
            token_ids, cache = self._decode(first, step.cache, max_new_tokens)
        decoded = time.perf_counter()
        self._store(prompt, step, cache)
        done = time.perf_counter()
        return RagAnswer(
            text=self._tokens.decode(token_ids), token_ids=token_ids, chunk_ids=[c.id for c in chunks],
            ttft_s=first_token - retrieved, total_s=done - started, reused_tokens=step.reused,
            prefill_tokens=step.computed, kv_hits=step.hits, kv_misses=step.misses, mode=mode,
            prompt_tokens=len(prompt.tokens), retrieval_s=retrieved - started,
            timings={"load": step.load_s, "prefill": first_token - retrieved - step.load_s,
                     "decode": decoded - first_token, "store": done - decoded})

    def compare(self, question: str, *, repeats: int = 3, warm: bool = True, **options: Any) -> dict[str, Any]:
        """Answer ``question`` with and without reuse, interleaved ``repeats`` times.

        ``warm``: answer once with reuse first (untimed) so the KV store holds the
        prompt's chunks. ``options``: ``k``, ``max_new_tokens``, ``filter``. Returns
        median ``ttft_full_s`` / ``ttft_reuse_s``, ``speedup`` (their ratio),
        ``identical`` (every pair of runs generated the same tokens), ``agreement``
        (fraction of generated positions equal, last pair), ``common_prefix`` (tokens
        equal before the first difference), token counts and the last two answers.
        """
        repeats = _count("repeats", repeats)
        unknown = sorted(set(options) - set(_COMPARE_OPTIONS))
        if unknown:
            raise InvalidType(f"compare() got unexpected option(s) {unknown}; it takes {list(_COMPARE_OPTIONS)}")
        if warm:
            self.answer(question, reuse=True, **options)
        full, reused = [], []
        for _ in range(repeats):
            full.append(self.answer(question, reuse=False, **options))
            reused.append(self.answer(question, reuse=True, **options))
        base, fast = full[-1], reused[-1]
        ttft_full = statistics.median(a.ttft_s for a in full)
        ttft_reuse = statistics.median(a.ttft_s for a in reused)
        return {
            "question": question, "mode": self.reuse, "lossless": self.lossless, "repeats": repeats,
            "prompt_tokens": base.prompt_tokens, "ttft_full_s": ttft_full, "ttft_reuse_s": ttft_reuse,
            "speedup": ttft_full / ttft_reuse if ttft_reuse > 0 else float("inf"),
            "identical": all(f.token_ids == r.token_ids for f, r in zip(full, reused)),
            "agreement": agreement(base.token_ids, fast.token_ids),
            "common_prefix": common_prefix(base.token_ids, fast.token_ids),
            "reused_tokens": fast.reused_tokens, "prefill_tokens_full": base.prefill_tokens,
            "prefill_tokens_reuse": fast.prefill_tokens, "kv_hits": fast.kv_hits, "kv_misses": fast.kv_misses,
            "answer_full": base, "answer_reuse": fast,
        }


def agreement(reference: Sequence[int], other: Sequence[int]) -> float:
    """Fraction of positions (over the longer sequence) where two generations hold the same token."""
    longest = max(len(reference), len(other))
    if longest == 0:
        return 1.0
    return sum(a == b for a, b in zip(reference, other)) / longest


def common_prefix(reference: Sequence[int], other: Sequence[int]) -> int:
    """How many leading tokens two generations share."""
    count = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        count += 1
    return count


def _int_sequence(ids: object) -> bool:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)):
        return False
    array = np.asarray(ids)
    return array.ndim == 1 and (array.size == 0 or array.dtype.kind in "iu")
