"""The ``tierstore`` command line.

``demo`` (the first command after install), ``ingest``, ``search``, ``stats``,
``bench`` and ``serverless``. Every command has ``--help``; errors print one line
saying what to do and exit non-zero (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main", "build_parser"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import print_report, run_demo

    say = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
    report = run_demo(docs=args.docs, queries=args.queries, embedder=args.embedder, kv=not args.no_kv,
                      model_dir=args.model, path=args.path, say=say)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ._cli_data import add_data_commands

    parser = argparse.ArgumentParser(prog="tierstore", description="Storage-tiered vector search and KV-cache store.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="build, search and measure a tiered collection of real text, and KV reuse",
                          description="Find a real text corpus on this machine (manual pages, else Python's "
                                      "documentation), embed it, build a collection in a memory + LMDB tier stack, "
                                      "search it with held-out paragraphs (recall against exact search, a filtered "
                                      "search, tier hit rates), and, when torch and transformers are installed, "
                                      "compare RAG time to first token with and without chunk KV reuse.")
    demo.add_argument("--docs", type=int, default=2000, help="paragraphs to index (default 2000)")
    demo.add_argument("--queries", type=int, default=100, help="held-out paragraphs used as queries (default 100)")
    demo.add_argument("--embedder", default="auto", help="auto (MiniLM when installed, else hashing), minilm, "
                                                          "hashing, or a sentence-transformers model path")
    demo.add_argument("--model", help="a local transformers Llama directory for the KV part (default: a tiny "
                                      "random byte-level Llama)")
    demo.add_argument("--no-kv", action="store_true", help="skip the KV-reuse part")
    demo.add_argument("--path", help="keep the demo's data in this directory (default: a temporary one)")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    demo.set_defaults(handler=_cmd_demo)
    add_data_commands(sub)
    from ..serverless.cli import register as register_serverless

    register_serverless(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 error, 2 bad usage, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    for name in ("docs", "queries", "batch_size", "n", "dim"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            print(f"tierstore: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    from ..errors import TierstoreError

    try:
        return args.handler(args)
    except TierstoreError as exc:
        if args.debug:
            raise
        print(f"tierstore: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tierstore: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except OSError as exc:  # a file or directory the user named
        if args.debug:
            raise
        print(f"tierstore: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
