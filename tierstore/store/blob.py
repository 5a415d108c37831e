"""Blob framing: every value the store layer writes is checked on the way back in.

Posting lists, manifests and KV chunks are written as *blobs*: a small fixed prefix, a
JSON header, the payload and a checksum trailer. A blob that was corrupted or torn
(truncated, extended, bytes flipped) raises :class:`~tierstore.errors.CorruptData`; it is
never returned as data. Checksums are xxh3_64 (the ``xxhash`` package, ~30 GB/s).

Byte layout (integers little-endian; ``H`` = header_len, ``P`` = payload_len)::

    offset    size  field
    ------    ----  ----------------------------------------------------------------
    0         4     magic  b"TSBL"
    4         1     format version, u8 (= 1)
    5         1     flags, u8 (= 0; any other value is rejected)
    6         2     reserved, u16 (= 0)
    8         4     header_len H, u32
    12        8     payload_len P, u64
    20        8     header checksum, u64: xxh3_64 of bytes [0, 20) + the H header bytes
    28        H     header: UTF-8 JSON, sorted keys, no spaces, then space padding
    28+H      P     payload (the sections, laid out contiguously, when there are any)
    28+H+P    8     payload checksum, u64: xxh3_64 of the P payload bytes
                    total length = 36 + H + P, exactly

The header JSON is ``{"header": <the caller's dict>}`` plus, for a blob with sections,
``"sections": {name: [offset, length, "<xxh3_64 as 16 hex digits>"]}`` where ``offset``
is relative to the payload start. The header is padded with spaces so that the payload
starts on an ``align``-byte boundary (JSON ignores trailing whitespace); each section
starts on an ``align``-byte boundary too, the gaps being zero bytes. It is parsed with
:func:`json.loads` only.

Sections let one object hold many values that are read by range (say many posting
lists in one S3 object fetched with ranged GETs): :func:`fetch_header` learns the header
with one small ranged read (two when the header is larger than the first read), and
:func:`fetch_section` / :func:`verify_section` check one section's bytes against the
checksum recorded for it, without the rest of the object::

    info = fetch_header(functools.partial(tier.get_range, key))
    postings = fetch_section(functools.partial(tier.get_range, key), info, "list/17")

A full :func:`decode_blob` verifies the header and payload checksums and returns
zero-copy :class:`memoryview` slices of the input; keep the input unchanged while they
are in use.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

from xxhash import xxh3_64, xxh3_64_intdigest

from ..errors import CorruptData, InvalidArgument, InvalidType, NotFound
from ..tiers.base import as_buffer

__all__ = [
    "MAGIC", "FORMAT_VERSION", "PREFIX_SIZE", "TRAILER_SIZE",
    "Blob", "BlobHeader", "Section",
    "encode_blob", "decode_blob", "header_size", "read_header", "verify_section",
    "fetch_header", "fetch_section",
]

MAGIC = b"TSBL"
FORMAT_VERSION = 1
_PREFIX_UNCHECKED = struct.Struct("<4sBBHIQ")  # the part the header checksum starts with
_CHECKSUM = struct.Struct("<Q")
PREFIX_SIZE = _PREFIX_UNCHECKED.size + _CHECKSUM.size  # 28
TRAILER_SIZE = _CHECKSUM.size  # 8
_MAX_HEADER = 2**32 - 1
_MAX_ALIGN = 4096
_ZEROS = bytes(_MAX_ALIGN)
_TORN = "the value is corrupt or was torn; rewrite it from its source"


class Section(NamedTuple):
    """Where one section lies in its blob: bytes ``[offset, end)`` of the whole object.

    A named tuple: posting segments and KV chunks parse many per read, cheaply.
    """

    name: str
    offset: int
    length: int
    checksum: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class BlobHeader:
    """What the prefix and header of a blob say, learnt without reading the payload.

    ``header`` is the caller's dict; the payload is bytes ``[header_end,
    header_end + payload_len)`` of an object of ``total_len`` bytes; ``sections`` maps
    each section name to its :class:`Section`, in layout order.
    """

    header: dict
    header_end: int
    payload_len: int
    total_len: int
    sections: Mapping[str, Section] = field(default_factory=lambda: MappingProxyType({}))

    def section(self, name: str) -> Section:
        """Return the :class:`Section` called ``name``; :class:`NotFound` when absent."""
        try:
            return self.sections[name]
        except KeyError:
            names = list(self.sections)
            raise NotFound(f"blob has no section {name!r}; it has {len(names)}: {names[:5]}") from None


@dataclass(frozen=True, repr=False)
class Blob:
    """A verified blob: the caller's ``header`` dict and a zero-copy ``payload`` view."""

    header: dict
    payload: memoryview
    info: BlobHeader

    @property
    def sections(self) -> Mapping[str, Section]:
        return self.info.sections

    def section(self, name: str) -> memoryview:
        """Return the bytes of section ``name`` (a view; already verified by decoding)."""
        sec = self.info.section(name)
        start = sec.offset - self.info.header_end
        return self.payload[start:start + sec.length]

    def __repr__(self) -> str:
        return (f"Blob(header={self.header!r:.200}, payload_len={self.payload.nbytes}, "
                f"sections={list(self.sections)[:5]!r})")


# ------------------------------------------------------------------------- encoding
def encode_blob(header: dict, payload: object = None, *,
                sections: Mapping[str, object] | None = None, align: int = 8) -> bytes:
    """Frame ``header`` and ``payload`` (or named ``sections``) as one checked blob.

    ``header`` is a JSON-serialisable dict (string keys; no NaN or infinity): what the
    reader needs to interpret the payload (kind, dtype, shape, ...). Give either a
    bytes-like ``payload`` or a mapping of ``sections`` (name -> bytes-like), not both.
    The payload and every section start on an ``align``-byte boundary of the blob (a
    power of two up to 4096; 64 suits ranged reads of cache lines and SIMD loads).
    """
    if not isinstance(header, dict):
        raise InvalidType(f"header must be a dict, got {type(header).__name__}")
    if isinstance(align, bool) or not isinstance(align, int) or not 1 <= align <= _MAX_ALIGN or align & (align - 1):
        raise InvalidArgument(f"align must be a power of two from 1 to {_MAX_ALIGN}, got {align!r}")
    envelope: dict[str, Any] = {"header": header}
    if sections is None:
        parts = [] if payload is None else [as_buffer(payload)]
    elif payload is not None:
        raise InvalidArgument("give either payload or sections, not both; "
                              "put the payload in a section of its own")
    else:
        parts, envelope["sections"] = _layout_sections(sections, align)
    header_bytes = _header_bytes(envelope, align)
    payload_len = sum(part.nbytes for part in parts)
    fixed = _PREFIX_UNCHECKED.pack(MAGIC, FORMAT_VERSION, 0, 0, len(header_bytes), payload_len)
    header_hash = xxh3_64(fixed)
    header_hash.update(header_bytes)
    if len(parts) == 1:
        payload_sum = xxh3_64_intdigest(parts[0])
    else:
        payload_hash = xxh3_64()
        for part in parts:
            payload_hash.update(part)
        payload_sum = payload_hash.intdigest()
    # One allocation: join copies each part once into the result.
    return b"".join([fixed, _CHECKSUM.pack(header_hash.intdigest()), header_bytes, *parts,
                     _CHECKSUM.pack(payload_sum)])


def _layout_sections(sections: object, align: int) -> tuple[list, dict]:
    if not isinstance(sections, Mapping):
        raise InvalidType(f"sections must be a mapping of name -> bytes-like, got {type(sections).__name__}")
    parts: list = []
    table: dict[str, list] = {}
    pos = 0
    for name, value in sections.items():
        if not isinstance(name, str):
            raise InvalidType(f"section names must be str, got {type(name).__name__}")
        if not name:
            raise InvalidArgument("section names must be non-empty")
        view = as_buffer(value)
        pad = -pos % align
        if pad:
            parts.append(memoryview(_ZEROS)[:pad])
            pos += pad
        table[name] = [pos, view.nbytes, f"{xxh3_64_intdigest(view):016x}"]
        parts.append(view)
        pos += view.nbytes
    return parts, table


def _header_bytes(envelope: dict, align: int) -> bytes:
    try:
        text = json.dumps(envelope, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except TypeError as exc:
        raise InvalidType(f"header must be JSON-serialisable (dicts with str keys, lists, str, numbers, "
                          f"bool, None): {exc}") from exc
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"header cannot be written as JSON (NaN, infinity or a circular reference?): "
                              f"{exc}") from exc
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"header contains text that is not valid UTF-8 (a lone surrogate?): {exc}") from exc
    data += b" " * (-(PREFIX_SIZE + len(data)) % align)
    if len(data) > _MAX_HEADER:
        raise InvalidArgument(f"header is {len(data)} bytes as JSON; the limit is {_MAX_HEADER}: "
                              "move bulk data into the payload")
    return data


# ------------------------------------------------------------------------- decoding
def _byte_view(data: object) -> memoryview:
    return as_buffer(data)


def _corrupt(source: str | None, problem: str) -> CorruptData:
    what = "blob" if source is None else f"blob {source!r}"
    return CorruptData(f"{what}: {problem}; {_TORN}")


def _check_prefix(view: memoryview, source: str | None) -> tuple[int, int]:
    """Check magic, version, flags, reserved; return (header_len, payload_len)."""
    have = view.nbytes
    if bytes(view[:min(have, 4)]) != MAGIC[:min(have, 4)]:
        raise _corrupt(source, f"wrong magic {bytes(view[:4])!r} (expected {MAGIC!r}): not a tierstore blob")
    if have < PREFIX_SIZE:
        raise _corrupt(source, f"truncated: {have} bytes, shorter than the {PREFIX_SIZE}-byte prefix")
    _, version, flags, reserved, header_len, payload_len = _PREFIX_UNCHECKED.unpack_from(view)
    if version != FORMAT_VERSION:
        raise _corrupt(source, f"unknown format version {version} (this tierstore reads version "
                               f"{FORMAT_VERSION}; a newer writer?)")
    if flags or reserved:
        raise _corrupt(source, f"unknown flags 0x{flags:02x} / reserved 0x{reserved:04x} (both must be 0)")
    return header_len, payload_len


def header_size(prefix: object, *, source: str | None = None) -> int:
    """Return how many leading bytes of a blob :func:`read_header` needs.

    Given fewer than :data:`PREFIX_SIZE` bytes, answers :data:`PREFIX_SIZE` (read that
    many, then ask again). Raises :class:`CorruptData` as soon as the bytes given show
    that the object is not a blob of a known version.
    """
    view = _byte_view(prefix)
    if view.nbytes < PREFIX_SIZE:
        if bytes(view) != MAGIC[:view.nbytes]:
            raise _corrupt(source, f"wrong magic {bytes(view)!r} (expected {MAGIC!r}): not a tierstore blob")
        return PREFIX_SIZE
    header_len, _ = _check_prefix(view, source)
    return PREFIX_SIZE + header_len


def read_header(data: object, *, source: str | None = None) -> BlobHeader:
    """Parse and verify the header from the first :func:`header_size` bytes (or more).

    The payload is not read or checked; use :func:`verify_section` on each section read
    by range, or :func:`decode_blob` on the whole object. Data shorter than the header
    raises :class:`CorruptData` (a reader doing ranged reads asks :func:`header_size`
    first, or uses :func:`fetch_header`).
    """
    view = _byte_view(data)
    header_len, payload_len = _check_prefix(view, source)
    header_end = PREFIX_SIZE + header_len
    if view.nbytes < header_end:
        raise _corrupt(source, f"truncated: {view.nbytes} bytes, the header ends at byte {header_end}")
    header_hash = xxh3_64(view[:_PREFIX_UNCHECKED.size])
    header_hash.update(view[PREFIX_SIZE:header_end])
    (stored,) = _CHECKSUM.unpack_from(view, _PREFIX_UNCHECKED.size)
    if header_hash.intdigest() != stored:
        raise _corrupt(source, "header checksum mismatch")
    try:
        envelope = json.loads(str(view[PREFIX_SIZE:header_end], "utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _corrupt(source, f"header is not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(envelope, dict) or not isinstance(envelope.get("header"), dict):
        raise _corrupt(source, "header JSON is not an object with a 'header' object")
    sections = _parse_sections(envelope.get("sections"), header_end, payload_len, source)
    return BlobHeader(header=envelope["header"], header_end=header_end, payload_len=payload_len,
                      total_len=header_end + payload_len + TRAILER_SIZE, sections=sections)


def _parse_sections(table: object, header_end: int, payload_len: int,
                    source: str | None) -> Mapping[str, Section]:
    if table is None:
        return MappingProxyType({})
    if not isinstance(table, dict):
        raise _corrupt(source, "section table is not a JSON object")
    found = []
    for name, entry in table.items():
        try:
            offset, length, digest = entry
            checksum = int(digest, 16) if type(digest) is str and len(digest) == 16 else -1
        except (TypeError, ValueError):
            checksum = -1
        if checksum < 0 or type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            raise _corrupt(source, f"section {name!r} has a malformed table entry {entry!r:.80}")
        found.append((header_end + offset, length, name, checksum))
    found.sort()
    end_of_previous, payload_end = header_end, header_end + payload_len
    for offset, length, name, _ in found:
        if offset < end_of_previous or offset + length > payload_end:
            raise _corrupt(source, f"section {name!r} [{offset}, {offset + length}) overlaps another "
                                   f"or lies outside the payload")
        end_of_previous = offset + length
    return MappingProxyType({name: Section(name, offset, length, checksum) for offset, length, name, checksum in found})


def decode_blob(data: object, *, source: str | None = None) -> Blob:
    """Verify a whole blob and return its header and a zero-copy view of its payload.

    Raises :class:`CorruptData` for a wrong magic or version, truncated or extended
    data, or a header or payload checksum mismatch. ``source`` (a key, say) is named in
    error messages.
    """
    view = _byte_view(data)
    info = read_header(view, source=source)
    if view.nbytes != info.total_len:
        problem = "truncated" if view.nbytes < info.total_len else "extra bytes after the trailer"
        raise _corrupt(source, f"{problem}: {view.nbytes} bytes, the blob declares {info.total_len}")
    payload = view[info.header_end:info.header_end + info.payload_len]
    (stored,) = _CHECKSUM.unpack_from(view, info.total_len - TRAILER_SIZE)
    if xxh3_64_intdigest(payload) != stored:
        raise _corrupt(source, "payload checksum mismatch")
    return Blob(header=info.header, payload=payload, info=info)


def verify_section(info: BlobHeader, name: str, data: object, *, source: str | None = None) -> memoryview:
    """Check the bytes of section ``name`` read by range and return them as a view.

    ``data`` must be exactly bytes ``[section.offset, section.end)`` of the object;
    a wrong length or checksum raises :class:`CorruptData`, an unknown name
    :class:`NotFound`.
    """
    sec = info.section(name)
    view = _byte_view(data)
    if view.nbytes != sec.length:
        raise _corrupt(source, f"section {name!r} is {view.nbytes} bytes, the header declares {sec.length}")
    if xxh3_64_intdigest(view) != sec.checksum:
        raise _corrupt(source, f"section {name!r} checksum mismatch")
    return view


def fetch_header(fetch_range: Callable[[int, int], object], *, first_read: int = 4096,
                 source: str | None = None) -> BlobHeader:
    """Read a blob's header through ``fetch_range(start, end)`` (a ranged GET, say).

    One call of ``first_read`` bytes, and a second for the rest when the header is
    larger. ``fetch_range`` may return fewer bytes than asked near the end of the object.
    """
    if isinstance(first_read, bool) or not isinstance(first_read, int) or first_read < PREFIX_SIZE:
        raise InvalidArgument(f"first_read must be an int >= {PREFIX_SIZE}, got {first_read!r}")
    head = fetch_range(0, first_read)
    needed = header_size(head, source=source)
    have = _byte_view(head).nbytes
    if needed > have and have >= first_read:
        head = b"".join([head, fetch_range(have, needed)])
    return read_header(head, source=source)


def fetch_section(fetch_range: Callable[[int, int], object], info: BlobHeader, name: str, *,
                  source: str | None = None) -> memoryview:
    """Read section ``name`` through ``fetch_range(start, end)`` and verify it."""
    sec = info.section(name)
    return verify_section(info, name, fetch_range(sec.offset, sec.end), source=source)
