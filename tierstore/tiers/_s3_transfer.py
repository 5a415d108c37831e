"""How S3Tier moves bytes, apart from any one bucket: request bodies over the caller's
buffer, ``Content-Range`` parsing, calls run in parallel on a thread pool (cancelled so
that nothing runs on behind the caller), and the multipart-upload protocol.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait

from ..errors import StoreClosed

__all__ = ["MIN_PART_SIZE", "ViewReader", "content_range", "submit", "cancel", "gather", "upload_multipart"]

MIN_PART_SIZE = 5 * 1024 * 1024  # S3 refuses smaller multipart parts (except the last one)
_MAX_PARTS = 10_000


class ViewReader(io.BufferedIOBase):
    """A seekable file over a memoryview: botocore sends (and re-sends on retry) a slice
    of the caller's buffer without a copy of the whole value."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view, self._pos = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        stop = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        chunk = self._view[self._pos:stop].tobytes()
        self._pos = max(self._pos, stop)
        return chunk

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos


def content_range(header: str | None) -> tuple[int, int, int] | None:
    """``'bytes 0-99/1234'`` -> ``(0, 99, 1234)``; None when the server sent the whole object."""
    if not header:
        return None
    span, _, total = header.partition(" ")[2].partition("/")
    first, _, last = span.partition("-")
    return int(first), int(last), int(total)


# ------------------------------------------------------------------- parallel calls
def _closed_during(tier_name: str) -> StoreClosed:
    return StoreClosed(f"S3 tier {tier_name!r} was closed during the operation")


def submit(pool: ThreadPoolExecutor, calls: list, tier_name: str) -> list[Future]:
    """Start zero-argument calls on ``pool``; :func:`gather` collects them."""
    futures: list[Future] = []
    try:
        futures.extend(pool.submit(call) for call in calls)
    except RuntimeError as exc:  # close() shut the pool down under us
        cancel(futures)
        raise _closed_during(tier_name) from exc
    return futures


def cancel(futures: list[Future]) -> None:
    for future in futures:
        future.cancel()
    wait(futures)  # what had started has finished: nothing runs on behind the caller


def gather(futures: list[Future], tier_name: str) -> list:
    """Results in order; on an error cancel what has not started, wait, raise the first."""
    try:
        wait(futures, return_when=FIRST_EXCEPTION)
    finally:  # also on KeyboardInterrupt: nothing may run on behind the caller
        cancel([f for f in futures if not f.done()])
    errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
    if errors:
        raise errors[0]
    if any(f.cancelled() for f in futures):
        raise _closed_during(tier_name)
    return [f.result() for f in futures]


# -------------------------------------------------------------------- multipart
def upload_multipart(call: Callable[..., dict], run_parts: Callable[[list], list], key: str, value: memoryview, *,
                     part_size: int, checksum: dict, if_none_match: bool) -> None:
    """Write ``value`` to ``key`` as one multipart upload, aborted on any failure.

    ``call(op, key, **params)`` makes one request; ``run_parts(calls)`` runs the part
    uploads (in parallel) and returns their results in order. Parts are ``part_size``
    bytes, raised as needed to stay within S3's 10,000 parts; ``checksum`` goes on each
    part; ``if_none_match`` makes the completion refuse to replace an existing key.
    """
    size = value.nbytes
    part_size = max(part_size, -(-size // _MAX_PARTS))
    upload_id = call("create_multipart_upload", key, **checksum)["UploadId"]
    try:
        calls = [functools.partial(_put_part, call, key, upload_id, number, value[lo:lo + part_size], checksum)
                 for number, lo in enumerate(range(0, size, part_size), start=1)]
        parts = run_parts(calls)
        call("complete_multipart_upload", key, UploadId=upload_id, MultipartUpload={"Parts": parts},
             **({"IfNoneMatch": "*"} if if_none_match else {}))
    except BaseException:
        try:  # every part has finished or was cancelled, so the abort removes them all
            call("abort_multipart_upload", key, UploadId=upload_id)
        except Exception:  # noqa: BLE001 - the original error matters more than the cleanup's
            pass
        raise


def _put_part(call: Callable[..., dict], key: str, upload_id: str, number: int, view: memoryview,
              checksum: dict) -> dict:
    response = call("upload_part", key, UploadId=upload_id, PartNumber=number, Body=ViewReader(view), **checksum)
    part = {"ETag": response["ETag"], "PartNumber": number}
    if checksum and "ChecksumCRC32" in response:
        part["ChecksumCRC32"] = response["ChecksumCRC32"]
    return part
