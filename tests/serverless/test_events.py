"""Worker events are checked field by field: a malformed one is a typed error naming the field."""

from __future__ import annotations

import base64
import copy
import json

import numpy as np
import pytest

from tierstore.errors import EventError, PayloadTooLarge
from tierstore.serverless import FanoutExecutor, InProcessInvoker
from tierstore.serverless.events import MAX_PAYLOAD, dumps
from tierstore.serverless.handler import make_handler


class Recording:
    """Records the requests an invoker receives, then passes them on unchanged."""

    def __init__(self, inner) -> None:
        self.inner, self.payloads = inner, []

    def invoke(self, payload: bytes, affinity=None) -> bytes:
        self.payloads.append(payload)
        return self.inner.invoke(payload, affinity=affinity)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def event(s3col):
    recorder = Recording(InProcessInvoker(s3col.config()))
    queries = np.random.default_rng(0).standard_normal((4, s3col.col.dim)).astype(np.float32)
    FanoutExecutor(recorder, partitions=4, branching=2).search(s3col.col, queries, 5)
    return json.loads(recorder.payloads[0])


@pytest.fixture(scope="module")
def handler(s3col):
    return make_handler(s3col.config(), child_invoker=InProcessInvoker(s3col.config()))


def test_a_recorded_event_is_served(handler, event):
    out = handler(copy.deepcopy(event), None)
    assert out["nq"] == event["nq"] and "counts" in out


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


BAD = [
    (lambda e: e.pop("digest"), "lacks field"),
    (lambda e: e.update(extra=1), "unknown field"),
    (lambda e: e.update(v=2), "'v'"),
    (lambda e: e.update(op="__import__('os').system('true')"), "'op'"),
    (lambda e: e.update(bucket="another-bucket"), "bucket"),
    (lambda e: e.update(prefix="other/prefix"), "prefix"),
    (lambda e: e.update(index="collections/../../secret"), "'index'"),
    (lambda e: e.update(index="/abs/key"), "'index'"),
    (lambda e: e.update(index="other/meta-1"), "'index'"),
    (lambda e: e.update(nq="4"), "'nq'"),
    (lambda e: e.update(keep=-1), "'keep'"),
    (lambda e: e.update(queries="not base64!"), "'queries'"),
    (lambda e: e.update(queries=b64(b"\0" * 12)), "'queries'"),
    (lambda e: e.update(queries=b64(np.full(e["nq"] * e["dim"], np.nan, "<f4").tobytes())), "NaN"),
    (lambda e: e.update(lists=b64(b"\0" * 7)), "'lists'"),
    (lambda e: e.update(partial="yes"), "'partial'"),
    (lambda e: e.update(scan=[{"partition": 99, "queries": ""}]), "scan[0].partition"),
    (lambda e: e.update(scan=[{"partition": 0, "queries": b64(np.array([999], "<i4").tobytes())}]),
     "scan[0].queries"),
    (lambda e: e.update(scan="all"), "'scan'"),
    (lambda e: e.update(children=[{"node": 1, "take": b64(np.array([50], "<i4").tobytes()), "scan": [],
                                   "children": []}]), "children[0].take"),
    (lambda e: e.update(node=-1), "'node'"),
    (lambda e: e.update(children=[{"scan": [], "children": []}]), "children[0]"),
    (lambda e: e.update(selection={"size": 10, "rows": "eJw="}), "selection"),
    (lambda e: e.update(selection={"size": 10, "rows": b64(b"x"), "bitmap": ""}), "selection"),
    (lambda e: e.update(digest="0"), "digest"),
]


@pytest.mark.parametrize("mutate,field", BAD)
def test_malformed_events_are_typed_errors_naming_the_field(handler, event, mutate, field):
    bad = copy.deepcopy(event)
    mutate(bad)
    with pytest.raises(EventError, match=field.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        handler(bad, None)


def test_non_object_events(handler):
    for value in (None, [], "search", 3):
        with pytest.raises(EventError, match="JSON object"):
            handler(value, None)


def test_payloads_over_six_megabytes_are_refused():
    with pytest.raises(PayloadTooLarge, match="6,291,456"):
        dumps({"x": "a" * MAX_PAYLOAD})


def test_a_batch_too_large_for_one_request_is_a_clear_error(s3col, inprocess):
    queries = np.random.default_rng(3).standard_normal((16_000, s3col.col.dim)).astype(np.float32)
    with pytest.raises(PayloadTooLarge, match="fewer queries"):
        s3col.col.search(queries, 10, executor=FanoutExecutor(inprocess, partitions=1, branching=2))


def test_a_selection_that_inflates_past_its_rows_is_refused():
    """A few kB of zlib can inflate to gigabytes: the decoder stops at the bitmap size of ``size`` rows."""
    import zlib

    from tierstore.serverless.events import decode_selection, encode_selection

    assert decode_selection(encode_selection(np.arange(0, 1_000, 3), 1_000)).size == 1_000
    bomb = base64.b64encode(zlib.compress(b"\0" * (64 << 20), 9)).decode("ascii")  # 64 MiB from ~65 kB
    for kind in ("bitmap", "rows"):
        with pytest.raises(EventError, match="inflates past the 125 bytes"):
            decode_selection({"size": 1_000, kind: bomb})
