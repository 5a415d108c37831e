"""A collection in S3 (moto's server on loopback, real boto3) with deletes and unindexed rows."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

import tierstore
from tierstore.serverless import InProcessInvoker, WorkerConfig

from ..conftest import BUCKET

N, DIM = 4000, 32
SCHEMA = {"year": "int", "lang": "keyword", "tags": "keywords"}


def clustered(n: int, dim: int, *, clusters: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32) * 4
    labels = rng.integers(0, clusters, n)
    return (centres[labels] + rng.standard_normal((n, dim)).astype(np.float32)).astype(np.float32)


def attributes(n: int, start: int = 0) -> list[dict]:
    langs = ["en", "de", "fr", "es"]
    return [{"year": 2000 + (i * 7) % 25, "lang": langs[i % 4], "tags": [f"t{i % 3}", f"g{i % 7}"]}
            for i in range(start, start + n)]


class S3Collection:
    """An indexed collection in S3 plus what a worker needs to reach it."""

    def __init__(self, db, col, bucket: str, prefix: str, endpoint_url: str) -> None:
        self.db, self.col = db, col
        self.bucket, self.prefix, self.endpoint_url = bucket, prefix, endpoint_url

    def config(self, **kwargs) -> WorkerConfig:
        return WorkerConfig(bucket=self.bucket, prefix=self.prefix, endpoint_url=self.endpoint_url, **kwargs)


def make_collection(moto_server, *, metric: str = "l2", n: int = N, quantizer: str = "pq4fs",
                    updates: bool = True, name: str = "docs") -> S3Collection:
    prefix = f"sv/{uuid.uuid4().hex}"
    db = tierstore.connect(f"s3://{BUCKET}/{prefix}", endpoint_url=moto_server.endpoint_url)
    col = db.create_collection(name, dim=DIM, metric=metric, attributes=SCHEMA)
    col.add(ids=np.arange(n), vectors=clustered(n, DIM), attributes=attributes(n))
    col.build_index(target_list_size=32, quantizer=quantizer)
    if updates:
        col.delete(ids=np.arange(0, n, 37))                      # tombstones among indexed rows
        extra = clustered(150, DIM, seed=5)                        # unindexed rows: the exact delta
        col.add(ids=np.arange(n, n + 150), vectors=extra, attributes=attributes(150, start=n))
        col.add(ids=[5, 6], vectors=clustered(2, DIM, seed=9))      # upserts of indexed ids
    return S3Collection(db, col, BUCKET, prefix, moto_server.endpoint_url)


@pytest.fixture(scope="session")
def s3col(moto_server):
    """4,000 x 32 (L2, pq4fs, ~125 lists) in S3, with deletes, upserts and 152 unindexed rows."""
    made = make_collection(moto_server)
    yield made
    made.db.close()


@pytest.fixture(scope="session")
def queries():
    return clustered(120, DIM, seed=1)


@pytest.fixture
def inprocess(s3col):
    invoker = InProcessInvoker(s3col.config())
    yield invoker
    invoker.close()
