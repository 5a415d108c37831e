"""Crash consistency: a writer killed with SIGKILL at random moments, locally and on S3.

After every kill the store opens; every acknowledged write is present, exact and
searchable; the write in flight is all there or not there at all (a batch of vectors is
never half-visible, a KV chunk never reads back corrupt); deletes likewise. The store is
reused across kills, so recovery after recovery is exercised too. CI runs a quick pass (12
kills locally, 8 on S3: 20); ``TIERSTORE_RELIABILITY=full`` runs 24 + 16, and
``TIERSTORE_CRASH_TRIALS=N`` sets the local count (S3 gets two thirds of it).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from . import crash_child as child  # noqa: E402
from ._report import REPORT  # noqa: E402

SCRIPT = Path(child.__file__)
TRIALS = int(os.environ.get("TIERSTORE_CRASH_TRIALS",
                            "24" if os.environ.get("TIERSTORE_RELIABILITY") == "full" else "12"))


@dataclass
class Expected:
    """What the acknowledged history says the store must hold."""

    present: set[int] = field(default_factory=set)   # batches surely there
    absent: set[int] = field(default_factory=set)    # batches surely gone (deleted)
    maybe_add: set[int] = field(default_factory=set)  # in flight at a kill: all or nothing
    maybe_delete: set[int] = field(default_factory=set)
    kv: set[int] = field(default_factory=set)
    maybe_kv: set[int] = field(default_factory=set)
    next_batch: int = 0
    kills: int = 0
    acked_writes: int = 0


def run_and_kill(uri: str, first: int, env: dict, rng: random.Random) -> list[list[str]]:
    with tempfile.TemporaryFile("w+") as errors:  # faiss warns on stderr; a pipe could fill and stall it
        with subprocess.Popen([sys.executable, str(SCRIPT), uri, str(first)], stdout=subprocess.PIPE,
                              stderr=errors, text=True, env=env, cwd=SCRIPT.parent) as proc:  # closes the pipe
            assert proc.stdout is not None
            line = proc.stdout.readline()  # blocks until the child has opened the store
            if not line.startswith("ready"):
                proc.kill()
                errors.seek(0)
                raise AssertionError(f"child did not start: {line!r} {errors.read()[-2000:]}")
            return _kill_later(proc, rng)


def _kill_later(proc: subprocess.Popen, rng: random.Random) -> list[list[str]]:
    time.sleep(rng.uniform(0.05, 3.0))
    proc.send_signal(signal.SIGKILL)
    # Read through the same buffered reader as the "ready" line: its read-ahead may already
    # hold the first events (communicate() would read the raw pipe and lose them).
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return [line.split() for line in out.splitlines() if line.strip()]


def record(events: list[list[str]], state: Expected) -> None:
    started: dict[tuple[str, int], bool] = {}
    for word, kind, number in events:
        batch = int(number)
        if word == "start":
            started[(kind, batch)] = True
            if kind == "add":
                state.next_batch = max(state.next_batch, batch + 1)
            continue
        started.pop((kind, batch), None)
        state.acked_writes += 1
        if kind == "add":
            state.present.add(batch)
        elif kind == "delete":
            state.present.discard(batch)
            state.absent.add(batch)
        elif kind == "kv":
            state.kv.add(batch)
    for kind, batch in started:  # the call in flight when the kill came
        if kind == "add":
            state.maybe_add.add(batch)
        elif kind == "delete":
            state.present.discard(batch)
            state.maybe_delete.add(batch)
        elif kind == "kv":
            state.maybe_kv.add(batch)
    state.kills += 1


def verify(uri: str, state: Expected) -> None:
    """Open the store after a kill and check it against the acknowledged history."""
    db, col, kv = child.open_store(uri)
    try:
        def found(batch: int) -> bool:
            got = col.get(child.batch_ids(batch))
            hits = [g for g in got if g is not None]
            assert len(hits) in (0, len(got)), f"batch {batch} is half visible: {len(hits)} of {len(got)} rows"
            if hits:
                vectors = np.stack([g["vector"] for g in hits])
                assert np.array_equal(vectors, child.batch_vectors(batch)), f"batch {batch} came back different"
                assert all(g["attributes"] == {"batch": batch} for g in hits)
            return bool(hits)

        for batch in sorted(state.present):
            assert found(batch), f"acknowledged batch {batch} is missing after kill {state.kills}"
        for batch in sorted(state.absent):
            assert not found(batch), f"acknowledged delete of batch {batch} undone after kill {state.kills}"
        for batch in sorted(state.maybe_add | state.maybe_delete):
            (state.present.add if found(batch) else state.absent.add)(batch)
        state.maybe_add.clear()
        state.maybe_delete.clear()
        assert col.count() == len(state.present) * child.BATCH
        sample = sorted(state.present)[-12:]
        if sample:
            queries = np.stack([child.batch_vectors(b)[0] for b in sample])
            res = col.search(queries, k=1, nprobe=64)
            assert res.ids[:, 0].tolist() == [int(child.batch_ids(b)[0]) for b in sample]
        for batch in sorted(state.kv | state.maybe_kv):
            layers = kv.get(child.batch_tokens(batch))
            if layers is None:
                assert batch not in state.kv, f"acknowledged KV chunk of batch {batch} is missing"
                continue
            want = child.batch_kv(batch)
            assert all(torch.equal(k, wk) and torch.equal(v, wv) for (k, v), (wk, wv) in zip(layers, want))
            state.kv.add(batch)
        state.maybe_kv.clear()
    finally:
        db.close()


def crash_trials(uri: str, trials: int, env: dict, seed: int) -> Expected:
    rng = random.Random(seed)
    state = Expected()
    for _ in range(trials):
        events = run_and_kill(uri, state.next_batch, env, rng)
        record(events, state)
        verify(uri, state)
        REPORT[f"SIGKILL trials ({'S3' if uri.startswith('s3://') else 'local'})"] += 1
    REPORT["acknowledged writes checked after kills"] += state.acked_writes
    return state


def test_sigkill_local_store(tmp_path):
    state = crash_trials(str(tmp_path / "db"), TRIALS, dict(os.environ), seed=1)
    assert state.kills == TRIALS
    assert state.acked_writes > TRIALS  # the kills landed among real work, not only at start-up
    assert state.present and state.kv


def test_sigkill_s3_store(moto_server, s3_location, monkeypatch):
    uri = f"s3://{s3_location['bucket']}/{s3_location['prefix']}"
    monkeypatch.setenv("ENDPOINT_URL", s3_location["endpoint_url"])  # for the child and for open_store here
    env = dict(os.environ)
    trials = max(TRIALS * 2 // 3, 1)
    state = crash_trials(uri, trials, env, seed=2)
    assert state.kills == trials and state.present
