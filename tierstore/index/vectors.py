"""Full-precision vectors for exact reranking, stored apart from the posting lists.

Rows (the index's internal numbering: row ``r`` is the ``r``-th vector ever added) are
written in *chunks*, framed blobs under ``"{prefix}/vec/{chunk:08d}"`` holding rows
``first_row .. first_row + count - 1``. A chunk has a ``records`` section where each row
is its float32 vector followed by the xxh3_64 of those bytes, so a reader can fetch any
one row by range and still detect damage; and, when rows have attributes, an
``attr_rows`` section (each row's attributes as compact JSON, ``null`` when none, joined
by commas: the section inside brackets is the JSON list of all rows), ``attr_offsets``
(int64, rows + 1: row ``i`` is bytes ``[off[i], off[i + 1] - 1)``) and ``attr_sums``
(xxh3_64 of each row's JSON), so :meth:`VectorStore.attributes_of` reads and checks only
the rows asked for, by range. (Chunks written before that hold one ``attributes`` JSON
list, still read.) Chunks are written once and never rewritten; rows of deleted vectors
stay until a rebuild compacts them.

Rerank reads go through :meth:`VectorStore.read_rows`: the candidate rows of a query
(or a batch) become ranged reads, adjacent rows merged, issued in one
:meth:`~tierstore.tiers.base.BaseTier.get_ranges` round. A :class:`VectorStore` that
was :meth:`~VectorStore.load_all`-ed answers from memory instead.
"""

from __future__ import annotations

import functools
import json

import numpy as np
from xxhash import xxh3_64_intdigest

from ..errors import CorruptData
from ..store._json import dumps_json
from ..store.blob import decode_blob, encode_blob, fetch_header, fetch_section, read_header

__all__ = ["VectorStore"]

_CHECK = 8
# Vector chunks hold about this many bytes of records. A rerank reads a few rows of many
# chunks by range; on LMDB each read costs in proportion to the whole value's size
# (py-lmdb 3.0: ~1.8 us per MB, measured), so 24 MB chunks made a 1.5 KB read cost ~48 us
# and a tiered rerank of 120 rows ~3 ms. 4 MiB keeps the reads cheap (~7 us) and the
# manifest's chunk list short (~250 chunks for 1M 384-dim vectors); S3 and files read
# ranges at any chunk size.
CHUNK_BYTES = 4 << 20


class VectorStore:
    """The vector chunks of one collection (see the module docstring)."""

    def __init__(self, tier, prefix: str, dim: int, *, chunks: dict | None = None, coalesce_gap: int = 0,
                 key_suffix: str = "") -> None:
        self.tier = tier
        self.key_suffix = key_suffix  # new chunk keys end with it: writers never overwrite each other's
        self.coalesce_gap = coalesce_gap
        self.prefix = prefix
        self.dim = dim
        self.record_bytes = dim * 4 + _CHECK
        state = chunks or {"keys": [], "first_row": [], "count": [], "offset": []}
        self.keys: list[str] = list(state["keys"])
        self.first_row = np.asarray(state["first_row"], dtype=np.int64)
        self.count = np.asarray(state["count"], dtype=np.int64)
        self.offset = np.asarray(state["offset"], dtype=np.int64)
        self.resident: np.ndarray | None = None
        self.reads = 0  # ranged reads issued by read_rows (rerank), for statistics
        self._attr_index: dict[int, tuple | None] = {}

    # ----------------------------------------------------------------- persistence
    def state(self) -> dict:
        return {"keys": list(self.keys), "first_row": self.first_row.tolist(), "count": self.count.tolist(),
                "offset": self.offset.tolist()}

    @property
    def rows(self) -> int:
        return int(self.first_row[-1] + self.count[-1]) if self.keys else 0

    def append(self, vectors: np.ndarray, attributes: list | None = None, *, chunk_rows: int | None = None) -> None:
        """Write ``vectors`` as the next rows, in chunks of at most ``chunk_rows`` (default: about
        ``CHUNK_BYTES`` of records)."""
        if chunk_rows is None:
            chunk_rows = max(256, CHUNK_BYTES // self.record_bytes)
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        first = self.rows
        items, placed = [], []
        for a in range(0, vectors.shape[0], chunk_rows):
            part = vectors[a:a + chunk_rows]
            records = np.empty((part.shape[0], self.record_bytes), dtype=np.uint8)
            records[:, :self.dim * 4] = part.view(np.uint8).reshape(part.shape[0], -1)
            sums = np.fromiter((xxh3_64_intdigest(row) for row in records[:, :self.dim * 4]),
                               dtype=np.uint64, count=part.shape[0])
            records[:, self.dim * 4:] = sums.astype("<u8").view(np.uint8).reshape(-1, _CHECK)
            sections = {"records": records}
            if attributes is not None:
                sections.update(_attribute_sections(attributes[a:a + chunk_rows]))
            number = len(self.keys) + len(items)
            key = f"{self.prefix}/vec/{number:08d}{self.key_suffix}"
            blob = encode_blob({"kind": "vector-chunk", "format": 1, "first_row": first + a,
                                "count": int(part.shape[0]), "dim": self.dim}, sections=sections, align=64)
            items.append((key, blob))
            placed.append((key, first + a, part.shape[0], read_header(blob, source=key).section("records").offset))
        if items:
            self.tier.put_many(items)
        for key, row, count, offset in placed:
            self.keys.append(key)
            self.first_row = np.append(self.first_row, row)
            self.count = np.append(self.count, count)
            self.offset = np.append(self.offset, offset)
        if self.resident is not None:
            self.resident = np.concatenate([self.resident, vectors])

    # --------------------------------------------------------------------- reads
    def load_all(self) -> np.ndarray:
        """Read every chunk (verified) and keep the vectors resident; return them."""
        if self.resident is None:
            out = np.empty((self.rows, self.dim), dtype=np.float32)
            values = self.tier.get_many(self.keys)
            for key, value, row, count in zip(self.keys, values, self.first_row.tolist(), self.count.tolist()):
                if value is None:
                    raise CorruptData(f"vector chunk {key!r} is missing; the collection is damaged")
                records = np.frombuffer(decode_blob(value, source=key).section("records"), dtype=np.uint8)
                out[row:row + count] = records.reshape(count, self.record_bytes)[:, :self.dim * 4].view("<f4")
            self.resident = out
        return self.resident

    def attributes(self) -> list:
        """Every row's attributes (None where none were given), reading the chunks."""
        out: list = []
        values = self.tier.get_many(self.keys)
        for key, value, count in zip(self.keys, values, self.count.tolist()):
            if value is None:
                raise CorruptData(f"vector chunk {key!r} is missing; the collection is damaged")
            blob = decode_blob(value, source=key)
            if "attr_rows" in blob.sections:
                out.extend(json.loads(b"[" + bytes(blob.section("attr_rows")) + b"]"))
            elif "attributes" in blob.sections:
                out.extend(json.loads(bytes(blob.section("attributes"))))
            else:
                out.extend([None] * count)
        return out

    def _attribute_index(self, chunk: int):
        """``(attr_rows start, offsets, sums)`` of a chunk, ``None`` when it has no per-row
        attributes (legacy or none); read by range once, then kept (16 bytes a row)."""
        found = self._attr_index.get(chunk)
        if found is None and chunk not in self._attr_index:
            key = self.keys[chunk]
            info = fetch_header(functools.partial(self.tier.get_range, key), source=key)
            if "attr_offsets" in info.sections:
                offsets_raw = fetch_section(functools.partial(self.tier.get_range, key), info, "attr_offsets",
                                            source=key)
                sums_raw = fetch_section(functools.partial(self.tier.get_range, key), info, "attr_sums", source=key)
                found = (info.section("attr_rows").offset, np.frombuffer(offsets_raw, "<i8").copy(),
                         np.frombuffer(sums_raw, "<u8").copy())
            self._attr_index[chunk] = found
        return found

    def attributes_of(self, rows: np.ndarray) -> list:
        """The attributes of ``rows`` (any order), reading and checking only those rows' JSON by range."""
        rows = np.asarray(rows, dtype=np.int64)
        chunk = np.searchsorted(self.first_row, rows, side="right") - 1
        out: list = [None] * rows.size
        requests, slots = [], []
        for i, (row, c) in enumerate(zip(rows.tolist(), chunk.tolist())):
            index = self._attribute_index(c)
            if index is None:
                continue
            start, offsets, _ = index
            local = row - int(self.first_row[c])
            requests.append((self.keys[c], start + int(offsets[local]), start + int(offsets[local + 1]) - 1))
            slots.append((i, c, local))
        for (i, c, local), data in zip(slots, self.tier.get_ranges(requests) if requests else []):
            if xxh3_64_intdigest(data) != int(self._attr_index[c][2][local]):
                raise CorruptData(f"vector chunk {self.keys[c]!r}: the attributes of row {local} fail their "
                                  "checksum; the collection is damaged")
            out[i] = json.loads(data)
        legacy = [i for i, c in enumerate(chunk.tolist()) if self._attr_index.get(c) is None]
        if legacy:
            every = self._legacy_attributes(sorted({int(chunk[i]) for i in legacy}))
            for i in legacy:
                out[i] = every[int(chunk[i])][int(rows[i] - self.first_row[chunk[i]])]
        return out

    def _legacy_attributes(self, chunks: list[int]) -> dict[int, list]:
        """Whole-chunk attribute lists of chunks without per-row attributes (or without any)."""
        parsed: dict[int, list] = {}
        for c, value in zip(chunks, self.tier.get_many([self.keys[c] for c in chunks])):
            if value is None:
                raise CorruptData(f"vector chunk {self.keys[c]!r} is missing; the collection is damaged")
            blob = decode_blob(value, source=self.keys[c])
            parsed[c] = (json.loads(bytes(blob.section("attributes"))) if "attributes" in blob.sections
                         else [None] * int(self.count[c]))
        return parsed

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Vectors of ``rows`` (any order, repeats allowed) as ``(len(rows), dim)`` float32."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.resident is not None:
            return self.resident[rows]
        out = np.empty((rows.size, self.dim), dtype=np.float32)
        if rows.size == 0:
            return out
        wanted = np.unique(rows)
        chunk = np.searchsorted(self.first_row, wanted, side="right") - 1
        start = self.offset[chunk] + (wanted - self.first_row[chunk]) * self.record_bytes
        # One read per run of rows, runs closer than coalesce_gap bytes merged (rows of one
        # posting list are neighbours: the build numbers them list by list).
        gap_rows = self.coalesce_gap // self.record_bytes
        breaks = np.ones(wanted.size, dtype=bool)
        breaks[1:] = (chunk[1:] != chunk[:-1]) | (wanted[1:] - wanted[:-1] > gap_rows + 1)
        firsts = np.flatnonzero(breaks)
        lasts = np.append(firsts[1:], wanted.size)
        requests = [(self.keys[int(chunk[a])], int(start[a]), int(start[b - 1]) + self.record_bytes)
                    for a, b in zip(firsts.tolist(), lasts.tolist())]
        chunks = self.tier.get_ranges(requests)
        self.reads += len(requests)
        pieces = []
        for (_, begin, _), data, a, b in zip(requests, chunks, firsts.tolist(), lasts.tolist()):
            rel = ((start[a:b] - begin)[:, None] + np.arange(self.record_bytes)).ravel()
            pieces.append(np.frombuffer(data, dtype=np.uint8)[rel])
        records = np.concatenate(pieces).reshape(wanted.size, self.record_bytes)
        body = records[:, :self.dim * 4]
        sums = records[:, self.dim * 4:].copy().view("<u8")[:, 0]
        for i in range(wanted.size):  # xxh3 has no vectorised form; ~0.2 us per 1.5 KB row
            if xxh3_64_intdigest(body[i]) != int(sums[i]):
                raise CorruptData(f"vector row {int(wanted[i])} fails its checksum; the collection is damaged")
        vectors = body.copy().view("<f4")
        out[:] = vectors[np.searchsorted(wanted, rows)]
        return out

    def resident_bytes(self) -> int:
        return 0 if self.resident is None else int(self.resident.nbytes)


def _attribute_sections(attributes) -> dict[str, object]:
    """The per-row attribute sections of one chunk (see the module docstring)."""
    # frozen WAL attributes (read-only mappings) and plain dicts alike
    encoded = [dumps_json(a) for a in attributes]
    offsets = np.zeros(len(encoded) + 1, dtype="<i8")
    np.cumsum([len(e) + 1 for e in encoded], out=offsets[1:])
    sums = np.fromiter((xxh3_64_intdigest(e) for e in encoded), dtype="<u8", count=len(encoded))
    return {"attr_rows": b",".join(encoded), "attr_offsets": offsets, "attr_sums": sums}
