"""Text corpora for the demo and the CLI: files a user names, or real text found on the machine.

:func:`find_corpus` looks, in order, for the manual pages installed on the machine
(``/usr/share/man/man1`` .. ``man8``, roff turned into plain paragraphs), the Python
documentation topics that ship with CPython (``pydoc_data``), and only then falls back to
generated sentences. :func:`read_documents` reads text files (one document per blank-line
separated paragraph) and JSONL files (one object per line with a ``text`` field, other
fields kept as attributes) for ``tierstore ingest``.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import InvalidArgument, NotFound

__all__ = ["Document", "Corpus", "find_corpus", "read_documents", "man_paragraphs"]

MAN_ROOT = Path("/usr/share/man")


@dataclass(frozen=True)
class Document:
    """One paragraph of text and its attributes (``source``, ``section``, ...)."""

    text: str
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Corpus:
    """Documents and where they came from (``kind``: ``man``, ``pydoc``, ``files`` or ``generated``)."""

    kind: str
    description: str
    documents: list[Document]


# roff: font and size escapes, special characters, and the macros that carry text
_ESCAPES = re.compile(r"\\f(?:\[[^\]]*\]|\(..|.)|\\s[-+]?\d+|\\\*(?:\(..|\[[^\]]*\]|.)|\\\((..)|\\\[[^\]]*\]|"
                      r"\\[&|^%:!]|\\c$")
_SPECIAL = {"em": "--", "en": "-", "hy": "-", "lq": '"', "rq": '"', "aq": "'", "bu": "*", "co": "(c)", "ti": "~",
            "dq": '"', "oq": "'", "cq": "'", "mi": "-", "pl": "+", "mu": "x", "<=": "<=", ">=": ">="}
_TEXT_MACROS = {"B", "I", "BR", "RB", "IR", "RI", "BI", "IB", "SM", "SB"}
_BREAK_MACROS = {"SH", "SS", "PP", "P", "LP", "TP", "IP", "HP", "sp", "br", "RS", "RE", "EX", "EE", "nf", "fi",
                 "TH", "Dd", "Sh", "Ss", "Pp"}


def _unescape(line: str) -> str:
    line = _ESCAPES.sub(lambda m: _SPECIAL.get(m.group(1) or "", ""), line)
    return line.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ").replace("\\", "")


def man_paragraphs(source: str, *, min_chars: int = 80) -> list[str]:
    """Plain-text paragraphs of a roff manual page (macros dropped, text macros kept)."""
    paragraphs: list[str] = []
    current: list[str] = []

    def end() -> None:
        text = " ".join(" ".join(current).split())
        if len(text) >= min_chars:
            paragraphs.append(text)
        current.clear()

    for raw in source.splitlines():
        if raw.startswith((".", "'")):
            name, _, rest = raw[1:].strip().partition(" ")
            if name in _TEXT_MACROS:
                current.append(_unescape(rest.replace('"', "")))
            elif name in _BREAK_MACROS or name.startswith("\\\""):
                end()
            continue
        if not raw.strip():
            end()
            continue
        current.append(_unescape(raw))
    end()
    return paragraphs


def _man_pages(root: Path) -> list[tuple[str, Path]]:
    pages = []
    for section in range(1, 9):
        folder = root / f"man{section}"
        if folder.is_dir():
            pages += [(str(section), p) for p in sorted(folder.iterdir()) if p.is_file()]
    return pages


def _man_corpus(limit: int, seed: int, root: Path) -> Corpus | None:
    pages = _man_pages(root)
    if not pages:
        return None
    random.Random(seed).shuffle(pages)
    documents: list[Document] = []
    seen: set[str] = set()
    read = 0
    for section, path in pages:
        if len(documents) >= limit:
            break
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        text = raw.decode("utf-8", errors="replace")
        if text.startswith(".so "):  # a link to another page
            continue
        read += 1
        page = path.name.split(".")[0]
        for paragraph in man_paragraphs(text)[:12]:
            if paragraph not in seen:  # boilerplate repeated across pages would only add ties
                seen.add(paragraph)
                documents.append(Document(paragraph, {"page": page, "section": section}))
    if len(documents) < 200:
        return None
    return Corpus("man", f"{len(documents[:limit])} paragraphs of {read} manual pages in {root}",
                  documents[:limit])


def _pydoc_corpus(limit: int) -> Corpus | None:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return None
    documents = []
    for topic in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[topic]):
            text = " ".join(block.split())
            if len(text) >= 80:
                documents.append(Document(text, {"page": topic, "section": "pydoc"}))
    if len(documents) < 200:
        return None
    return Corpus("pydoc", f"{len(documents[:limit])} paragraphs of the Python documentation topics (pydoc_data)",
                  documents[:limit])


_TOPICS = ["storage", "network", "file", "process", "memory", "user", "package", "kernel", "shell", "display"]
_VERBS = ["copies", "lists", "removes", "prints", "changes", "creates", "compresses", "mounts", "checks", "sends"]


def _generated_corpus(limit: int, seed: int) -> Corpus:
    rng = random.Random(seed)
    documents = []
    for i in range(limit):
        topic = rng.choice(_TOPICS)
        words = [f"The {topic} tool {rng.choice(_VERBS)} {rng.choice(_TOPICS)} entries"]
        words += [f"{rng.choice(_VERBS)} the {rng.choice(_TOPICS)} {rng.choice(_TOPICS)}" for _ in range(8)]
        documents.append(Document(", ".join(words) + ".", {"page": f"gen{i % 97}", "section": topic}))
    return Corpus("generated", f"{limit} generated sentences (no manual pages or Python docs found)", documents)


def find_corpus(limit: int = 3000, *, seed: int = 0, man_root: str | os.PathLike = MAN_ROOT,
                allow: tuple[str, ...] = ("man", "pydoc", "generated")) -> Corpus:
    """Up to ``limit`` paragraphs of the first real corpus found on this machine."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidArgument(f"limit must be a positive int, got {limit!r}")
    if "man" in allow:
        corpus = _man_corpus(limit, seed, Path(man_root))
        if corpus is not None:
            return corpus
    if "pydoc" in allow:
        corpus = _pydoc_corpus(limit)
        if corpus is not None:
            return corpus
    if "generated" in allow:
        return _generated_corpus(limit, seed)
    raise NotFound(f"no corpus of kinds {allow} found on this machine")


def read_documents(paths: list[str | os.PathLike], *, text_field: str = "text") -> Iterator[Document]:
    """Documents of text files (paragraphs split at blank lines) and JSONL files (one object
    per line with a ``text_field`` string; its other scalar fields become attributes).
    Directories are walked for ``.txt``, ``.md`` and ``.jsonl`` files."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".jsonl") and p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise NotFound(f"{str(path)!r} does not exist; give text (.txt, .md) or JSONL files or folders")
    for path in files:
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for block in re.split(r"\n\s*\n", text):
            block = " ".join(block.split())
            if block:
                yield Document(block, {"source": path.name})


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"{path}:{number}: not JSON ({exc.msg}); one JSON object per line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise InvalidArgument(f"{path}:{number}: needs an object with a string {text_field!r} field")
            attributes = {k: v for k, v in obj.items() if k != text_field and isinstance(v, (str, int, float, bool))
                          and not k.startswith("_")}
            attributes.setdefault("source", path.name)
            yield Document(obj[text_field], attributes)
