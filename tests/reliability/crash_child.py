"""A writer that a crash test kills with SIGKILL at a random moment.

Usage: ``python crash_child.py URI FIRST_BATCH`` (env: ``ENDPOINT_URL`` for s3:// URIs).
It adds batches of vectors, deletes earlier batches, stores KV chunks and rebuilds the
index now and then, printing ``ack <kind> <batch>`` on stdout after each call returns (so
only acknowledged work is acked) and ``start <kind> <batch>`` before it. Everything it
writes is a pure function of the batch number (:func:`batch_vectors`, :func:`batch_kv`),
so the parent can check what it finds.
"""

from __future__ import annotations

import os
import sys

import numpy as np

BATCH = 40
DIM = 24
KV_SHAPE = (2, 32, 16)  # kv_heads, tokens, head_dim
KV_LAYERS = 2


def batch_ids(batch: int) -> np.ndarray:
    return np.arange(batch * BATCH, (batch + 1) * BATCH, dtype=np.int64)


def batch_vectors(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((BATCH, DIM)).astype(np.float32)


def batch_tokens(batch: int) -> list[int]:
    return [(batch * 7919 + i * 31) % 50_000 for i in range(KV_SHAPE[1])]


def batch_kv(batch: int):
    import torch

    g = torch.Generator().manual_seed(batch)
    return [(torch.randn(KV_SHAPE, generator=g).to(torch.float16), torch.randn(KV_SHAPE, generator=g).to(torch.float16))
            for _ in range(KV_LAYERS)]


def open_store(uri: str):
    import tierstore

    options = {"flush_rows": 120}  # checkpoints (manifest commit, WAL truncation, GC) every 3 batches
    if uri.startswith("s3://"):
        options["endpoint_url"] = os.environ["ENDPOINT_URL"]
    db = tierstore.connect(uri, **options)
    col = db.create_collection("crash", dim=DIM, metric="l2", attributes={"batch": "int"}, exist_ok=True)
    kv = db.kv_cache("crash/model", "r1", codec="fp16", chunk_tokens=16)
    return db, col, kv


def say(*words: object) -> None:
    sys.stdout.write(" ".join(map(str, words)) + "\n")
    sys.stdout.flush()


def main(uri: str, first: int) -> None:
    db, col, kv = open_store(uri)
    batch_kv(0)  # import torch before the first acknowledged write, not during it
    say("ready", first)
    batch = first
    while True:
        say("start", "add", batch)
        col.add(batch_ids(batch), batch_vectors(batch), [{"batch": batch}] * BATCH)
        say("ack", "add", batch)
        if batch % 3 == 0:
            say("start", "kv", batch)
            kv.put(batch_tokens(batch), batch_kv(batch))
            say("ack", "kv", batch)
        if batch % 4 == 1 and batch - 3 >= first:
            say("start", "delete", batch - 3)
            col.delete(batch_ids(batch - 3))
            say("ack", "delete", batch - 3)
        if batch % 9 == 5:
            say("start", "build", batch)
            col.build_index(target_list_size=64)
            say("ack", "build", batch)
        batch += 1


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
