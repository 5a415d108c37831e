"""S3Tier: values as objects in an S3 bucket (AWS or any S3-compatible server), via boto3.

Each key is one object, ``<prefix>/<key>``. Objects larger than ``part_size`` are read
with parallel ranged GETs pinned to one version by ``If-Match`` (an overwrite during the
read restarts it; two values are never mixed); values above ``multipart_threshold`` are
written as multipart uploads whose parts go up in parallel and which are aborted on any
failure. Request retries, timeouts and connection pooling are botocore's; a body that
arrives truncated is read again and never returned as data.
"""

from __future__ import annotations

import functools
import http.client
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import urllib3.exceptions
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, FlexibleChecksumError, IncompleteReadError,
                                 ResponseStreamingError)

from ..errors import AlreadyExists, ConfigError, InvalidArgument, InvalidKey, NotFound, TierUnavailable
from ._s3_errors import BadBody, ErrorTranslator, NoConditionalWrites, Replaced, Unsatisfiable
from ._s3_transfer import MIN_PART_SIZE, ViewReader, cancel, content_range, gather, submit, upload_multipart
from .base import BaseTier
from .keys import MAX_KEY_BYTES, validate_key

# transport failures that can escape botocore (while it reads an error response's body)
_TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError)

__all__ = ["S3Tier"]

MiB = 1024 * 1024
_READ_ATTEMPTS = 3  # reads of a truncated body, or restarts of a read whose object was replaced
_RETRY_MODES = ("legacy", "standard", "adaptive")
_CONDITIONAL_MODES = ("auto", "native", "emulated")


def _check_number(name: str, value: object, minimum: float, *, integer: bool = True) -> None:
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum:
        raise ConfigError(f"{name} must be {'an int' if integer else 'a number'} >= {minimum}, got {value!r}")


def _reopen(kwargs: dict) -> "S3Tier":
    return S3Tier(**kwargs)


class S3Tier(BaseTier):
    """Values as objects under ``prefix`` in one S3 bucket; durable, shared by processes.

    ``endpoint_url`` points at an S3-compatible server (MinIO, Ceph, moto); credentials
    and region come from boto3's usual chain (``AWS_*`` variables, profiles), region
    ``us-east-1`` when none is configured. ``client`` injects a ready boto3 S3 client:
    it is then used as given (its own retries and timeouts; not re-created after fork,
    not closed by ``close()``, not pickled; a pickled tier reopens with the default chain).

    Transfers: an object larger than ``part_size`` is read in ``part_size`` ranges: the
    answer to the first tells the size, and the other ranges start (in parallel) before
    its body is read, so no extra ``HEAD`` is needed; a value larger than
    ``multipart_threshold`` is uploaded in ``part_size`` parts (raised as needed to stay
    within S3's 10,000 parts). ``max_concurrency`` bounds each of the tier's thread pools
    (async twins, per-key fan-out of ``get_many``/``get_ranges``/``put_many``, parts), so at most about
    ``3 * max_concurrency`` requests run at once; the HTTP pool is sized for that.
    ``get`` returns ``bytes``; a large value costs one copy when its parts are joined.

    ``mode="create"`` and ``conditional_writes``:

    * ``"native"``: ``If-None-Match: *`` on ``PutObject`` and ``CompleteMultipartUpload``,
      so S3 itself refuses to replace an existing key; race-free.
    * ``"emulated"``: for servers without conditional writes (older MinIO, Ceph): a
      ``HEAD`` then an unconditional write. **Not race-free**: two writers that both see
      the key absent both write, and the later one wins.
    * ``"auto"`` (default): native, switching this instance to emulated when the server
      answers ``501 NotImplemented`` to the header. A server that silently ignores the
      header cannot be detected; configure ``"emulated"`` for it.

    S3 specifics: ``delete`` always returns True (S3 does not say whether the key
    existed); ``contains`` is a ``HEAD``; ``stats().items``/``bytes_stored`` are None,
    and ``stats().extra["requests"]`` counts HTTP requests (retries included). With
    ``check_bucket=True`` construction makes one ``HEAD`` of the bucket and fails with
    :class:`ConfigError` when it does not exist, :class:`TierUnavailable` when the
    endpoint or credentials do not work.
    """

    kind = "s3"
    durable = True

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, *,
                 region_name: str | None = None, client: Any = None, name: str | None = None,
                 max_concurrency: int = 16, multipart_threshold: int = 16 * MiB, part_size: int = 8 * MiB,
                 connect_timeout: float = 5.0, read_timeout: float = 60.0, max_attempts: int = 5,
                 retry_mode: str = "standard", conditional_writes: str = "auto", check_bucket: bool = True) -> None:
        if not isinstance(bucket, str) or not bucket:
            raise ConfigError(f"bucket must be a non-empty str, got {bucket!r}")
        if not isinstance(prefix, str):
            raise ConfigError(f"prefix must be a str, got {type(prefix).__name__}")
        _check_number("max_concurrency", max_concurrency, 1)
        _check_number("multipart_threshold", multipart_threshold, 1)
        _check_number("part_size", part_size, MIN_PART_SIZE)
        _check_number("max_attempts", max_attempts, 1)
        _check_number("connect_timeout", connect_timeout, 0.001, integer=False)
        _check_number("read_timeout", read_timeout, 0.001, integer=False)
        if retry_mode not in _RETRY_MODES:
            raise ConfigError(f"retry_mode must be one of {_RETRY_MODES}, got {retry_mode!r}")
        if conditional_writes not in _CONDITIONAL_MODES:
            raise ConfigError(f"conditional_writes must be one of {_CONDITIONAL_MODES}, got {conditional_writes!r}")
        prefix = prefix.rstrip("/")
        if prefix:
            try:
                validate_key(prefix)
            except InvalidArgument as exc:
                raise ConfigError(f"prefix {prefix!r} is not usable: {exc}") from exc
        super().__init__(name=name, max_workers=max_concurrency)
        self.bucket, self.prefix, self.endpoint_url, self.region_name = bucket, prefix, endpoint_url, region_name
        self.max_concurrency, self.multipart_threshold, self.part_size = max_concurrency, multipart_threshold, part_size
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.max_attempts, self.retry_mode, self.conditional_writes = max_attempts, retry_mode, conditional_writes
        self._init_args = dict(bucket=bucket, prefix=prefix, endpoint_url=endpoint_url, region_name=region_name,
                               name=self.name, max_concurrency=max_concurrency,
                               multipart_threshold=multipart_threshold, part_size=part_size,
                               connect_timeout=connect_timeout, read_timeout=read_timeout,
                               max_attempts=max_attempts, retry_mode=retry_mode,
                               conditional_writes=conditional_writes, check_bucket=False)
        self._root = prefix + "/" if prefix else ""
        self._errors = ErrorTranslator(tier_name=self.name, bucket=bucket, root=self._root, endpoint_url=endpoint_url,
                                       max_attempts=max_attempts, connect_timeout=connect_timeout,
                                       read_timeout=read_timeout)
        self._conditional = conditional_writes  # becomes "emulated" when "auto" meets a 501
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._requests: dict[str, int] = {}
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._pid = os.getpid()
        self._own_client = client is None
        if client is None:
            try:
                client = self._make_client()
            except (BotoCoreError, ValueError) as exc:  # a malformed endpoint_url or region_name
                raise ConfigError(f"cannot create an S3 client for endpoint_url={endpoint_url!r}, "
                                  f"region_name={region_name!r}: {exc}") from exc
        else:
            self._watch(client)
        self._s3 = client
        if check_bucket:
            try:
                self._call("head_bucket")
            except BaseException:
                self._close()  # leave no open connections behind
                raise

    # --------------------------------------------------------------- client, pools
    def _make_client(self):
        session = boto3.session.Session()  # a session per client: boto3's default one is shared state
        config = Config(retries={"mode": self.retry_mode, "max_attempts": self.max_attempts},
                        connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
                        max_pool_connections=3 * self.max_concurrency)
        client = session.client("s3", endpoint_url=self.endpoint_url, config=config,
                                region_name=self.region_name or session.region_name or "us-east-1")
        self._watch(client)
        return client

    def _watch(self, client) -> None:
        client.meta.events.register("before-send.s3", self._count_request, unique_id=f"tierstore-{id(self)}")

    def _count_request(self, request, event_name: str = "", **_) -> None:  # must return None
        method = "LIST" if event_name.endswith(".ListObjectsV2") else request.method
        with self._count_lock:
            self._requests[method] = self._requests.get(method, 0) + 1

    def _client(self):
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    # Sockets and pool threads do not survive fork: start afresh in the child.
                    self._pools = {}
                    if self._own_client:
                        self._s3 = self._make_client()
                    self._pid = os.getpid()
        return self._s3

    def _workers(self, which: str) -> ThreadPoolExecutor:
        self._client()
        with self._lock:
            self._check_open()
            pool = self._pools.get(which)
            if pool is None:
                pool = self._pools[which] = ThreadPoolExecutor(self.max_concurrency,
                                                               thread_name_prefix=f"tierstore-s3-{which}")
            return pool

    def _submit(self, which: str, calls: list) -> list:
        """Start zero-argument calls on pool ``which``; :func:`gather` collects them.

        Separate pools per level ("keys" runs whole-key calls that submit to "parts";
        "parts" never submits) keep a full pool from waiting on itself.
        """
        return submit(self._workers(which), calls, self.name)

    def _parallel(self, which: str, calls: list) -> list:
        if len(calls) == 1:
            return [calls[0]()]
        return gather(self._submit(which, calls), self.name) if calls else []

    # ----------------------------------------------------------------- requests
    def _call(self, op: str, key: str | None = None, **params):
        """One boto3 call on this tier's bucket (and ``key``), its errors translated.

        botocore retries what it recognises; a connection broken while it reads an
        error response escapes it as a raw urllib3 / http.client error, so such a call
        is retried here too (``max_attempts`` in all, with backoff), then reported as
        :class:`TierUnavailable`.
        """
        if key is not None:
            params["Key"] = self._root + key
            size = len(params["Key"].encode("utf-8"))
            if size > MAX_KEY_BYTES:  # S3 refuses it; say which part to shorten
                raise InvalidKey(f"S3 key {params['Key'][:60]!r}... is {size} bytes with the prefix "
                                 f"{self._root[:40]!r}; S3 allows {MAX_KEY_BYTES}: use a shorter prefix or name")
        for attempt in range(self.max_attempts):
            try:
                return getattr(self._client(), op)(Bucket=self.bucket, **params)
            except (ClientError, BotoCoreError) as exc:
                raise self._translate(exc, op, key, params) from exc
            except _TRANSPORT_ERRORS as exc:
                failure = exc
                if attempt + 1 < self.max_attempts:
                    time.sleep(min(0.05 * 2 ** attempt, 1.0))
        raise TierUnavailable(f"S3 {op} on {self._errors.where(key)} lost its connection {self.max_attempts} times "
                              f"({failure!r}); check the endpoint and any proxy in front of it") from failure

    def _translate(self, exc: Exception, op: str, key: str | None, params: dict) -> Exception:
        return self._errors.translate(exc, op, key, params, region=lambda: self._client().meta.region_name)

    # --------------------------------------------------------------------- reads
    def _get_object(self, key: str, start: int, stop: int | None, etag: str | None = None):
        """Open a GET of bytes ``[start, stop)`` (``stop=None``: to the end); body unread."""
        params = {"Range": f"bytes={start}-" + ("" if stop is None else str(stop - 1))}
        return self._call("get_object", key, **params, **({"IfMatch": etag} if etag else {}))

    def _body(self, key: str, response) -> bytes:
        """Read a response body whole; raise :class:`BadBody` unless it has the announced length."""
        span = content_range(response.get("ContentRange"))
        expected = response["ContentLength"] if span is None else span[1] - span[0] + 1
        body = response["Body"]
        try:
            data = body.read()  # botocore also checks the length against Content-Length
        except (IncompleteReadError, ResponseStreamingError, FlexibleChecksumError) as exc:
            raise BadBody(f"{type(exc).__name__}: {exc}") from exc
        except BotoCoreError as exc:
            raise self._translate(exc, "get_object", key, {}) from exc
        finally:
            body.close()
        if len(data) != expected:
            raise BadBody(f"received {len(data)} bytes where {expected} were announced")
        return data

    def _fetch(self, key: str, start: int, end: int | None) -> bytes:
        """Bytes ``[start, end)``; a bad first body or a replaced object restarts the read."""
        for _ in range(_READ_ATTEMPTS):
            try:
                return self._fetch_version(key, start, end)
            except BadBody as exc:
                failure: Exception = exc
            except Replaced as exc:
                failure = exc
        if isinstance(failure, BadBody):
            raise self._errors.bad_body(key, failure, _READ_ATTEMPTS) from failure
        raise TierUnavailable(f"{self._errors.where(key)} was overwritten during each of {_READ_ATTEMPTS} reads; "
                              "retry later, or raise part_size so that it is read in fewer requests") from failure

    def _fetch_version(self, key: str, start: int, end: int | None) -> bytes:
        first_stop = start + self.part_size if end is None else min(end, start + self.part_size)
        response = self._get_object(key, start, first_stop)
        span = content_range(response.get("ContentRange"))
        if span is None:  # the server ignored Range and sent the whole object
            return self._body(key, response)[start:end]
        stop = span[2] if end is None else min(end, span[2])
        offset = span[1] + 1
        # The headers told the size: start the other parts, each pinned by If-Match to
        # this version, before reading the first body, so that all parts flow at once.
        calls = [functools.partial(self._read_part, key, lo, min(lo + self.part_size, stop), response.get("ETag"))
                 for lo in range(offset, stop, self.part_size)]
        futures = self._submit("parts", calls) if calls else []
        try:
            first = self._body(key, response)
        except BaseException:
            cancel(futures)
            raise
        return b"".join([first, *gather(futures, self.name)]) if futures else first

    def _read_part(self, key: str, start: int, stop: int, etag: str | None) -> bytes:
        for _ in range(_READ_ATTEMPTS):
            try:
                return self._body(key, self._get_object(key, start, stop, etag))
            except BadBody as exc:
                failure = exc
            except (Unsatisfiable, NotFound) as exc:  # the object shrank or vanished: another version
                raise Replaced() from exc
        raise self._errors.bad_body(key, failure, _READ_ATTEMPTS) from failure

    def _get(self, key: str) -> bytes:
        try:
            return self._fetch(key, 0, None)
        except Unsatisfiable:  # S3 answers a range on an empty object with 416
            return b""

    def _get_range(self, key: str, start: int, end: int | None) -> bytes:
        if start == end:
            self._call("head_object", key)  # only existence matters: NotFound when absent
            return b""
        try:
            return self._fetch(key, start, end)
        except Unsatisfiable:  # starts at or past the end: an empty slice
            return b""

    def _get_or_none(self, key: str) -> bytes | None:
        try:
            return self._get(key)
        except NotFound:
            return None

    def _get_many(self, keys: list[str]) -> list[bytes | None]:
        return self._parallel("keys", [functools.partial(self._get_or_none, key) for key in keys])

    def _range_or_none(self, key: str, start: int, end: int | None) -> bytes | None:
        try:
            return self._get_range(key, start, end)
        except NotFound:
            return None

    def _get_ranges(self, requests: list[tuple[str, int, int | None]]) -> list[bytes | None]:
        # One ranged GET per request, all in flight at once (up to max_concurrency).
        return self._parallel("keys", [functools.partial(self._range_or_none, key, start, end)
                                       for key, start, end in requests])

    def _contains(self, key: str) -> bool:
        try:
            self._call("head_object", key)
        except NotFound:
            return False
        return True

    def _size(self, key: str) -> int:
        return self._call("head_object", key)["ContentLength"]

    def _list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        try:
            for page in self._client().get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=self._root + prefix):
                keys.extend(item["Key"][len(self._root):] for item in page.get("Contents", ()))
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, "list_objects_v2", None, {}) from exc
        return keys

    # -------------------------------------------------------------------- writes
    def _put(self, key: str, value: memoryview, create: bool) -> None:
        native = create and self._conditional != "emulated"
        multipart = value.nbytes > self.multipart_threshold
        # Emulated create checks first (not race-free); native multipart checks first only
        # to skip uploading a value that the final If-None-Match would refuse anyway.
        if create and (not native or multipart) and self._contains(key):
            raise self._errors.already_exists(key)
        try:
            if multipart:
                self._put_multipart(key, value, native)
            else:
                body = value.obj if type(value.obj) is bytes and value.nbytes == len(value.obj) else ViewReader(value)
                self._call("put_object", key, Body=body, **({"IfNoneMatch": "*"} if native else {}))
        except NoConditionalWrites as exc:
            if self._conditional == "native":
                raise ConfigError(f"the S3 endpoint {self.endpoint_url or 'AWS S3'} does not implement conditional "
                                  "writes (If-None-Match); use conditional_writes='emulated' (not race-free) or "
                                  "'auto'") from exc
            self._conditional = "emulated"
            self._put(key, value, create)

    def _put_multipart(self, key: str, value: memoryview, native: bool) -> None:
        # As s3transfer does: CRC32 per part when botocore computes checksums by default.
        when = getattr(self._client().meta.config, "request_checksum_calculation", None)
        upload_multipart(self._call, functools.partial(self._parallel, "parts"), key, value, part_size=self.part_size,
                         checksum={"ChecksumAlgorithm": "CRC32"} if when == "when_supported" else {},
                         if_none_match=native)

    def _put_or_conflict(self, key: str, value: memoryview, create: bool) -> str | None:
        try:
            self._put(key, value, create)
        except AlreadyExists:
            return key
        return None

    def _put_many(self, items: list[tuple[str, memoryview]], create: bool) -> None:
        calls = [functools.partial(self._put_or_conflict, key, value, create) for key, value in items]
        conflicts = [key for key in self._parallel("keys", calls) if key is not None]
        if conflicts:
            raise AlreadyExists(f"{len(conflicts)} key(s) already exist and were left unchanged "
                                f"(mode='create'): {conflicts[:5]}")

    def _delete(self, key: str) -> bool:
        self._call("delete_object", key)
        return True  # S3 does not say whether the key existed

    # ---------------------------------------------------------------- lifecycle
    def _close(self) -> None:
        with self._lock:
            pools, self._pools = self._pools, {}
        if self._pid == os.getpid():
            for which in ("keys", "parts"):  # keys first: their calls may still wait on parts
                if which in pools:
                    pools[which].shutdown(wait=True, cancel_futures=True)
        if self._own_client and self._pid == os.getpid():  # a client inherited through fork is the parent's
            self._s3.close()

    def _extra_stats(self) -> dict[str, Any]:
        with self._count_lock:
            by_method = dict(self._requests)
        return {"items": None, "bytes_stored": None,
                "extra": {"bucket": self.bucket, "prefix": self.prefix, "endpoint_url": self.endpoint_url,
                          "requests": sum(by_method.values()), "requests_by_method": by_method,
                          "conditional_writes": self._conditional}}

    def __reduce__(self):
        # Constructor arguments, not the client; the bucket was checked by the original.
        return _reopen, (dict(self._init_args),)

    def __repr__(self) -> str:
        return (f"<S3Tier {self.name!r} s3://{self.bucket}/{self.prefix} "
                f"{'closed' if self._closed else 'open'}>")
