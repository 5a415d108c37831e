"""Deployment: the Lambda zip, the SAM template (cfn-lint), the CLI, and a handler without torch."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import zipfile

import pytest

from tierstore.errors import InvalidArgument, PackageTooLarge
from tierstore.serverless.cli import register
from tierstore.serverless.deploy import HANDLER, UNZIPPED_LIMIT, build_package, build_template, pip_command

NO_TORCH = """
import sys
for name in ("torch", "transformers", "lmdb", "langchain_core", "llama_index"):
    sys.modules[name] = None  # any import of these now fails
import tierstore.serverless.handler as handler
assert callable(handler.lambda_handler)
print(sorted({m.split('.')[0] for m in sys.modules if sys.modules[m] is not None}))
"""


def test_the_handler_imports_neither_torch_nor_transformers():
    done = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout.strip().replace("'", '"')))
    assert not loaded & {"torch", "transformers", "boto3", "botocore", "lmdb"}  # boto3 only once it invokes
    assert {"numpy", "faiss", "xxhash", "tierstore"} <= loaded


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return build_package(tmp_path_factory.mktemp("zip") / "tierstore-lambda.zip", compresslevel=1)


def test_the_zip_holds_the_handler_and_its_dependencies_under_the_limit(package):
    assert package.unzipped_bytes < UNZIPPED_LIMIT
    with zipfile.ZipFile(package.path) as archive:
        names = set(archive.namelist())
        assert sum(info.file_size for info in archive.infolist()) == package.unzipped_bytes
    module, _, function = HANDLER.rpartition(".")
    assert module.replace(".", "/") + ".py" in names and function == "lambda_handler"
    for needed in ("numpy/__init__.py", "faiss/__init__.py", "xxhash/__init__.py", "tqdm/__init__.py",
                   "packaging/version.py", "tierstore/index/spann.py", "tierstore/tiers/s3.py"):
        assert needed in names
    assert not any(name.startswith(("torch/", "transformers/", "tierstore/testing/", "boto3/")) for name in names)
    assert not any("__pycache__" in name or "/tests/" in name for name in names)


def test_the_zip_runs_the_handler_with_only_its_own_files(package, tmp_path):
    with zipfile.ZipFile(package.path) as archive:
        archive.extractall(tmp_path)
    script = ("import sys; sys.path[:0] = [sys.argv[1]]; sys.modules['torch'] = None\n"
              "import tierstore.serverless.handler, numpy, faiss\n"
              "assert tierstore.serverless.handler.__file__.startswith(sys.argv[1])\n"
              "assert numpy.__file__.startswith(sys.argv[1]) and faiss.__file__.startswith(sys.argv[1])\n")
    # -S: no site-packages at all, only the zip's files and the standard library
    done = subprocess.run([sys.executable, "-S", "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_an_oversized_package_is_a_clear_error(tmp_path):
    with pytest.raises(PackageTooLarge, match="limit.*largest"):
        build_package(tmp_path / "big.zip", limit=10_000_000, compresslevel=1)
    assert not (tmp_path / "big.zip").exists()


def test_pip_mode_asks_for_lambda_wheels():
    command = pip_command("/tmp/x", python_version="3.12")
    assert command[1:4] == ["-m", "pip", "install"]
    assert "--only-binary=:all:" in command and "manylinux2014_x86_64" in command
    assert command[command.index("--python-version") + 1] == "3.12" and "faiss-cpu" in command


def cfn_lint(path) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "cfn-lint")
    return subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=180)


def test_the_template_passes_cfn_lint_with_least_privilege(tmp_path):
    template = build_template(bucket="my-bucket", prefix="db/prod", memory_mb=3008, timeout_s=60,
                              reserved_concurrency=300)
    path = tmp_path / "template.json"
    path.write_text(json.dumps(template, indent=2))
    done = cfn_lint(path)
    assert done.returncode == 0, done.stdout + done.stderr
    props = template["Resources"]["SearchWorker"]["Properties"]
    assert props["MemorySize"] == 3008 and props["Timeout"] == 60 and props["ReservedConcurrentExecutions"] == 300
    assert props["Handler"] == HANDLER
    statements = props["Policies"][0]["Statement"]
    assert {tuple(s["Action"]) for s in statements} == {("s3:GetObject",), ("lambda:InvokeFunction",)}
    resources = [s["Resource"]["Fn::Sub"] for s in statements]
    assert resources[0].endswith(":s3:::my-bucket/db/prod/*")
    assert resources[1].endswith(":function:tierstore-search")
    assert props["Environment"]["Variables"]["TIERSTORE_PREFIX"] == "db/prod"
    with pytest.raises(InvalidArgument, match="memory_mb"):
        build_template(bucket="b", memory_mb=64)


def test_cli_commands(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="tierstore")
    register(parser.add_subparsers(dest="command", required=True))
    for argv in (["serverless", "--help"], ["serverless", "package", "--help"], ["serverless", "template", "--help"]):
        with pytest.raises(SystemExit) as done:
            parser.parse_args(argv)
        assert done.value.code == 0
    assert "250 MB" in capsys.readouterr().out
    out = tmp_path / "t.json"
    args = parser.parse_args(["serverless", "template", "--bucket", "bkt", "--prefix", "p", "--output", str(out)])
    assert args.handler(args) == 0
    assert json.loads(out.read_text())["Resources"]["SearchWorker"]["Properties"]["Environment"]["Variables"][
        "TIERSTORE_BUCKET"] == "bkt"
