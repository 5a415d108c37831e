#!/usr/bin/env python
"""How closely CacheBlend reuse follows a full prefill, by recompute ratio.

For prompts cut from held-out man-page paragraphs (``queries_meta.jsonl.gz``), retrieves
``k`` paragraphs of the base set, fills a content-mode KV store, then generates greedily
with a full prefill and with blend reuse at each ``--ratios`` value, and prints how often
the first token and the whole continuation agree, the fraction of positions equal, and
the median time to first token. Uses the corpus and embedder of ``rag_manpages.py``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rag_manpages import REPO, MiniLMWithKnownVectors, load_paragraphs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared",
                        help="directory holding models/bytelm-man and data/manpages-minilm")
    parser.add_argument("--prompts", type=int, default=20, help="prompts to generate for")
    parser.add_argument("--k", type=int, default=3, help="chunks retrieved per prompt")
    parser.add_argument("--tokens", type=int, default=16, help="greedy tokens compared per prompt")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="model dtype")
    parser.add_argument("--ratios", default="0,0.15,0.3,0.5,1", help="comma-separated recompute ratios")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    data_dir, model_dir = args.shared / "data" / "manpages-minilm", args.shared / "models" / "bytelm-man"
    if not (model_dir / "config.json").is_file() or not (data_dir / "queries_meta.jsonl.gz").is_file():
        parser.error(f"{args.shared} lacks models/bytelm-man or data/manpages-minilm: set --shared")
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        parser.error(f"--ratios must be numbers separated by commas, got {args.ratios!r}")

    import torch

    import tierstore
    from tierstore.client.rag import ByteTokenizer, RagPipeline, common_prefix
    from tierstore.store.kvcache.hf import load_llama

    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    model = load_llama(model_dir, dtype=dtype)
    texts, known = load_paragraphs(data_dir, 300, (100, 180))
    prompts = []
    with gzip.open(data_dir / "queries_meta.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            if len(text) > 80 and text.isascii():
                prompts.append(text[:50].rsplit(" ", 1)[0])
            if len(prompts) == args.prompts:
                break
    rows = {ratio: [] for ratio in ratios}
    full_ttft = []
    with tempfile.TemporaryDirectory(prefix="tierstore-blend-") as root, tierstore.connect(root) as db:
        col = db.create_collection("manpages", dim=384, metric="cosine")
        kv = db.kv_cache(model, "blend-agreement", codec="fp16" if args.dtype == "fp32" else args.dtype,
                         mode="content")
        # no EOS: every continuation has args.tokens tokens to compare
        rag = RagPipeline(col, kv, model, ByteTokenizer(eos_token_id=None), embed=MiniLMWithKnownVectors(known),
                          reuse="blend", template="{question}")
        rag.add_texts(texts)
        for prompt in prompts:
            rag.answer(prompt, k=args.k, max_new_tokens=1)  # computes and stores every chunk's KV
            full = rag.answer(prompt, k=args.k, max_new_tokens=args.tokens, reuse=False)
            full_ttft.append(full.ttft_s)
            for ratio in ratios:
                rag.recompute_ratio = ratio
                blend = rag.answer(prompt, k=args.k, max_new_tokens=args.tokens)
                rows[ratio].append((blend.token_ids[0] == full.token_ids[0],
                                    common_prefix(full.token_ids, blend.token_ids) == args.tokens,
                                    sum(a == b for a, b in zip(full.token_ids, blend.token_ids)) / args.tokens,
                                    blend.ttft_s))
    n = len(prompts)
    print(f"bytelm-man {args.dtype}, {n} prompts of ~{full.prompt_tokens} tokens, k={args.k}, {args.tokens} tokens; "
          f"full prefill TTFT median {statistics.median(full_ttft) * 1e3:.0f} ms")
    print(f"{'ratio':>6} {'first token':>11} {'identical':>9} {'positions':>9} {'TTFT':>8}")
    for ratio, got in rows.items():
        print(f"{ratio:6.2f} {sum(g[0] for g in got):>8}/{n} {sum(g[1] for g in got):>6}/{n} "
              f"{statistics.mean(g[2] for g in got):9.2f} {statistics.median(g[3] for g in got) * 1e3:5.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
