"""Blob framing: exact round trips, and every corruption raises CorruptData."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import random_bytes
from tierstore.errors import CorruptData, InvalidArgument, InvalidType, NotFound
from tierstore.store.blob import (
    FORMAT_VERSION, MAGIC, PREFIX_SIZE, TRAILER_SIZE, Blob, decode_blob, encode_blob, fetch_header,
    fetch_section, header_size, read_header, verify_section,
)

SECTIONS = {"list/0": b"alpha", "list/1": b"", "list/2": bytes(range(256)) * 3, "z": b"\x00" * 7}


def flipped(data: bytes, pos: int, mask: int = 0xFF) -> bytes:
    out = bytearray(data)
    out[pos] ^= mask
    return bytes(out)


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("size", [0, 1, 100, 4096, 8 << 20])
def test_round_trip_payload(size):
    payload = random_bytes(size, seed=size)
    header = {"kind": "posting_list", "dtype": "float32", "shape": [size // 4, 1]}
    blob = decode_blob(encode_blob(header, payload))
    assert blob.header == header
    assert bytes(blob.payload) == payload
    assert blob.sections == {}


def test_round_trip_without_payload_and_empty_header():
    blob = decode_blob(encode_blob({}))
    assert blob.header == {} and blob.payload.nbytes == 0


def test_unicode_header_round_trips():
    header = {"name": "mañana ✓ 日本語 🚀", "nested": {"ключ": ["é", None, True, 1.5, -3, 2**70]}}
    assert decode_blob(encode_blob(header, b"x")).header == header


def test_bytes_like_payloads_are_accepted():
    arr = np.arange(1000, dtype=np.float32)
    for value in (arr, bytearray(arr.tobytes()), memoryview(arr.tobytes())):
        blob = decode_blob(encode_blob({"dtype": "float32"}, value))
        np.testing.assert_array_equal(np.frombuffer(blob.payload, dtype=np.float32), arr)
    decode_blob(bytearray(encode_blob({}, b"abc")))  # the decoder takes any bytes-like too


def test_payload_is_a_view_not_a_copy():
    data = encode_blob({}, random_bytes(1 << 20))
    blob = decode_blob(data)
    assert isinstance(blob.payload, memoryview) and blob.payload.obj is data


@pytest.mark.parametrize("align", [1, 8, 64, 4096])
def test_alignment_of_payload_and_sections(align):
    data = encode_blob({"k": "v" * 13}, sections=SECTIONS, align=align)
    info = read_header(data)
    assert info.header_end % align == 0
    assert all(sec.offset % align == 0 for sec in info.sections.values())
    single = read_header(encode_blob({"k": 1}, b"abc", align=align))
    assert single.header_end % align == 0


def test_sections_round_trip_in_layout_order():
    data = encode_blob({"kind": "coalesced"}, sections=SECTIONS, align=64)
    blob = decode_blob(data)
    assert list(blob.sections) == list(SECTIONS)  # layout order, not JSON's sorted order
    for name, value in SECTIONS.items():
        assert bytes(blob.section(name)) == value
        sec = blob.sections[name]
        assert data[sec.offset:sec.end] == value
    assert blob.header == {"kind": "coalesced"}
    with pytest.raises(NotFound, match="no section 'missing'"):
        blob.section("missing")


def test_empty_sections_mapping():
    blob = decode_blob(encode_blob({}, sections={}))
    assert blob.sections == {} and blob.payload.nbytes == 0


def test_header_checks_need_only_the_header_bytes():
    data = encode_blob({"kind": "k"}, random_bytes(10_000))
    info = read_header(data[:header_size(data[:PREFIX_SIZE])])
    assert info.header == {"kind": "k"}
    assert info.total_len == len(data) and info.payload_len == 10_000
    assert info.header_end + info.payload_len + TRAILER_SIZE == len(data)


def test_header_size_asks_for_the_prefix_first():
    data = encode_blob({"k": "x" * 5000}, b"")
    assert header_size(b"") == PREFIX_SIZE
    assert header_size(data[:3]) == PREFIX_SIZE
    assert header_size(data[:PREFIX_SIZE]) == read_header(data).header_end
    with pytest.raises(CorruptData, match="magic"):
        header_size(b"TX")


# -------------------------------------------------------------- sections by range
class RangeReader:
    """A fetch_range(start, end) over bytes that counts the calls, like ranged GETs."""

    def __init__(self, data: bytes) -> None:
        self.data, self.calls = data, []

    def __call__(self, start: int, end: int) -> bytes:
        self.calls.append((start, end))
        return self.data[start:end]


def test_fetch_header_and_sections_by_range():
    sections = {f"list/{i}": random_bytes(1000 + i, seed=i) for i in range(50)}
    data = encode_blob({"kind": "coalesced"}, sections=sections, align=64)
    reader = RangeReader(data)
    info = fetch_header(reader, first_read=8192)
    assert len(reader.calls) == 1  # the whole header fitted in the first read
    for name in ("list/0", "list/31", "list/49"):
        assert bytes(fetch_section(reader, info, name)) == sections[name]
    assert sum(end - start for start, end in reader.calls[1:]) == 1000 + 1031 + 1049


def test_fetch_header_reads_twice_when_header_is_large():
    data = encode_blob({"big": "x" * 10_000}, b"payload")
    reader = RangeReader(data)
    assert fetch_header(reader, first_read=64).header == {"big": "x" * 10_000}
    assert reader.calls == [(0, 64), (64, read_header(data).header_end)]


def test_fetch_header_of_a_blob_shorter_than_the_first_read():
    data = encode_blob({"k": 1}, b"tiny")
    reader = RangeReader(data)
    assert fetch_header(reader).total_len == len(data) and len(reader.calls) == 1


def test_fetch_header_of_a_torn_header_raises():
    data = encode_blob({"big": "x" * 10_000}, b"")
    with pytest.raises(CorruptData, match="truncated"):
        fetch_header(RangeReader(data[:5000]), first_read=4096)


def test_verify_section_detects_flips_and_wrong_ranges():
    data = encode_blob({}, sections=SECTIONS)
    info = read_header(data)
    sec = info.section("list/2")
    good = data[sec.offset:sec.end]
    assert bytes(verify_section(info, "list/2", good)) == SECTIONS["list/2"]
    for pos in range(len(good)):
        with pytest.raises(CorruptData, match="checksum mismatch"):
            verify_section(info, "list/2", flipped(good, pos))
    with pytest.raises(CorruptData, match="declares"):
        verify_section(info, "list/2", good[:-1])
    with pytest.raises(CorruptData, match="declares"):
        verify_section(info, "list/2", data[sec.offset:sec.end + 1])
    with pytest.raises(CorruptData):
        verify_section(info, "list/0", data[sec.offset:sec.offset + 5])  # the wrong section's bytes
    with pytest.raises(NotFound):
        verify_section(info, "nope", good)


# ------------------------------------------------------------------- corruption
SMALL_BLOBS = {
    "payload": encode_blob({"kind": "kv", "shape": [2, 3]}, b"0123456789abcdef" * 4),
    "empty": encode_blob({}),
    "sections": encode_blob({"kind": "c"}, sections=SECTIONS, align=64),
}


@pytest.mark.parametrize("name", SMALL_BLOBS)
def test_every_single_byte_flip_is_detected(name):
    data = SMALL_BLOBS[name]
    for pos in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            with pytest.raises(CorruptData):
                decode_blob(flipped(data, pos, mask))
            if pos < read_header(data).header_end:
                with pytest.raises(CorruptData):
                    read_header(flipped(data, pos, mask))


@pytest.mark.parametrize("name", SMALL_BLOBS)
def test_every_truncation_is_detected(name):
    data = SMALL_BLOBS[name]
    for length in range(len(data)):
        with pytest.raises(CorruptData):
            decode_blob(data[:length])


@pytest.mark.parametrize("extra", [b"\x00", b"garbage", bytes(4096)])
def test_appended_bytes_are_detected(extra):
    with pytest.raises(CorruptData, match="extra bytes"):
        decode_blob(SMALL_BLOBS["payload"] + extra)


def test_random_flips_in_a_large_blob():
    data = bytearray(encode_blob({"kind": "big"}, random_bytes(8 << 20, seed=7)))
    rng = np.random.default_rng(3)
    positions = np.concatenate([rng.integers(0, len(data), 300), [len(data) - 1, len(data) // 2]])
    for pos in positions:
        mask = int(rng.integers(1, 256))
        data[pos] ^= mask
        with pytest.raises(CorruptData):
            decode_blob(data)
        data[pos] ^= mask
    decode_blob(data)  # restored: valid again


def test_error_messages_say_what_failed_and_what_to_do():
    data = SMALL_BLOBS["payload"]
    info = read_header(data)
    cases = {
        b"XSBL" + data[4:]: "wrong magic",
        data[:4] + bytes([FORMAT_VERSION + 1]) + data[5:]: "unknown format version 2",
        data[:5] + b"\x01" + data[6:]: "unknown flags",
        data[:10]: "truncated",
        data[:-1]: "truncated",
        data + b"!": "extra bytes",
        flipped(data, PREFIX_SIZE + 2): "header checksum mismatch",
        flipped(data, info.header_end): "payload checksum mismatch",
        flipped(data, len(data) - 1): "payload checksum mismatch",
    }
    for bad, problem in cases.items():
        with pytest.raises(CorruptData, match=problem) as err:
            decode_blob(bad, source="ivf/list-17")
        assert "'ivf/list-17'" in str(err.value)
        assert "corrupt or was torn; rewrite it from its source" in str(err.value)


def forge(header_bytes: bytes, payload: bytes = b"") -> bytes:
    """A blob with valid checksums around arbitrary header bytes (a buggy writer)."""
    import xxhash

    fixed = struct.pack("<4sBBHIQ", MAGIC, FORMAT_VERSION, 0, 0, len(header_bytes), len(payload))
    check = xxhash.xxh3_64_intdigest(fixed + header_bytes)
    return (fixed + struct.pack("<Q", check) + header_bytes + payload
            + struct.pack("<Q", xxhash.xxh3_64_intdigest(payload)))


@pytest.mark.parametrize("header_bytes, problem", [
    (b"not json", "not valid UTF-8 JSON"),
    (b"\xff\xfe", "not valid UTF-8 JSON"),
    (b"[1, 2]", "not an object with a 'header'"),
    (b'{"header": 3}', "not an object with a 'header'"),
    (b'{"header": {}, "sections": []}', "section table is not"),
    (b'{"header": {}, "sections": {"a": [0, 1]}}', "malformed"),
    (b'{"header": {}, "sections": {"a": [0, 1, "zzzzzzzzzzzzzzzz"]}}', "malformed"),
    (b'{"header": {}, "sections": {"a": [true, 1, "0000000000000000"]}}', "malformed"),
    (b'{"header": {}, "sections": {"a": [0, 9, "0000000000000000"]}}', "outside the payload"),
    (b'{"header": {}, "sections": {"a": [0, 2, "0000000000000000"], "b": [1, 2, "0000000000000000"]}}',
     "overlaps"),
])
def test_well_checksummed_but_malformed_headers_are_corrupt(header_bytes, problem):
    with pytest.raises(CorruptData, match=problem):
        decode_blob(forge(header_bytes, b"abcd"))


def test_header_is_parsed_as_json_only():
    blob = decode_blob(forge(b'{"header": {"x": "__import__(\'os\')"}}'))
    assert blob.header == {"x": "__import__('os')"}


# ------------------------------------------------------------------- bad input
@pytest.mark.parametrize("header, exc", [
    (None, InvalidType), ([1], InvalidType), ("{}", InvalidType),
    ({"x": object()}, InvalidType), ({"x": b"bytes"}, InvalidType), ({1: "a", "b": 2}, InvalidType),
    ({"x": float("nan")}, InvalidArgument), ({"x": float("inf")}, InvalidArgument),
    ({"x": "\ud800"}, InvalidArgument),
])
def test_bad_headers_are_rejected(header, exc):
    with pytest.raises(exc):
        encode_blob(header, b"")


def test_circular_header_is_rejected():
    header: dict = {}
    header["self"] = header
    with pytest.raises(InvalidArgument):
        encode_blob(header)


@pytest.mark.parametrize("kwargs, exc", [
    ({"payload": "text"}, InvalidType),
    ({"payload": 5}, InvalidType),
    ({"payload": np.arange(10)[::2]}, InvalidArgument),
    ({"payload": b"x", "sections": {"a": b"y"}}, InvalidArgument),
    ({"sections": [b"a"]}, InvalidType),
    ({"sections": {1: b"a"}}, InvalidType),
    ({"sections": {"": b"a"}}, InvalidArgument),
    ({"sections": {"a": "text"}}, InvalidType),
    ({"payload": b"x", "align": 3}, InvalidArgument),
    ({"payload": b"x", "align": 8192}, InvalidArgument),
    ({"payload": b"x", "align": True}, InvalidArgument),
])
def test_bad_encode_arguments_are_rejected(kwargs, exc):
    with pytest.raises(exc):
        encode_blob({}, **kwargs)


def test_decode_rejects_non_bytes():
    with pytest.raises(InvalidType):
        decode_blob("TSBL...")
    with pytest.raises(InvalidType):
        decode_blob(None)


def test_blob_repr_is_short():
    text = repr(decode_blob(encode_blob({"k": 1}, bytes(1 << 20))))
    assert text.startswith("Blob(") and "payload_len=1048576" in text and len(text) < 300


def test_layout_matches_the_documented_table():
    data = encode_blob({"a": 1}, b"xyz", align=1)
    assert data[:4] == MAGIC and data[4] == FORMAT_VERSION and data[5:8] == b"\x00\x00\x00"
    header_len, payload_len = struct.unpack_from("<IQ", data, 8)
    assert json.loads(data[PREFIX_SIZE:PREFIX_SIZE + header_len]) == {"header": {"a": 1}}
    assert payload_len == 3 and data[PREFIX_SIZE + header_len:][:3] == b"xyz"
    assert len(data) == PREFIX_SIZE + header_len + payload_len + TRAILER_SIZE


# -------------------------------------------------------------------- properties
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)
headers = st.dictionaries(st.text(), json_values, max_size=5)
section_maps = st.dictionaries(st.text(min_size=1), st.binary(max_size=200), max_size=6)


@settings(max_examples=200, deadline=None)
@given(header=headers, payload=st.binary(max_size=2000), align=st.sampled_from([1, 8, 64]))
def test_property_round_trip(header, payload, align):
    blob = decode_blob(encode_blob(header, payload, align=align))
    assert blob.header == header and bytes(blob.payload) == payload


@settings(max_examples=200, deadline=None)
@given(header=headers, sections=section_maps)
def test_property_sections_round_trip(header, sections):
    data = encode_blob(header, sections=sections, align=64)
    blob = decode_blob(data)
    info = read_header(data)
    assert blob.header == header
    for name, value in sections.items():
        assert bytes(blob.section(name)) == value
        sec = info.section(name)
        assert bytes(verify_section(info, name, data[sec.offset:sec.end])) == value


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=headers, payload=st.binary(max_size=500), sections=st.none() | section_maps,
       data=st.data())
def test_property_corruption_is_detected(header, payload, sections, data):
    blob = encode_blob(header, None if sections is not None else payload, sections=sections)
    kind = data.draw(st.sampled_from(["flip", "truncate", "append"]))
    if kind == "flip":
        pos = data.draw(st.integers(0, len(blob) - 1))
        bad = flipped(blob, pos, data.draw(st.integers(1, 255)))
    elif kind == "truncate":
        bad = blob[:data.draw(st.integers(0, len(blob) - 1))]
    else:
        bad = blob + data.draw(st.binary(min_size=1, max_size=64))
    with pytest.raises(CorruptData):
        decode_blob(bad)


def test_blob_is_frozen():
    blob = decode_blob(encode_blob({}, b"a"))
    assert isinstance(blob, Blob)
    with pytest.raises(AttributeError):
        blob.header = {}  # type: ignore[misc]
