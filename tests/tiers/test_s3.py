"""S3Tier behaviour the conformance suite does not reach: multipart uploads, parallel
ranged reads, conditional writes, error translation, batching, listing, pickling, fork.

Everything runs real HTTP through real boto3 against moto's server on loopback. A few
faults that moto cannot be made to show (a truncated body, a server without conditional
writes, a server that never answers) come from tiny HTTP servers defined here, and a
failing part upload or a racing writer is injected by wrapping one client method.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import socket
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from botocore.exceptions import ClientError

from tests.conftest import random_bytes
from tierstore.errors import AlreadyExists, ConfigError, InvalidKey, NotFound, TierTimeout, TierUnavailable
from tierstore.testing import MotoServer
from tierstore.tiers import S3Tier

MiB = 1024 * 1024
PART = 5 * MiB  # S3's smallest multipart part


@pytest.fixture
def raw(moto_server):
    """A separate boto3 client, to check what the tier left in the bucket."""
    client = moto_server.client()
    yield client
    client.close()


@pytest.fixture
def make(s3_location):
    """Open S3Tiers at the test's location (keyword overrides); all closed afterwards."""
    tiers = []

    def make(**kwargs):
        kwargs = {"prefix": s3_location["prefix"], "endpoint_url": s3_location["endpoint_url"], **kwargs}
        tier = S3Tier(s3_location["bucket"], **kwargs)
        tiers.append(tier)
        return tier

    yield make
    for tier in tiers:
        tier.close()


def requests(tier) -> dict:
    return tier.stats().extra["requests_by_method"]


def incomplete_uploads(raw, loc) -> list:
    return raw.list_multipart_uploads(Bucket=loc["bucket"], Prefix=loc["prefix"]).get("Uploads", [])


def object_key(loc, key: str) -> str:
    return f"{loc['prefix']}/{key}"


@contextlib.contextmanager
def fake_s3(respond):
    """Serve HTTP on loopback; ``respond(method, headers)`` -> (status, headers, body).

    Every request is logged as ``(method, headers)``. A ``Content-Length`` given in the
    headers is sent as is, so a response can announce more bytes than it carries.
    """
    log = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def serve(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            log.append((self.command, dict(self.headers)))
            status, headers, body = respond(self.command, self.headers)
            self.send_response(status)
            headers = {"Content-Length": str(len(body)), **headers, "Connection": "close"}
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self.close_connection = True

        do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = serve

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", log
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def aws_credentials(monkeypatch):
    """Dummy credentials for tests that talk to a fake server instead of moto."""
    for name, value in MotoServer.credentials().items():
        monkeypatch.setenv(name, value)


def s3_error(code: str, message: str = "injected") -> bytes:
    return f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()


# ------------------------------------------------------------------ multipart writes
def test_multipart_put_round_trips_and_leaves_no_upload(make, raw, s3_location):
    tier = make(part_size=PART, multipart_threshold=PART)
    value = random_bytes(3 * PART + 123, seed=1)
    tier.put("big", memoryview(value)[:])
    assert requests(tier)["PUT"] == 4  # four parts, one create + one complete (POST)
    assert requests(tier)["POST"] == 2
    stored = raw.get_object(Bucket=s3_location["bucket"], Key=object_key(s3_location, "big"))
    assert stored["ETag"].strip('"').endswith("-4")  # S3 really assembled four parts
    assert stored["Body"].read() == value
    assert tier.get("big") == value
    assert incomplete_uploads(raw, s3_location) == []


@pytest.mark.parametrize("mode", ["overwrite", "create"])
def test_failed_part_aborts_the_upload(make, raw, s3_location, monkeypatch, mode):
    tier = make(part_size=PART, multipart_threshold=PART, max_concurrency=2)
    if mode == "overwrite":
        tier.put("big", b"previous value")
    client = tier._client()
    real_upload_part = client.upload_part

    def upload_part(**kwargs):
        if kwargs["PartNumber"] == 3:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "injected"}}, "UploadPart")
        return real_upload_part(**kwargs)

    monkeypatch.setattr(client, "upload_part", upload_part)
    key = "big" if mode == "overwrite" else "fresh"
    with pytest.raises(TierUnavailable) as info:
        tier.put(key, random_bytes(4 * PART, seed=2), mode=mode)
    assert isinstance(info.value.__cause__, ClientError)
    assert "InternalError" in str(info.value)
    assert incomplete_uploads(raw, s3_location) == []
    if mode == "overwrite":
        assert tier.get("big") == b"previous value"
    else:
        assert not tier.contains("fresh")


# -------------------------------------------------------------------- ranged reads
def test_large_get_uses_parallel_ranges_and_matches_stored_bytes(make, raw, s3_location):
    value = random_bytes(4 * PART + PART // 2, seed=3)
    raw.put_object(Bucket=s3_location["bucket"], Key=object_key(s3_location, "big"), Body=value)
    tier = make(part_size=PART, check_bucket=False)
    assert tier.get("big") == value
    assert requests(tier) == {"GET": 5}  # first range, then four in parallel
    assert tier.get_range("big", 1, 3 * PART + 17) == value[1:3 * PART + 17]
    assert tier.get_range("big", PART - 1, None) == value[PART - 1:]
    assert tier.get_many(["big", "big"]) == [value, value]


def test_parallel_get_restarts_when_object_is_replaced(make, raw, s3_location, monkeypatch):
    old, new = random_bytes(3 * PART, seed=4), random_bytes(3 * PART, seed=5)
    tier = make(part_size=PART)
    tier.put("v", old)
    client = tier._client()
    real_get_object = client.get_object
    replaced = []

    def get_object(**kwargs):
        response = real_get_object(**kwargs)
        if not replaced:  # another writer replaces the object right after the first range
            replaced.append(True)
            raw.put_object(Bucket=s3_location["bucket"], Key=object_key(s3_location, "v"), Body=new)
        return response

    monkeypatch.setattr(client, "get_object", get_object)
    assert tier.get("v") == new  # never old bytes followed by new ones
    # first range (old), its other parts refused by If-Match (one may be cancelled), all three again
    assert 1 + 1 + 3 <= requests(tier)["GET"] <= 1 + 2 + 3


def test_ranged_reads_clip_like_slices(make):
    tier = make()
    value = random_bytes(10_000, seed=6)
    tier.put("r", value)
    tier.put("empty", b"")
    cases = [(0, 1), (9_999, None), (10_000, None), (10_000, 10_005), (12_000, None), (12_000, 13_000),
             (5, 5), (10_000, 10_000), (50_000, 50_000)]
    for start, end in cases:
        assert tier.get_range("r", start, end) == value[start:end], (start, end)
    assert tier.get("empty") == b""  # S3 answers a range on an empty object with 416
    assert tier.get_range("empty", 0, 10) == b""
    assert tier.get_range("empty", 0) == b""
    for start, end in [(0, 10), (50_000, None), (5, 5)]:
        with pytest.raises(NotFound) as info:
            tier.get_range("missing", start, end)
        assert "missing" in str(info.value)
    assert isinstance(info.value.__cause__, ClientError)  # the original error stays reachable


@pytest.mark.parametrize("fault", ["cut-off", "mislabelled"])
def test_truncated_body_is_never_returned(fault, aws_credentials):
    def respond(method, headers):
        announced = {"cut-off": "100", "mislabelled": "40"}[fault]
        return 206, {"Content-Range": "bytes 0-99/100", "Content-Length": announced, "ETag": '"e"'}, b"x" * 40

    with fake_s3(respond) as (endpoint, log):
        tier = S3Tier("bucket", endpoint_url=endpoint, check_bucket=False)
        try:
            with pytest.raises(TierUnavailable) as info:
                tier.get("k")
            assert "bad body" in str(info.value)
            assert requests(tier) == {"GET": 3}  # read again twice before giving up
        finally:
            tier.close()


def test_truncated_part_is_read_again(aws_credentials):
    value = random_bytes(2 * PART + 10, seed=12)
    cut = {PART}  # the first answer for the part at 5 MiB arrives cut off halfway

    def respond(method, headers):
        first, _, last = headers["Range"].removeprefix("bytes=").partition("-")
        start, stop = int(first), min(int(last) + 1 if last else len(value), len(value))
        body = value[start:stop]
        announced = {"Content-Range": f"bytes {start}-{stop - 1}/{len(value)}", "Content-Length": str(len(body)),
                     "ETag": '"v1"'}
        if start in cut:
            cut.remove(start)
            body = body[:len(body) // 2]
        return 206, announced, body

    with fake_s3(respond) as (endpoint, log):
        tier = S3Tier("bucket", endpoint_url=endpoint, check_bucket=False, part_size=PART)
        try:
            assert tier.get("k") == value
            assert requests(tier) == {"GET": 3 + 1}  # three parts, one of them twice
            assert all(h.get("If-Match") == '"v1"' for _, h in log[1:])  # parts pinned to one version
        finally:
            tier.close()


# -------------------------------------------------------------- conditional writes
def test_native_create_relies_on_if_none_match(make):
    tier = make(conditional_writes="native")
    tier.put("c", b"original", mode="create")
    with pytest.raises(AlreadyExists) as info:
        tier.put("c", b"intruder", mode="create")
    assert isinstance(info.value.__cause__, ClientError)  # S3's own 412, not a prior check
    assert requests(tier) == {"HEAD": 1, "PUT": 2}  # the bucket check; no HEAD of the key
    with pytest.raises(AlreadyExists):
        tier.put_many({"c": b"again", "d": b"new"}, mode="create")
    assert tier.get_many(["c", "d"]) == [b"original", b"new"]


def test_emulated_create_checks_first(make):
    tier = make(conditional_writes="emulated")
    tier.put("c", b"original", mode="create")
    with pytest.raises(AlreadyExists):
        tier.put("c", b"intruder", mode="create")
    assert tier.get("c") == b"original"
    assert requests(tier)["HEAD"] == 1 + 2  # the bucket check, then one check per create
    assert tier.stats().extra["conditional_writes"] == "emulated"


@pytest.mark.parametrize("conditional_writes", ["native", "auto"])
def test_multipart_create_refused_when_key_appears_during_upload(make, raw, s3_location, monkeypatch,
                                                                 conditional_writes):
    tier = make(part_size=PART, multipart_threshold=PART, conditional_writes=conditional_writes)
    client = tier._client()
    real_complete = client.complete_multipart_upload

    def complete(**kwargs):  # another writer creates the key while the parts are going up
        raw.put_object(Bucket=s3_location["bucket"], Key=object_key(s3_location, "m"), Body=b"winner")
        return real_complete(**kwargs)

    monkeypatch.setattr(client, "complete_multipart_upload", complete)
    with pytest.raises(AlreadyExists):
        tier.put("m", random_bytes(2 * PART, seed=7), mode="create")
    assert tier.get("m") == b"winner"
    assert incomplete_uploads(raw, s3_location) == []


def _no_conditional_writes(objects):
    """A server that stores objects but answers 501 to If-None-Match (like older MinIO)."""

    def respond(method, headers):
        if method == "PUT" and "If-None-Match" in headers:
            return 501, {"Content-Type": "application/xml"}, s3_error("NotImplemented")
        if method == "PUT":
            objects.append(True)
            return 200, {"ETag": '"e"'}, b""
        if method == "HEAD":
            return (200, {"Content-Length": "1", "ETag": '"e"'}, b"") if objects else (404, {}, b"")
        return 500, {}, s3_error("InternalError")

    return respond


def test_auto_falls_back_to_emulated_on_501(aws_credentials):
    with fake_s3(_no_conditional_writes([])) as (endpoint, log):
        tier = S3Tier("bucket", endpoint_url=endpoint, check_bucket=False)
        try:
            tier.put("k", b"v", mode="create")
            assert [(m, "If-None-Match" in h) for m, h in log] == [("PUT", True), ("HEAD", False), ("PUT", False)]
            assert tier.stats().extra["conditional_writes"] == "emulated"
            with pytest.raises(AlreadyExists):
                tier.put("k", b"w", mode="create")
            assert [m for m, _ in log[3:]] == ["HEAD"]  # no second try of the header
        finally:
            tier.close()


def test_native_on_server_without_conditional_writes_says_what_to_do(aws_credentials):
    with fake_s3(_no_conditional_writes([])) as (endpoint, log):
        tier = S3Tier("bucket", endpoint_url=endpoint, check_bucket=False, conditional_writes="native")
        try:
            with pytest.raises(ConfigError, match="conditional_writes='emulated'"):
                tier.put("k", b"v", mode="create")
            tier.put("k", b"v")  # plain overwrites still work
        finally:
            tier.close()


# ---------------------------------------------------------- configuration and faults
def test_missing_bucket_is_a_config_error_naming_it(moto_server, raw):
    threads = threading.active_count()
    with pytest.raises(ConfigError) as info:
        S3Tier("tierstore-no-such-bucket", endpoint_url=moto_server.endpoint_url)
    message = str(info.value)
    assert "tierstore-no-such-bucket" in message and "create it" in message and "endpoint_url" in message
    assert isinstance(info.value.__cause__, ClientError)
    assert threading.active_count() == threads  # nothing left running
    assert "tierstore-no-such-bucket" not in [b["Name"] for b in raw.list_buckets()["Buckets"]]
    tier = S3Tier("tierstore-no-such-bucket", endpoint_url=moto_server.endpoint_url, check_bucket=False)
    try:
        with pytest.raises(ConfigError, match="does not exist"):
            tier.get("k")
        with pytest.raises(ConfigError, match="does not exist"):
            tier.put("k", b"v")
    finally:
        tier.close()


def test_unreachable_endpoint_fails_fast(aws_credentials):
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    started = time.monotonic()
    with pytest.raises(TierUnavailable) as info:
        S3Tier("bucket", endpoint_url=endpoint, connect_timeout=0.5, read_timeout=0.5, max_attempts=1)
    assert time.monotonic() - started < 5
    assert endpoint in str(info.value) and "endpoint_url" in str(info.value)


def test_silent_endpoint_times_out(aws_credentials):
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        tier = S3Tier("bucket", endpoint_url=endpoint, check_bucket=False, connect_timeout=0.5,
                      read_timeout=0.5, max_attempts=1)
        try:
            started = time.monotonic()
            with pytest.raises(TierTimeout, match="timed out"):
                tier.get("k")
            assert time.monotonic() - started < 5
        finally:
            tier.close()


def test_throttling_is_retried_by_botocore_and_counted(aws_credentials):
    answers = [(503, {}, s3_error("SlowDown"))]

    def respond(method, headers):
        return answers.pop() if answers else (206, {"Content-Range": "bytes 0-1/2", "ETag": '"e"'}, b"ok")

    with fake_s3(respond) as (endpoint, log):
        tier = S3Tier("bucket", endpoint_url=endpoint, check_bucket=False, max_attempts=3)
        try:
            assert tier.get("k") == b"ok"
            assert tier.stats().extra["requests"] == 2
        finally:
            tier.close()


@pytest.mark.parametrize("status, code, error, hint", [
    (403, "AccessDenied", TierUnavailable, "check the credentials"),
    (403, "InvalidAccessKeyId", TierUnavailable, "AWS_ACCESS_KEY_ID"),
    (404, "NoSuchBucket", ConfigError, "create it"),
    (400, "KeyTooLongError", InvalidKey, "shorter prefix"),
    (500, "InternalError", TierUnavailable, "InternalError"),
])
def test_server_errors_are_translated_and_chained(aws_credentials, status, code, error, hint):
    def respond(method, headers):
        return status, {"Content-Type": "application/xml"}, s3_error(code)

    with fake_s3(respond) as (endpoint, log):
        tier = S3Tier("bucket", endpoint_url=endpoint, check_bucket=False, max_attempts=1)
        try:
            for call in (lambda: tier.get("k"), lambda: tier.put("k", b"v")):
                with pytest.raises(error, match=hint) as info:
                    call()
                assert isinstance(info.value.__cause__, ClientError)
        finally:
            tier.close()


@pytest.mark.parametrize("kwargs", [dict(part_size=MiB), dict(retry_mode="fast"), dict(conditional_writes="maybe"),
                                    dict(prefix="../up"), dict(max_concurrency=0), dict(read_timeout=0),
                                    dict(endpoint_url="not a url"), dict(region_name="bad region!")],
                         ids=lambda kw: next(iter(kw)))
def test_bad_configuration_rejected_before_any_request(aws_credentials, kwargs):
    with pytest.raises(ConfigError):
        S3Tier("bucket", **{"endpoint_url": "http://127.0.0.1:9", **kwargs})


# -------------------------------------------------------------------- batches, list
def test_get_many_with_missing_keys_and_more_keys_than_workers(make):
    tier = make(max_concurrency=4)
    items = {f"g/{i:02d}": random_bytes(i * 101, seed=i) for i in range(30)}
    tier.put_many(items)
    keys = [k for pair in zip(items, [f"g/missing{i}" for i in range(30)]) for k in pair]
    before = requests(tier).get("GET", 0)
    values = tier.get_many(keys)
    assert values[0::2] == list(items.values())
    assert values[1::2] == [None] * 30
    assert requests(tier)["GET"] - before == 60  # one request per key
    stats = tier.stats()
    assert (stats.hits, stats.misses) == (30, 30)


def test_get_many_async_of_large_values_with_tiny_pools(make):
    """get_many runs on the async pool and fans out to keys, then parts: no pool waits on itself."""
    tier = make(max_concurrency=2, part_size=PART, multipart_threshold=PART)
    values = {f"L/{i}": random_bytes(2 * PART + i, seed=10 + i) for i in range(4)}
    tier.put_many(values)

    async def main():
        return await asyncio.wait_for(tier.get_many_async(list(values) + ["L/none"]), timeout=120)

    assert asyncio.run(main()) == [*values.values(), None]


def test_list_paginates_and_strips_the_prefix(make, s3_location):
    tier = make(max_concurrency=32)
    keys = [f"n/{i:04d}" for i in range(1100)]
    tier.put_many({key: b"x" for key in keys})
    assert tier.list("n/") == keys
    assert requests(tier)["LIST"] == 2  # S3 returns at most 1000 keys per page
    assert tier.list("n/10") == keys[1000:1100]
    sibling = make(prefix=s3_location["prefix"] + "x")  # shares the string prefix, not the folder
    sibling.put("n/0000", b"other")
    assert tier.list("") == keys
    assert sibling.list("") == ["n/0000"]


# ---------------------------------------------------------- pickle, fork, statistics
def test_pickle_round_trip_keeps_settings_not_client(make):
    tier = make(name="cold", part_size=6 * MiB, max_concurrency=3, conditional_writes="emulated", max_attempts=2)
    tier.put("pk", b"pickled")
    clone = pickle.loads(pickle.dumps(tier))
    try:
        for attr in ("name", "bucket", "prefix", "endpoint_url", "part_size", "max_concurrency",
                     "conditional_writes", "max_attempts"):
            assert getattr(clone, attr) == getattr(tier, attr), attr
        assert clone._client() is not tier._client()
        assert clone.stats().extra["requests"] == 0  # reopening makes no request
        assert clone.get("pk") == b"pickled"
    finally:
        clone.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_tier_works_in_a_forked_child(make):
    tier = make(part_size=PART)
    value = random_bytes(2 * PART + 1, seed=11)
    tier.put("f", value)
    assert tier.get("f") == value  # parent's client and pools are in use before the fork
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork of a threaded process
        pid = os.fork()
    if pid == 0:  # child: must not touch the parent's sockets or pool threads
        status = 1
        try:
            ok = tier.get("f") == value
            tier.put("from-child", b"hello")
            status = 0 if ok else 2
        finally:
            os.write(write_end, bytes([status]))
            os._exit(0)
    os.close(write_end)
    try:
        assert os.read(read_end, 1) == b"\x00"
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert tier.get("from-child") == b"hello"
    assert tier.get("f") == value


def test_requests_are_counted_by_method(make):
    tier = make()
    assert requests(tier) == {"HEAD": 1}  # the bucket check
    tier.put("k", b"value")
    tier.get("k")
    tier.contains("k")
    tier.size("k")
    tier.list("")
    tier.delete("k")
    assert requests(tier) == {"HEAD": 3, "PUT": 1, "GET": 1, "LIST": 1, "DELETE": 1}
    extra = tier.stats().extra
    assert extra["requests"] == 7
    assert extra["bucket"] == tier.bucket and extra["prefix"] == tier.prefix
    assert tier.stats().items is None and tier.stats().bytes_stored is None


def test_a_key_too_long_with_the_prefix_is_refused_before_any_request(make, s3_location, raw):
    """S3 allows 1,024 bytes of key: a prefix plus key past that is an InvalidKey naming both."""
    prefix = s3_location["prefix"] + "/" + "/".join(["p" * 200] * 4)  # segments of at most 255 bytes
    tier = make(prefix=prefix, check_bucket=False)
    before = dict(requests(tier))
    with pytest.raises(InvalidKey, match="use a shorter prefix or name"):
        tier.put("k" * 200, b"x")
    with pytest.raises(InvalidKey):
        tier.get("k" * 200)
    assert requests(tier) == before  # nothing was sent
    tier.put("k" * 50, b"x")  # within the limit with the prefix
    assert tier.get("k" * 50) == b"x"
    listed = raw.list_objects_v2(Bucket=s3_location["bucket"], Prefix=prefix)
    assert [o["Key"] for o in listed["Contents"]] == [prefix + "/" + "k" * 50]
