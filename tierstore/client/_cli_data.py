"""``tierstore ingest``, ``search``, ``stats`` and ``bench``: the data commands of the CLI.

A collection filled by ``ingest`` remembers the embedder it was embedded with (a small
JSON value under ``collections/<name>/cli/embedder.json``, dropped with the
collection), so ``search`` embeds queries the same way unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

from ..errors import ConfigError, InvalidArgument, NotFound
from ._tables import format_table, human_bytes, shorten

__all__ = ["add_data_commands", "open_database", "DEFAULT_DB"]

DEFAULT_DB = os.environ.get("TIERSTORE_DB", "./tierstore-data")
TEXT_FIELD = "_text"
_INGEST_BATCH = 256


def _add_db_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=DEFAULT_DB,
                        help="database: a directory or s3://bucket/prefix (default $TIERSTORE_DB or ./tierstore-data)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint for an s3:// database (e.g. MinIO)")
    parser.add_argument("--cache-dir", help="local directory caching an s3:// database's objects")


def open_database(args: argparse.Namespace, *, must_exist: bool = False):
    """The database the arguments name (checked: a missing local one is an error when ``must_exist``)."""
    from .database import connect

    if must_exist and "://" not in args.db and not os.path.isdir(args.db):
        raise NotFound(f"no database at {args.db!r}; create one with `tierstore ingest --db {args.db} FILE...` "
                       "or pass --db")
    options: dict[str, Any] = {}
    if args.endpoint_url:
        options["endpoint_url"] = args.endpoint_url
    if args.cache_dir:
        options["cache_dir"] = args.cache_dir
    return connect(args.db, **options)


def _embedder_key(collection: str) -> str:
    return f"collections/{collection}/cli/embedder.json"


def _recorded_embedder(db, collection: str) -> str | None:
    try:
        return json.loads(db.tier.get(_embedder_key(collection)))["embedder"]
    except NotFound:
        return None


def _progress(total: int, label: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="doc", disable=quiet or not sys.stderr.isatty(), leave=False)


def _document_id(doc, number: int) -> int:
    from .integrations._common import string_id_to_int

    given = doc.attributes.get("id")
    if isinstance(given, int) and not isinstance(given, bool) and given >= 0:
        return given
    if isinstance(given, str):
        return string_id_to_int(given, "document ids")
    return string_id_to_int(f"{doc.attributes.get('source', '')}#{number}")


# --------------------------------------------------------------------------- ingest
def _cmd_ingest(args: argparse.Namespace) -> int:
    from .corpus import read_documents
    from .embeddings import load_embedder
    from .integrations._common import infer_schema

    from ._names import check_name

    check_name(args.collection)
    documents = list(read_documents(args.paths, text_field=args.text_field))
    if not documents:
        raise InvalidArgument(f"no text found in {args.paths}; give .txt/.md files or JSONL with a "
                              f"{args.text_field!r} field")
    started = time.perf_counter()
    with open_database(args) as db:
        exists = args.collection in db.list_collections()
        recorded = _recorded_embedder(db, args.collection) if exists else None
        spec = args.embedder or recorded or "auto"
        embedder = load_embedder(spec)
        if recorded is not None and embedder.spec != recorded:
            raise ConfigError(f"collection {args.collection!r} was embedded with {recorded!r}, not {embedder.spec!r}; "
                              "ingest with the same --embedder or into another --collection")
        metadata = [{k: v for k, v in d.attributes.items() if k != "id"} for d in documents]
        if exists:
            col = db.collection(args.collection)
            schema = col.settings.get("attributes") or {}
        else:
            schema = infer_schema(metadata)
            col = db.create_collection(args.collection, dim=embedder.dim, metric="cosine", attributes=schema)
            db.tier.put(_embedder_key(args.collection), json.dumps({"embedder": embedder.spec}).encode())
        if col.dim != embedder.dim:
            raise ConfigError(f"collection {args.collection!r} holds {col.dim}-d vectors but {embedder.name} makes "
                              f"{embedder.dim}-d ones; use the collection's embedder or another --collection")
        ids = np.array([_document_id(d, i) for i, d in enumerate(documents)], np.int64)
        rows = [{**{k: v for k, v in m.items() if k in schema}, TEXT_FIELD: d.text}
                for m, d in zip(metadata, documents)]
        with _progress(len(documents), "embedding", args.json) as bar:
            for start in range(0, len(documents), args.batch_size):
                end = start + args.batch_size
                vectors = embedder([d.text for d in documents[start:end]])
                col.add(ids=ids[start:end], vectors=vectors, attributes=rows[start:end])
                bar.update(len(vectors))
        built = None
        if not args.no_index and col.count() >= 256:
            built = col.build_index(progress=not args.json and sys.stderr.isatty())
        report = {"collection": args.collection, "documents": len(documents), "count": col.count(),
                  "embedder": embedder.name, "dim": embedder.dim, "attributes": schema,
                  "index": None if built is None else {k: built[k] for k in ("lists",) if k in built},
                  "seconds": round(time.perf_counter() - started, 2)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"ingested {report['documents']} documents into {args.collection!r} ({report['count']} vectors, "
              f"{embedder.name}, {report['seconds']} s); attributes: {schema or 'none'}")
    return 0


# --------------------------------------------------------------------------- search
def _parse_filter(text: str | None):
    if text is None:
        return None
    from ..errors import FilterError

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FilterError(f"--filter is not JSON ({exc.msg}); e.g. --filter '{{\"section\": \"8\"}}'") from None
    return value


def _cmd_search(args: argparse.Namespace) -> int:
    from .embeddings import load_embedder

    if args.k < 1:
        raise InvalidArgument(f"-k must be >= 1, got {args.k}")
    filter_spec = _parse_filter(args.filter)
    with open_database(args, must_exist=True) as db:
        col = db.collection(args.collection)
        embedder = load_embedder(args.embedder or _recorded_embedder(db, args.collection) or "auto")
        if col.dim != embedder.dim:
            raise ConfigError(f"collection {args.collection!r} holds {col.dim}-d vectors but {embedder.name} makes "
                              f"{embedder.dim}-d ones; pass the --embedder it was ingested with")
        started = time.perf_counter()
        res = col.search(embedder([args.query])[0], k=args.k, filter=filter_spec)
        elapsed = time.perf_counter() - started
        found = [(int(i), float(d)) for i, d in zip(res.ids[0], res.distances[0]) if i >= 0]
        stored = col.get([i for i, _ in found], include_vectors=False) if found else []
    hits = []
    for rank, ((doc_id, distance), item) in enumerate(zip(found, stored), 1):
        attributes = dict((item or {}).get("attributes") or {})
        text = attributes.pop(TEXT_FIELD, "")
        hits.append({"rank": rank, "id": doc_id, "score": round(1.0 - distance, 4), "attributes": attributes,
                     "text": text})
    if args.json:
        print(json.dumps({"query": args.query, "embedder": embedder.name, "seconds": round(elapsed, 5),
                          "plan": res.stats.get("plan"), "hits": hits}, indent=2))
        return 0
    rows = [{"rank": h["rank"], "score": f"{h['score']:.3f}", "id": h["id"],
             "attributes": shorten(" ".join(f"{k}={v}" for k, v in h["attributes"].items()), 28),
             "text": shorten(h["text"], 70)} for h in hits]
    print(format_table(rows, ["rank", "score", "id", "attributes", "text"], left=["attributes", "text"]))
    print(f"{len(hits)} hits in {elapsed * 1000:.1f} ms ({embedder.name})")
    return 0


# --------------------------------------------------------------------------- stats
def _cmd_stats(args: argparse.Namespace) -> int:
    with open_database(args, must_exist=True) as db:
        names = [args.collection] if args.collection else db.list_collections()
        stats = [db.collection(name).stats() for name in names]
    if args.json:
        print(json.dumps(stats, indent=2, default=str))
        return 0
    if not stats:
        print(f"no collections in {args.db!r}")
        return 0
    rows = [{"collection": s["name"], "vectors": s["count"], "dim": s["dim"], "metric": s["metric"],
             "lists": s["index"]["lists"] if s["index"] else "-",
             "codes": s["index"]["quantizer"] if s["index"] else "-", "unindexed": s["unindexed_rows"],
             "resident": human_bytes(s["resident_bytes"]), "raw vectors": human_bytes(s["raw_vector_bytes"])}
            for s in stats]
    print(format_table(rows, list(rows[0]), left=["collection"]))
    return 0


# --------------------------------------------------------------------------- bench
def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench_quick import run_quick_bench

    report = run_quick_bench(n=args.n, dim=args.dim, queries=args.queries, k=args.k, nprobe=args.nprobe,
                             seed=args.seed)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['n']} clustered vectors x {report['dim']}-d, {report['queries']} queries one per call, k={args.k}, "
          f"one thread")
    print(format_table(report["systems"], ["system", "recall@10", "qps", "p50_us", "p99_us"], left=["system"]))
    print("full benchmarks: bench/ann.py, bench/filters.py, bench/tenants.py, bench/kv.py in the source tree")
    return 0


def add_data_commands(sub) -> None:
    """Add ``ingest``, ``search``, ``stats`` and ``bench`` to the CLI's subparsers."""
    ingest = sub.add_parser("ingest", help="embed text or JSONL files into a collection",
                            description="Read text files (one document per paragraph) or JSONL files (one object "
                                        "per line with a text field; other scalar fields become filterable "
                                        "attributes), embed them and add them to a collection (created if needed, "
                                        "cosine metric), then build its index. Re-ingesting a file replaces its "
                                        "documents (ids come from file name and paragraph number, or an 'id' field).")
    ingest.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (.txt, .md, .jsonl)")
    _add_db_options(ingest)
    ingest.add_argument("--collection", default="docs", help="collection name (default docs)")
    ingest.add_argument("--embedder", help="auto (MiniLM when installed, else hashing), minilm, hashing, or a "
                                           "sentence-transformers model path (default: the collection's, else auto)")
    ingest.add_argument("--text-field", default="text", help="JSONL field holding the text (default text)")
    ingest.add_argument("--batch-size", type=int, default=_INGEST_BATCH, help="documents embedded per batch")
    ingest.add_argument("--no-index", action="store_true", help="do not build the index after adding")
    ingest.add_argument("--json", action="store_true", help="print a JSON report")
    ingest.set_defaults(handler=_cmd_ingest)

    search = sub.add_parser("search", help="search a collection with a text query",
                            description="Embed the query with the collection's embedder and print the nearest "
                                        "documents, optionally filtered, e.g. --filter '{\"section\": \"8\"}'.")
    search.add_argument("query", help="the text to search for")
    _add_db_options(search)
    search.add_argument("--collection", default="docs", help="collection name (default docs)")
    search.add_argument("-k", type=int, default=5, help="number of results (default 5)")
    search.add_argument("--filter", help="a JSON filter in tierstore's filter language (see docs/filters.md)")
    search.add_argument("--embedder", help="override the embedder recorded at ingest")
    search.add_argument("--json", action="store_true", help="print JSON")
    search.set_defaults(handler=_cmd_search)

    stats = sub.add_parser("stats", help="show the collections of a database",
                           description="Counts, index shape and memory of each collection (or one).")
    _add_db_options(stats)
    stats.add_argument("--collection", help="only this collection")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(handler=_cmd_stats)

    bench = sub.add_parser("bench", help="a quick search benchmark against faiss on this machine",
                           description="Build a collection of clustered random vectors in a temporary directory and "
                                       "measure recall@k against exact search and single-query QPS, next to faiss "
                                       "IVF-Flat with the same lists and probes, in the same run.")
    bench.add_argument("--n", type=int, default=20_000, help="vectors (default 20000)")
    bench.add_argument("--dim", type=int, default=64, help="dimensions (default 64)")
    bench.add_argument("--queries", type=int, default=500, help="queries (default 500)")
    bench.add_argument("-k", type=int, default=10, help="k (default 10)")
    bench.add_argument("--nprobe", type=int, default=16, help="lists probed per query (default 16)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", action="store_true", help="print JSON")
    bench.set_defaults(handler=_cmd_bench)
