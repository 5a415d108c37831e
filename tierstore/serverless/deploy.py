"""Deployment: the Lambda zip and a SAM template for the search worker.

:func:`build_package` writes a zip holding tierstore (without its test helpers) and the
distributions the handler imports: numpy, faiss-cpu, xxhash, tqdm and packaging (faiss
reads its version with it). boto3/botocore are left out by default: the Lambda Python
runtime provides them (``include_boto3=True`` bundles the local ones). Two ways to get the
dependencies:

* ``mode="copy"``: the installed distributions of this environment, file by file from
  their ``RECORD`` (fast; right when this machine is Linux x86-64 with the runtime's
  Python version, as CI and the tests are);
* ``mode="pip"``: ``pip install --platform manylinux2014_x86_64 --only-binary=:all:
  --python-version X --target ...``: wheels for Lambda's platform, whatever this machine is.

The unzipped size is checked against Lambda's 250 MB limit
(:class:`~tierstore.errors.PackageTooLarge`, naming the largest parts).

:func:`build_template` returns a SAM template (JSON, which is YAML): the function with
its memory, timeout, reserved concurrency and environment, and a least-privilege role:
``s3:GetObject`` on the collection's prefix only, ``lambda:InvokeFunction`` on itself.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, InvalidArgument, PackageTooLarge

__all__ = ["DEPENDENCIES", "UNZIPPED_LIMIT", "PackageInfo", "build_package", "pip_command", "build_template",
           "HANDLER"]

DEPENDENCIES = ("numpy", "faiss-cpu", "xxhash", "tqdm", "packaging")
_BOTO = ("boto3", "botocore", "s3transfer", "jmespath", "python-dateutil", "six", "urllib3")
UNZIPPED_LIMIT = 262_144_000  # 250 MB, Lambda's limit for a function's code and layers, unzipped
HANDLER = "tierstore.serverless.handler.lambda_handler"
_SKIP_PARTS = ("__pycache__",)


@dataclass(frozen=True)
class PackageInfo:
    """What :func:`build_package` wrote."""

    path: str
    files: int
    unzipped_bytes: int
    zipped_bytes: int
    largest: list[tuple[str, int]]


def _tierstore_files() -> list[tuple[Path, str]]:
    root = Path(__file__).resolve().parents[1]  # the tierstore package
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root.parent)
        if not path.is_file() or any(part in _SKIP_PARTS for part in rel.parts) or path.suffix == ".pyc":
            continue
        if rel.parts[1:2] == ("testing",):
            continue
        out.append((path, rel.as_posix()))
    return out


def _skipped(parts: tuple[str, ...]) -> bool:
    """Caches, and the test suites that numpy and others ship (dead weight in a Lambda zip)."""
    return any(part in _SKIP_PARTS for part in parts) or "tests" in parts[1:]


def _distribution_files(name: str) -> list[tuple[Path, str]]:
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ConfigError(f"{name} is not installed here; install it or use mode='pip'") from exc
    out = []
    for entry in dist.files or []:
        rel = entry.as_posix()
        if rel.startswith("..") or _skipped(tuple(entry.parts)) or rel.endswith(".pyc"):
            continue  # console scripts outside site-packages, caches
        path = Path(dist.locate_file(entry))
        if path.is_file():
            out.append((path, rel))
    return out


def pip_command(target: str, *, packages: tuple[str, ...] = DEPENDENCIES, python_version: str | None = None,
                platform: str = "manylinux2014_x86_64") -> list[str]:
    """The ``pip install`` that fetches Lambda-platform wheels into ``target``."""
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    return [sys.executable, "-m", "pip", "install", "--quiet", "--platform", platform, "--only-binary=:all:",
            "--implementation", "cp", "--python-version", version, "--target", target, *packages]


def _files_under(root: str) -> list[tuple[Path, str]]:
    base = Path(root)
    return [(p, p.relative_to(base).as_posix()) for p in sorted(base.rglob("*"))
            if p.is_file() and not _skipped(p.relative_to(base).parts)
            and not p.relative_to(base).parts[0] == "bin"]


def build_package(output: str | os.PathLike, *, mode: str = "copy", include_boto3: bool = False,
                  python_version: str | None = None, platform: str = "manylinux2014_x86_64",
                  limit: int = UNZIPPED_LIMIT, compresslevel: int = 6) -> PackageInfo:
    """Write the Lambda zip to ``output`` (see the module docstring); returns what it holds.

    ``limit``: the unzipped bytes allowed (Lambda's 250 MB); ``compresslevel``: deflate
    level 1 (fast) to 9 (smallest).
    """
    if mode not in ("copy", "pip"):
        raise InvalidArgument(f"mode must be 'copy' or 'pip', got {mode!r}")
    packages = DEPENDENCIES + (_BOTO if include_boto3 else ())
    files = _tierstore_files()
    with tempfile.TemporaryDirectory(prefix="tierstore-lambda-") as target:
        if mode == "copy":
            for name in packages:
                files.extend(_distribution_files(name))
        else:
            command = pip_command(target, packages=packages, python_version=python_version, platform=platform)
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise ConfigError(f"pip could not fetch Lambda wheels ({' '.join(command[3:])}): "
                                  f"{done.stderr.strip()[-800:]}")
            files.extend(_files_under(target))
        seen: dict[str, Path] = {}
        for path, rel in files:
            seen.setdefault(rel, path)
        sizes = {rel: path.stat().st_size for rel, path in seen.items()}
        total = sum(sizes.values())
        groups: dict[str, int] = {}
        for rel, size in sizes.items():
            groups[rel.split("/")[0]] = groups.get(rel.split("/")[0], 0) + size
        largest = sorted(groups.items(), key=lambda item: -item[1])[:5]
        if total > limit:
            parts = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in largest)
            raise PackageTooLarge(f"the Lambda package would be {total / 1e6:.1f} MB unzipped, over the "
                                  f"{limit / 1e6:.1f} MB limit (largest: {parts}); leave out optional parts or "
                                  "use a container image")
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(output.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=compresslevel) as archive:
            for rel in sorted(seen):
                info = zipfile.ZipInfo(rel, date_time=(2020, 1, 1, 0, 0, 0))  # reproducible archives
                info.external_attr = (0o755 if os.access(seen[rel], os.X_OK) else 0o644) << 16
                with open(seen[rel], "rb") as fh:
                    archive.writestr(info, fh.read(), compress_type=zipfile.ZIP_DEFLATED,
                                     compresslevel=compresslevel)
        os.replace(tmp, output)
    return PackageInfo(str(output), len(seen), total, output.stat().st_size, largest)


def build_template(*, bucket: str, prefix: str = "", function_name: str = "tierstore-search",
                   code_uri: str = "tierstore-lambda.zip", memory_mb: int = 2048, timeout_s: int = 30,
                   reserved_concurrency: int | None = 256, runtime: str = "python3.11",
                   ephemeral_storage_mb: int = 2048) -> dict:
    """A SAM template for the search worker of the database at ``s3://bucket/prefix``.

    The role may read objects under ``prefix`` only and invoke this function only (for
    its sub-trees). ``reserved_concurrency`` caps (and reserves) concurrent workers:
    size it to at least the tree's node count times the concurrent queries.
    """
    if not bucket:
        raise InvalidArgument("bucket must be given: the worker may read only its collection's bucket and prefix")
    for name, value, low, high in (("memory_mb", memory_mb, 128, 10_240), ("timeout_s", timeout_s, 1, 900),
                                   ("ephemeral_storage_mb", ephemeral_storage_mb, 512, 10_240)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidArgument(f"{name} must be an int from {low} to {high}, got {value!r}")
    prefix = prefix.strip("/")
    objects = f"arn:${{AWS::Partition}}:s3:::{bucket}/{prefix + '/' if prefix else ''}*"
    self_arn = f"arn:${{AWS::Partition}}:lambda:${{AWS::Region}}:${{AWS::AccountId}}:function:{function_name}"
    properties: dict = {
        "FunctionName": function_name,
        "CodeUri": code_uri,
        "Handler": HANDLER,
        "Runtime": runtime,
        "Architectures": ["x86_64"],
        "MemorySize": memory_mb,
        "Timeout": timeout_s,
        "EphemeralStorage": {"Size": ephemeral_storage_mb},
        "Environment": {"Variables": {"TIERSTORE_BUCKET": bucket, "TIERSTORE_PREFIX": prefix,
                                      "TIERSTORE_CACHE_DIR": "/tmp/tierstore", "OMP_NUM_THREADS": "1"}},
        "Policies": [{"Version": "2012-10-17", "Statement": [
            {"Sid": "ReadCollectionObjects", "Effect": "Allow", "Action": ["s3:GetObject"],
             "Resource": {"Fn::Sub": objects}},
            {"Sid": "InvokeSubtrees", "Effect": "Allow", "Action": ["lambda:InvokeFunction"],
             "Resource": {"Fn::Sub": self_arn}},
        ]}],
    }
    if reserved_concurrency is not None:
        if isinstance(reserved_concurrency, bool) or not isinstance(reserved_concurrency, int) \
                or reserved_concurrency < 1:
            raise InvalidArgument(f"reserved_concurrency must be None or an int >= 1, got {reserved_concurrency!r}")
        properties["ReservedConcurrentExecutions"] = reserved_concurrency
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Transform": "AWS::Serverless-2016-10-31",
        "Description": f"tierstore serverless search workers for s3://{bucket}/{prefix}",
        "Resources": {"SearchWorker": {"Type": "AWS::Serverless::Function", "Properties": properties}},
        "Outputs": {"FunctionArn": {"Description": "the worker function (give its name to LambdaInvoker)",
                                    "Value": {"Fn::GetAtt": ["SearchWorker", "Arn"]}}},
    }
