"""How S3Tier's requests fail: botocore errors translated into tierstore's error tree.

:meth:`ErrorTranslator.translate` is the boundary: every botocore exception a request
raises comes out as a tierstore error (the caller chains it with ``raise ... from``)
whose message names the tier, the object and what to do about it. A few answers are not
errors for the caller but signals that S3Tier acts on itself: :class:`Unsatisfiable`,
:class:`BadBody`, :class:`Replaced` and :class:`NoConditionalWrites` never leave the tier.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError, FlexibleChecksumError,
                                 NoCredentialsError, ParamValidationError, PartialCredentialsError, ReadTimeoutError)

from ..errors import AlreadyExists, ConfigError, CorruptData, InvalidKey, NotFound, TierTimeout, TierUnavailable

__all__ = ["ErrorTranslator", "Unsatisfiable", "BadBody", "Replaced", "NoConditionalWrites"]

_DENIED = frozenset({"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                     "InvalidToken", "AllAccessDisabled"})


class Unsatisfiable(Exception):
    """416: the range starts at or past the end of the object (or the object is empty)."""


class BadBody(Exception):
    """A body shorter or longer than announced, cut off, or failing its checksum."""


class Replaced(Exception):
    """412 to If-Match: the object was overwritten between the parts of one read."""


class NoConditionalWrites(Exception):
    """501 to If-None-Match: the server does not implement conditional writes."""


@dataclass(frozen=True)
class ErrorTranslator:
    """Builds the errors of one tier's requests from what their messages name: the tier,
    bucket, key prefix, endpoint and limits, as the tier was constructed with them."""

    tier_name: str
    bucket: str
    root: str  # the key prefix and its "/", or "" without a prefix
    endpoint_url: str | None
    max_attempts: int
    connect_timeout: float
    read_timeout: float

    def where(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{self.root}{key}" if key is not None else f"bucket {self.bucket!r}"

    def already_exists(self, key: str) -> AlreadyExists:
        return AlreadyExists(f"key {key!r} already exists in S3 tier {self.tier_name!r} ({self.where(key)}); "
                             "mode='create' left it unchanged")

    def bad_body(self, key: str, failure: BadBody, attempts: int) -> Exception:
        """The error to raise when every one of ``attempts`` reads of ``key`` got a bad body."""
        error = CorruptData if isinstance(failure.__cause__, FlexibleChecksumError) else TierUnavailable
        return error(f"S3 sent a bad body for {self.where(key)} {attempts} times ({failure}); "
                     "check the endpoint or any proxy in front of it")

    def translate(self, exc: Exception, op: str, key: str | None, params: dict,
                  region: Callable[[], str | None]) -> Exception:
        """The error to raise for ``exc`` from request ``op`` with ``params``.

        ``region`` is called only when the bucket turns out to be in another region.
        """
        where, endpoint = self.where(key), self.endpoint_url or "AWS S3"
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            message = error.get("Message") or code
            if code == "NoSuchBucket" or (key is None and code in ("404", "NotFound")):
                return ConfigError(f"bucket {self.bucket!r} does not exist at {endpoint}; create it "
                                   f"(aws s3 mb s3://{self.bucket}) or fix bucket / endpoint_url")
            if code in ("NoSuchKey", "404", "NotFound"):
                return NotFound(f"key {key!r} not found in S3 tier {self.tier_name!r} ({where})")
            if code == "InvalidRange":
                return Unsatisfiable()
            if code in ("PreconditionFailed", "412"):
                if "IfMatch" in params:
                    return Replaced()
                return self.already_exists(key)
            if code == "NotImplemented" and "IfNoneMatch" in params:
                return NoConditionalWrites(message)
            if code == "ConditionalRequestConflict":
                return TierUnavailable(f"a concurrent write to {where} conflicted with this one (409); retry the put")
            if code in _DENIED:
                return TierUnavailable(f"S3 denied {op} on {where} at {endpoint} ({code}: {message}); check the "
                                       "credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE) and that they grant it")
            if code == "KeyTooLongError":
                return InvalidKey(f"{where} is longer than S3's 1024-byte key limit; use a shorter prefix or key")
            if code in ("PermanentRedirect", "301", "AuthorizationHeaderMalformed"):
                return TierUnavailable(f"bucket {self.bucket!r} is not in region {region()!r} ({code}); "
                                       "pass its region as region_name")
            return TierUnavailable(f"S3 {op} on {where} failed ({code}: {message}) after up to "
                                   f"{self.max_attempts} attempts")
        if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError)):
            return TierTimeout(f"S3 {op} on {where} timed out at {endpoint} (connect_timeout={self.connect_timeout}s, "
                               f"read_timeout={self.read_timeout}s); check that the endpoint is reachable, "
                               "or raise the timeouts")
        if isinstance(exc, EndpointConnectionError):
            return TierUnavailable(f"cannot connect to S3 endpoint {endpoint} for {op} on {where}; check "
                                   "endpoint_url and that the server is running")
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return TierUnavailable(f"no usable AWS credentials for {op} on {where}: set AWS_ACCESS_KEY_ID and "
                                   "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
        if isinstance(exc, ParamValidationError):
            return ConfigError(f"boto3 rejected the parameters of {op} on {where}: {exc}")
        return TierUnavailable(f"S3 {op} on {where} failed: {exc}")
