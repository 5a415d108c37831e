"""Shared fixtures: a real S3 endpoint (moto server on 127.0.0.1) and data helpers."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from tierstore.testing import MotoServer

BUCKET = "tierstore-test"


@pytest.fixture(scope="session")
def moto_server():
    """moto's S3 server in a child process for the whole session (real HTTP, real boto3)."""
    with MotoServer() as server:
        server.client().create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture
def s3_location(moto_server):
    """A fresh (bucket, prefix, endpoint_url) for one test; isolated by a unique prefix."""
    return {"bucket": BUCKET, "prefix": f"t/{uuid.uuid4().hex}", "endpoint_url": moto_server.endpoint_url}


def random_bytes(size: int, seed: int = 0) -> bytes:
    """Deterministic incompressible bytes."""
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def torch_or_skip():
    return pytest.importorskip("torch")


class RecordingInvoker:
    """Wraps a serverless invoker and keeps every event it is given (decoded) in ``events``."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.events: list[dict] = []

    def invoke(self, payload, affinity=None):
        self.events.append(json.loads(payload))
        return self.inner.invoke(payload, affinity=affinity)

    def close(self) -> None:
        self.inner.close()
