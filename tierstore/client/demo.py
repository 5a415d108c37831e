"""``tierstore demo``: the whole system on real text in about a minute.

1. finds a real corpus on the machine (manual pages, else Python's documentation
   topics, else generated text) and embeds it (MiniLM when installed, else hashing);
2. builds a collection in a memory + LMDB tier stack and reopens it in tiered mode, so
   posting lists and reranking vectors are read through a small memory tier;
3. searches with held-out paragraphs and prints recall@10 against exact search, QPS,
   a filtered search and the tier hit rates;
4. when torch and transformers are installed, answers questions with the RAG helper and
   compares time to first token with and without chunk KV reuse (and checks that the
   greedy output is identical).

Nothing here reads the source tree's data: a user's machine has none of it.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..index.params import SearchParams
from ._tables import format_table, human_bytes, shorten

__all__ = ["run_demo", "print_report"]

COLLECTION = "demo"
_NPROBE = SearchParams().nprobe


def _exact_topk(xb: np.ndarray, xq: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
    scores = xq @ xb.T
    if allowed is not None:
        scores[:, ~allowed] = -np.inf
    top = np.argpartition(-scores, min(k, xb.shape[0] - 1), axis=1)[:, :k]
    order = np.take_along_axis(scores, top, 1).argsort(axis=1)[:, ::-1]
    top = np.take_along_axis(top, order, 1)
    return np.where(np.take_along_axis(scores, top, 1) > -np.inf, top, -1)


def _recall(found: np.ndarray, truth: np.ndarray, xb: np.ndarray, xq: np.ndarray) -> float:
    """recall@k that counts ties as hits: a found vector is right when it is at least as
    similar as the k-th exact neighbour (duplicated paragraphs make id-based recall arbitrary)."""
    wanted = truth >= 0
    kth = np.where(wanted, np.einsum("qd,qkd->qk", xq, xb[np.maximum(truth, 0)]), np.inf).min(axis=1)
    got = found >= 0
    sims = np.einsum("qd,qkd->qk", xq, xb[np.maximum(found, 0)])
    hits = np.minimum((got & (sims >= kth[:, None] - 1e-5)).sum(axis=1), wanted.sum(axis=1))
    return float(hits.sum() / max(int(wanted.sum()), 1))


def _search_all(col, xq: np.ndarray, k: int, **kw) -> tuple[np.ndarray, np.ndarray]:
    ids = np.empty((len(xq), k), np.int64)
    times = np.empty(len(xq))
    for i, q in enumerate(xq):
        started = time.perf_counter()
        ids[i] = col.search(q, k=k, **kw).ids[0]
        times[i] = time.perf_counter() - started
    return ids, times


def _vector_part(report: dict, path: Path, docs, xb: np.ndarray, xq: np.ndarray, memory_fraction: float,
                 say: Callable[[str], None]) -> None:
    from .database import connect

    k = 10
    ids = np.arange(len(docs), dtype=np.int64)
    started = time.perf_counter()
    with connect(path / "db") as db:
        col = db.create_collection(COLLECTION, dim=xb.shape[1], metric="cosine",
                                   attributes={"section": "keyword", "page": "keyword"})
        col.add(ids=ids, vectors=xb, attributes=[{**d.attributes, "_text": d.text} for d in docs])
        built = col.build_index()
        list_bytes = col.stats()["index"]["list_bytes"]
    build_s = time.perf_counter() - started
    say(f"collection: {len(docs)} vectors, {built.get('lists', '?')} posting lists, built and committed to LMDB "
        f"in {build_s:.1f} s")
    budget = max(int(list_bytes * memory_fraction), 64 * 1024)
    # Tiered mode: memory holds the centroids, the posting directory and a cache of at most
    # `budget` bytes of posting lists; missed lists and the reranking vectors come from LMDB.
    with connect(path / "db", memory_cache=budget) as db:
        col = db.collection(COLLECTION)
        index, lmdb = col.index, db.tier
        truth = _exact_topk(xb, xq, k)
        _search_all(col, xq[:20], k)  # a service is warm; the first queries fill the cache
        lookups, fetched, lmdb_before = index.list_lookups, index.fetched_lists, lmdb.stats()
        found, times = _search_all(col, xq, k)
        recall = _recall(found, truth, xb, xq)
        sections = [d.attributes["section"] for d in docs]
        values, counts = np.unique(sections, return_counts=True)
        pick = values[np.argsort(np.abs(counts / len(docs) - 0.05))[0]]  # the section nearest 5% of the corpus
        allowed = np.asarray(sections) == pick
        f_found, f_times = _search_all(col, xq, k, filter={"section": str(pick)})
        f_recall = _recall(f_found, _exact_topk(xb, xq, k, allowed), xb, xq)
        lookups, fetched = index.list_lookups - lookups, index.fetched_lists - fetched
        lmdb_after = lmdb.stats()
        wide, wide_times = _search_all(col, xq, k, nprobe=2 * _NPROBE)
        wide_recall = _recall(wide, truth, xb, xq)
        example = col.search(xq[0], k=3)
        shown = col.get([int(i) for i in example.ids[0] if i >= 0], include_vectors=False)
        resident = col.stats()["resident_bytes"]
    tiers = [{"tier": "memory: posting-list cache", "lookups": lookups, "hits": lookups - fetched,
              "hit_rate": round((lookups - fetched) / lookups, 3) if lookups else None,
              "read": None, "stored": list_bytes, "budget": budget},
             {"tier": "ssd: LMDB (missed lists, rerank vectors)", "lookups": lmdb_after.gets - lmdb_before.gets,
              "hits": lmdb_after.hits - lmdb_before.hits,
              "hit_rate": None, "read": lmdb_after.bytes_read - lmdb_before.bytes_read,
              "stored": lmdb_after.bytes_stored, "budget": None}]
    tiers[1]["hit_rate"] = round(tiers[1]["hits"] / tiers[1]["lookups"], 3) if tiers[1]["lookups"] else None
    report["vectors"] = {
        "documents": len(docs), "queries": len(xq), "lists": built.get("lists"), "build_seconds": round(build_s, 2),
        "memory_budget_bytes": budget, "list_bytes": list_bytes, "raw_vector_bytes": xb.nbytes,
        "resident_bytes": resident, "nprobe": _NPROBE, "recall@10": round(recall, 4),
        "qps": round(len(times) / times.sum(), 1),
        "wider": {"nprobe": 2 * _NPROBE, "recall@10": round(wide_recall, 4),
                  "qps": round(len(wide_times) / wide_times.sum(), 1)},
        "p50_ms": round(float(np.median(times)) * 1e3, 3),
        "filter": {"section": str(pick), "share": round(float(allowed.mean()), 4), "recall@10": round(f_recall, 4),
                   "qps": round(len(f_times) / f_times.sum(), 1)},
        "tiers": tiers,
        "example": {"query": report["_query_texts"][0],
                    "hits": [{"id": int(h["id"]), "page": h["attributes"].get("page"),
                              "section": h["attributes"].get("section"), "text": h["attributes"].get("_text", "")}
                             for h in shown if h]},
    }


def _kv_available() -> str | None:
    import importlib.util

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    return None if not missing else f"{' and '.join(missing)} not installed (pip install \"tierstore[kv,hf]\")"


def _tiny_llama():
    """A small randomly initialised byte-level Llama (no trained model ships with tierstore)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=258, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=256, eos_token_id=257, tie_word_embeddings=True)
    config._name_or_path = "tierstore-demo-tiny-llama"
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def _kv_part(report: dict, path: Path, docs, xb: np.ndarray, embedder, questions: list[str], model_dir: str | None,
             say: Callable[[str], None]) -> None:
    import torch

    from ..store.kvcache.hf import load_llama
    from .database import connect
    from .rag import ByteTokenizer, RagPipeline

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if model_dir:
        model = load_llama(model_dir).to(torch.bfloat16)
        model_name = Path(model_dir).name
    else:
        model = _tiny_llama()
        model_name = "tiny random byte-level Llama (6 layers; output text is noise, timing and identity are real)"
    with connect(path / "kv") as db:
        col = db.create_collection("rag", dim=xb.shape[1], metric="cosine")
        col.add(ids=np.arange(len(docs)), vectors=xb, attributes=[{"_text": d.text} for d in docs])
        kv = db.kv_cache(model=model, revision="demo", codec="bf16", chunk_tokens=64)
        rag = RagPipeline(col, kv, model, ByteTokenizer(), embed=embedder, text_field="_text", reuse="prefix")
        rows = []
        for question in questions:
            # warm=True: the first answer computes and stores the retrieved chunks' KV
            got = rag.compare(question, k=3, max_new_tokens=12, repeats=2, warm=True)
            rows.append({"question": question, "prompt_tokens": got["prompt_tokens"],
                         "reused_tokens": got["reused_tokens"], "ttft_no_reuse_s": got["ttft_full_s"],
                         "ttft_reuse_s": got["ttft_reuse_s"], "speedup": got["speedup"],
                         "identical": got["identical"]})
    report["kv"] = {"model": model_name, "codec": "bf16 (lossless)", "questions": rows}


def run_demo(*, docs: int = 2000, queries: int = 100, embedder: str = "auto", memory_fraction: float = 0.3,
             kv: bool = True, model_dir: str | None = None, path: str | None = None,
             say: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Run the demo and return its report (``say`` receives progress lines)."""
    from .corpus import find_corpus
    from .embeddings import load_embedder

    total_started = time.perf_counter()
    corpus = find_corpus(docs + queries)
    documents = corpus.documents
    held = documents[-queries:] if len(documents) > queries + 100 else documents[: max(len(documents) // 10, 1)]
    base = documents[: len(documents) - len(held)] if held is documents[-queries:] else documents
    say(f"corpus: {corpus.description}")
    emb = load_embedder(embedder)
    started = time.perf_counter()
    xb = emb([d.text for d in base])
    xq = emb([d.text for d in held])
    embed_s = time.perf_counter() - started
    say(f"embedder: {emb.name} ({emb.dim}-d), {len(base) + len(held)} paragraphs in {embed_s:.1f} s")
    report: dict[str, Any] = {"corpus": {"kind": corpus.kind, "description": corpus.description},
                              "embedder": {"name": emb.name, "dim": emb.dim, "seconds": round(embed_s, 2)},
                              "_query_texts": [d.text for d in held]}
    with tempfile.TemporaryDirectory(prefix="tierstore-demo-") as tmp:
        root = Path(path) if path else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        _vector_part(report, root, base, xb, xq, memory_fraction, say)
        why_not = "--no-kv given" if not kv else _kv_available()
        if why_not is None:
            say("KV reuse: answering questions with the RAG helper ...")
            _kv_part(report, root, base, xb, emb, [d.text[:120] for d in held[:3]], model_dir, say)
        else:
            report["kv"] = {"skipped": why_not}
    report.pop("_query_texts")
    report["seconds"] = round(time.perf_counter() - total_started, 1)
    return report


def print_report(report: dict) -> None:
    """The demo's report as tables."""
    v = report["vectors"]
    print(f"\ncorpus    {report['corpus']['description']}")
    print(f"embedder  {report['embedder']['name']} ({report['embedder']['dim']}-d, {report['embedder']['seconds']} s)")
    print(f"index     {v['documents']} vectors, {v['lists']} posting lists ({human_bytes(v['list_bytes'])}); "
          f"list cache {human_bytes(v['memory_budget_bytes'])}; resident {human_bytes(v['resident_bytes'])} vs "
          f"{human_bytes(v['raw_vector_bytes'])} of raw vectors")
    print(f"\nsearch ({v['queries']} held-out paragraphs as queries, one per call, k=10)")
    f = v["filter"]
    rows = [{"query": f"unfiltered, nprobe {v['nprobe']} (default)", "recall@10 vs exact": v["recall@10"],
             "qps": v["qps"]},
            {"query": f"unfiltered, nprobe {v['wider']['nprobe']}", "recall@10 vs exact": v["wider"]["recall@10"],
             "qps": v["wider"]["qps"]},
            {"query": f"section = {f['section']!r} ({f['share']:.1%} of rows)", "recall@10 vs exact": f["recall@10"],
             "qps": f["qps"]}]
    print(format_table(rows, ["query", "recall@10 vs exact", "qps"], left=["query"]))
    print(f"\nexample: {shorten(v['example']['query'], 90)!r}")
    for hit in v["example"]["hits"]:
        print(f"  {hit['page']}({hit['section']}): {shorten(hit['text'], 100)}")
    print("\ntiers during the searches")
    tiers = [{"tier": t["tier"], "lookups": t["lookups"], "hits": t["hits"],
              "hit rate": "-" if t["hit_rate"] is None else f"{t['hit_rate']:.1%}", "read": human_bytes(t["read"]),
              "stored": human_bytes(t["stored"]), "budget": human_bytes(t["budget"])} for t in v["tiers"]]
    print(format_table(tiers, ["tier", "lookups", "hits", "hit rate", "read", "stored", "budget"], left=["tier"]))
    kv = report["kv"]
    if "skipped" in kv:
        print(f"\nKV reuse: skipped ({kv['skipped']})")
    else:
        print(f"\nRAG with chunk KV reuse ({kv['model']}; codec {kv['codec']})")
        rows = [{"question": shorten(q["question"], 40), "prompt tokens": q["prompt_tokens"],
                 "reused": q["reused_tokens"], "TTFT no reuse ms": f"{q['ttft_no_reuse_s'] * 1e3:.1f}",
                 "TTFT reuse ms": f"{q['ttft_reuse_s'] * 1e3:.1f}", "speedup": f"{q['speedup']:.1f}x",
                 "identical": "yes" if q["identical"] else "NO"} for q in kv["questions"]]
        print(format_table(rows, list(rows[0]), left=["question"]))
    print(f"\ndone in {report['seconds']} s")
