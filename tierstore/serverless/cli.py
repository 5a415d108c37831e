"""``tierstore serverless package`` and ``tierstore serverless template``.

:func:`register` adds the ``serverless`` command to the ``tierstore`` CLI's sub-parsers;
each sub-command sets ``handler`` (a function of the parsed arguments returning the
exit code), as the other commands do.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["register"]


def _cmd_package(args: argparse.Namespace) -> int:
    from .deploy import build_package

    info = build_package(args.output, mode=args.mode, include_boto3=args.include_boto3,
                         python_version=args.python_version, platform=args.platform)
    parts = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in info.largest)
    print(f"wrote {info.path}: {info.files} files, {info.unzipped_bytes / 1e6:.1f} MB unzipped "
          f"({info.zipped_bytes / 1e6:.1f} MB zipped; limit 250 MB); largest: {parts}")
    return 0


def _cmd_template(args: argparse.Namespace) -> int:
    from .deploy import build_template

    template = build_template(bucket=args.bucket, prefix=args.prefix, function_name=args.function_name,
                              code_uri=args.code_uri, memory_mb=args.memory, timeout_s=args.timeout,
                              reserved_concurrency=args.reserved_concurrency or None, runtime=args.runtime)
    text = json.dumps(template, indent=2) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"wrote {args.output}; deploy with: sam deploy --template-file {args.output} --guided")
    return 0


def register(subparsers) -> None:
    """Add ``serverless package`` and ``serverless template`` to the CLI's sub-parsers."""
    serverless = subparsers.add_parser(
        "serverless", help="package and describe the Lambda search workers",
        description="Deploy serverless fan-out search: build the Lambda zip and a SAM template whose workers "
                    "search a collection stored in S3 (see docs/serverless.md).")
    sub = serverless.add_subparsers(dest="serverless_command", required=True, metavar="SUBCOMMAND")
    package = sub.add_parser(
        "package", help="build the Lambda deployment zip (no torch; checks the 250 MB limit)",
        description="Write a zip with tierstore and the handler's dependencies (numpy, faiss-cpu, xxhash, tqdm, "
                    "packaging; boto3 comes with the Lambda runtime). Fails when the unzipped size passes "
                    "Lambda's 250 MB limit.")
    package.add_argument("--output", "-o", default="tierstore-lambda.zip", help="zip to write "
                                                                               "(default tierstore-lambda.zip)")
    package.add_argument("--mode", choices=("copy", "pip"), default="pip",
                         help="pip: download manylinux wheels for Lambda (default); copy: this environment's "
                              "installed packages (Linux x86-64 with the runtime's Python only)")
    package.add_argument("--include-boto3", action="store_true", help="bundle boto3/botocore instead of using "
                                                                       "the runtime's")
    package.add_argument("--python-version", default=None, help="the runtime's Python, e.g. 3.11 "
                                                                "(default: this interpreter's)")
    package.add_argument("--platform", default="manylinux2014_x86_64", help="wheel platform for --mode pip")
    package.set_defaults(handler=_cmd_package)
    template = sub.add_parser(
        "template", help="write a SAM template for the workers (least-privilege IAM)",
        description="Write a SAM/CloudFormation template: the worker function (memory, timeout, reserved "
                    "concurrency) with a role that may only read the collection's S3 prefix and invoke itself.")
    template.add_argument("--bucket", required=True, help="the database's S3 bucket")
    template.add_argument("--prefix", default="", help="the database's prefix in the bucket")
    template.add_argument("--function-name", default="tierstore-search", help="function name "
                                                                              "(default tierstore-search)")
    template.add_argument("--code-uri", default="tierstore-lambda.zip", help="the zip from 'serverless package'")
    template.add_argument("--memory", type=int, default=2048, help="memory in MB (default 2048)")
    template.add_argument("--timeout", type=int, default=30, help="timeout in seconds (default 30)")
    template.add_argument("--reserved-concurrency", type=int, default=256,
                          help="reserved concurrent executions (default 256; 0 for none)")
    template.add_argument("--runtime", default="python3.11", help="Lambda runtime (default python3.11)")
    template.add_argument("--output", "-o", default="-", help="file to write (default: stdout)")
    template.set_defaults(handler=_cmd_template)
