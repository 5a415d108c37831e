"""The KV chunk blob: every layer of one chunk's encoded KV in one checked object.

A chunk (``tokens`` consecutive tokens of one sequence) is stored as one blob
(:mod:`tierstore.store.blob`) so that a whole-chunk load is one read, one checksum pass
and no per-layer parsing: the header describes one layer's tensors once (all layers of
a chunk share codec, shape and dtype) and the payload holds one section per layer,
named ``"<layer>"``, on a 64-byte boundary and with its own checksum, so
:func:`layer_range` lets a reader fetch only some layers by range (layer-by-layer
loading) and verify them without the rest. Inside a layer's section the codec's tensors
follow one another in the header's order, each starting on a 64-byte boundary
(:func:`tensor_offsets`).

Header (the ``header`` object of the blob)::

    {"kind": "kv_chunk", "kv_format": 1, "codec": "int8", "options": {...},
     "shape": [kv_heads, tokens, head_dim], "dtype": "float16", "layers": 32,
     "position": 0, "tensors": {"k_q": ["int8", [h, n, d]], ...}}

``position`` is the position of the chunk's first token when its KV was computed
(RoPE keys carry it; re-rotation on reuse needs it). Decoding validates the header
against the codec's own layout, so a blob from another codec, shape or dtype is
:class:`~tierstore.errors.CorruptData`, never misread.

Zero copy: :func:`decode_chunk` views the payload in place (``borrow=True``) when the
caller owns the bytes (a fresh read from LMDB, a file or S3); otherwise the payload is
copied once into a fresh buffer so returned tensors never alias a cache's memory.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..._optional import torch as _torch
from ...errors import CorruptData, InvalidArgument, TierstoreError
from ..blob import BlobHeader, decode_blob, encode_blob, read_header, verify_section
from .codecs import _STORED_DTYPES, _INPUT_DTYPES, KV_FORMAT_VERSION, EncodedLayer, KVCodec, _tdtype, get_codec

__all__ = ["ChunkHeader", "chunk_header", "encode_chunk", "decode_chunk", "chunk_payload", "decode_payload", "read_chunk_header", "layer_range",
           "decode_layers", "verify_layer", "tensor_offsets"]

_KIND = "kv_chunk"
_ALIGN = 64
_frombuffer_lock = threading.Lock()


@dataclass(frozen=True)
class ChunkHeader:
    """What a chunk blob holds (from its header); ``info`` locates its sections."""

    codec: KVCodec
    shape: tuple[int, int, int]
    dtype: str
    layers: int
    position: int
    tensors: dict[str, tuple[str, list[int]]]
    info: BlobHeader

    @property
    def tokens(self) -> int:
        return self.shape[1]


def tensor_offsets(tensors: dict[str, tuple[str, list[int]]]) -> tuple[list[tuple[str, str, list[int], int, int]], int]:
    """``[(name, dtype, shape, offset, nbytes)]`` of a layer's tensors in its section, and the section length."""
    out, pos = [], 0
    for name, (dt, shape) in tensors.items():
        pos += -pos % _ALIGN
        nbytes = math.prod(shape) * _STORED_DTYPES[dt]
        out.append((name, dt, list(shape), pos, nbytes))
        pos += nbytes
    return out, pos


def encode_chunk(layers: Sequence[EncodedLayer], *, position: int = 0) -> bytes:
    """One blob holding ``layers`` (all encoded by one codec, one shape and dtype)."""
    if not layers:
        raise InvalidArgument("a KV chunk needs at least one layer")
    first = layers[0]
    for i, layer in enumerate(layers):
        if (layer.codec, dict(layer.options), layer.shape, layer.dtype) != \
                (first.codec, dict(first.options), first.shape, first.dtype):
            raise InvalidArgument(f"layer {i} is {layer.codec} {layer.shape} {layer.dtype}, layer 0 is "
                                  f"{first.codec} {first.shape} {first.dtype}: one chunk holds one layout")
    torch = _torch()
    table = {name: [_dtype_name(t.dtype), list(t.shape)] for name, t in first.tensors.items()}
    offsets, length = tensor_offsets(table)
    sections: dict[str, Any] = {}
    for i, layer in enumerate(layers):
        buf = torch.zeros(length, dtype=torch.uint8)
        for name, _, _, offset, nbytes in offsets:
            if nbytes:
                t = layer.tensors[name].detach().to("cpu").contiguous()
                buf[offset:offset + nbytes] = t.reshape(-1).view(torch.uint8)
        sections[str(i)] = buf.numpy()
    header = {"kind": _KIND, "kv_format": KV_FORMAT_VERSION, "codec": first.codec, "options": dict(first.options),
              "shape": list(first.shape), "dtype": first.dtype, "layers": len(layers), "position": int(position),
              "tensors": table}
    return encode_blob(header, sections=sections, align=_ALIGN)


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def chunk_header(info: BlobHeader, source: str | None = None) -> ChunkHeader:
    """Check a chunk blob's parsed blob header (from :func:`~tierstore.store.blob.fetch_header`, say)."""
    h = info.header
    where = f"KV chunk {source!r}" if source else "KV chunk"
    try:
        if h.get("kind") != _KIND:
            raise ValueError(f"not a KV chunk blob (kind {h.get('kind')!r})")
        if h.get("kv_format") != KV_FORMAT_VERSION:
            raise ValueError(f"KV format {h.get('kv_format')!r}; this reader knows {KV_FORMAT_VERSION}")
        shape, layers, position = h["shape"], h["layers"], h["position"]
        if (not isinstance(shape, list) or len(shape) != 3
                or not all(type(s) is int and s > 0 for s in shape)):
            raise ValueError(f"bad shape {shape!r}")
        if type(layers) is not int or layers < 1 or type(position) is not int or position < 0:
            raise ValueError(f"bad layers {layers!r} or position {position!r}")
        if h["dtype"] not in _INPUT_DTYPES or not isinstance(h["options"], dict):
            raise ValueError(f"bad dtype {h['dtype']!r} or options")
        codec, want, length = _expected_layout(h["codec"], h["options"], tuple(shape), h["dtype"])
        if h["tensors"] != want:
            raise ValueError(f"tensor table {h['tensors']!r:.300} does not match the codec's layout {want!r:.300}")
        if len(info.sections) != layers or any(str(i) not in info.sections for i in range(layers)):
            raise ValueError(f"{len(info.sections)} sections for {layers} layers")
        if any(sec.length != length for sec in info.sections.values()):
            raise ValueError(f"a layer section is not {length} bytes")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptData(f"{where}: {exc}") from None
    return ChunkHeader(codec, tuple(shape), h["dtype"], layers, position,
                       {n: (dt, s) for n, (dt, s) in want.items()}, info)


_LAYOUTS: dict[tuple, tuple[KVCodec, dict, int]] = {}


def _expected_layout(name: object, options: dict, shape: tuple, dtype: str) -> tuple[KVCodec, dict, int]:
    """The codec, its tensor table and the layer section length for this header (memoised)."""
    try:
        memo_key = (name, tuple(sorted(options.items())), shape, dtype)
        hash(memo_key)
    except TypeError:  # an option value that is not a scalar: a damaged header, not memoised
        memo_key = None
    found = _LAYOUTS.get(memo_key) if memo_key is not None else None
    if found is None:
        try:
            codec = get_codec(name, **options)
        except TierstoreError as exc:
            raise ValueError(f"bad codec or options: {exc}") from None
        want = {n: [dt, list(s)] for n, (dt, s) in codec.layout(shape, dtype).items()}
        found = (codec, want, tensor_offsets(want)[1])
        if memo_key is not None and len(_LAYOUTS) < 1024:
            _LAYOUTS[memo_key] = found
    return found


def read_chunk_header(data: object, *, source: str | None = None) -> ChunkHeader:
    """Parse and check a chunk's header from its first bytes (see :func:`~tierstore.store.blob.header_size`)."""
    return chunk_header(read_header(data, source=source), source)


def layer_range(header: ChunkHeader, layer: int) -> tuple[int, int]:
    """``[start, end)`` of ``layer``'s section in the chunk blob."""
    if not 0 <= layer < header.layers:
        raise InvalidArgument(f"layer {layer} is outside the chunk's {header.layers} layers")
    sec = header.info.sections[str(layer)]
    return sec.offset, sec.end


def verify_layer(header: ChunkHeader, layer: int, data: object, *, source: str | None = None) -> memoryview:
    """Check the bytes of ``layer``'s section read by range; :class:`CorruptData` if damaged."""
    return verify_section(header.info, str(layer), data, source=source)


def _as_tensor(buffer: object, borrow: bool):
    """A uint8 tensor over ``buffer``: in place when borrowed, else over a fresh copy."""
    torch = _torch()
    view = memoryview(buffer).cast("B")
    if not view.nbytes:
        return torch.empty(0, dtype=torch.uint8)
    if not borrow:
        return torch.frombuffer(bytearray(view), dtype=torch.uint8)
    if not view.readonly:
        return torch.frombuffer(view, dtype=torch.uint8)
    # The caller owns these bytes (a fresh read nobody else holds): view them in place.
    # torch warns that it cannot mark the tensor read-only; the warning is expected here.
    with _frombuffer_lock, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(view, dtype=torch.uint8)


def _layer_tensors(header: ChunkHeader, sections: Sequence[Any]) -> list[dict[str, Any]]:
    """Per layer, ``{name: tensor}`` viewed in that layer's uint8 section tensor (no copy)."""
    torch = _torch()
    offsets, length = tensor_offsets(header.tensors)
    per_layer: list[dict[str, Any]] = [{} for _ in sections]
    for name, dt, shape, offset, nbytes in offsets:
        tdt = _tdtype(dt)
        if nbytes == 0:  # an empty tensor (no residual tokens, say), on the sections' device
            for d, sec in zip(per_layer, sections):
                d[name] = torch.empty(shape, dtype=tdt, device=sec.device)
            continue
        for d, sec in zip(per_layer, sections):
            d[name] = sec[offset:offset + nbytes].view(tdt).reshape(shape)
    return per_layer


def _strided_layer_tensors(header: ChunkHeader, payload, first: int, stride: int) -> list[dict[str, Any]]:
    """As :func:`_layer_tensors` for a whole payload whose layer sections lie ``stride`` bytes apart.

    Each tensor name is cut for every layer at once with one strided view of the
    payload, and each layer's tensor is then one index: far fewer torch calls.
    """
    torch = _torch()
    offsets, _ = tensor_offsets(header.tensors)
    per_layer: list[dict[str, Any]] = [{} for _ in range(header.layers)]
    for name, dt, shape, offset, nbytes in offsets:
        tdt = _tdtype(dt)
        size = _STORED_DTYPES[dt]
        if nbytes == 0 or (first + offset) % size or stride % size:
            for d, i in zip(per_layer, range(header.layers)):
                start = first + i * stride + offset
                d[name] = payload[start:start + nbytes].view(tdt).reshape(shape) if nbytes else \
                    torch.empty(shape, dtype=tdt, device=payload.device)
            continue
        typed = payload[:payload.numel() - payload.numel() % size].view(tdt)
        inner = [math.prod(shape[j + 1:]) for j in range(len(shape))]
        stacked = typed.as_strided([header.layers, *shape], [stride // size, *inner], (first + offset) // size)
        for d, tensor in zip(per_layer, stacked.unbind(0)):
            d[name] = tensor
    return per_layer


def _decode(header: ChunkHeader, tensors_per_layer: list[dict[str, Any]], device, dtype) -> list[tuple[Any, Any]]:
    codec = header.codec
    out_dtype = _tdtype(header.dtype) if dtype is None else dtype
    result = []
    for tensors in tensors_per_layer:
        if device is not None:
            tensors = {n: t.to(device, non_blocking=True) for n, t in tensors.items()}
        k, v = codec._decode(tensors, header.shape, header.dtype)
        if k.dtype != out_dtype:
            k, v = k.to(out_dtype), v.to(out_dtype)
        result.append((k, v))
    return result


def decode_layers(header: ChunkHeader, sections: Sequence[object], *, device=None, dtype=None,
                  borrow: bool = False) -> list[tuple[Any, Any]]:
    """``(key, value)`` of layers from their verified section bytes (see :func:`verify_layer`)."""
    views = [_as_tensor(sec, borrow) for sec in sections]
    return _decode(header, _layer_tensors(header, views), device, dtype)


def chunk_payload(data: object, *, source: str | None = None, borrow: bool = False) -> tuple[ChunkHeader, Any]:
    """Verify a whole chunk blob: its header and its payload as one uint8 tensor (on the CPU;
    viewed in place when ``borrow``, else copied once). Raises :class:`CorruptData`."""
    blob = decode_blob(data, source=source)
    return chunk_header(blob.info, source), _as_tensor(blob.payload, borrow)


def decode_payload(header: ChunkHeader, payload: Any, *, dtype=None) -> list[tuple[Any, Any]]:
    """Every layer's ``(key, value)`` from a verified payload tensor, decoded on the payload's
    device (lossless codecs return views of ``payload``)."""
    base = header.info.header_end
    starts = [header.info.sections[str(i)].offset - base for i in range(header.layers)]
    stride = starts[1] - starts[0] if header.layers > 1 else 0
    if all(start == starts[0] + i * stride for i, start in enumerate(starts)):
        tensors = _strided_layer_tensors(header, payload, starts[0], stride)
    else:
        length = header.info.sections["0"].length
        tensors = _layer_tensors(header, [payload[start:start + length] for start in starts])
    return _decode(header, tensors, None, dtype)


def decode_chunk(data: object, *, source: str | None = None, device=None, dtype=None,
                 borrow: bool = False) -> tuple[ChunkHeader, list[tuple[Any, Any]]]:
    """Verify a whole chunk blob and decode every layer: ``(header, [(key, value), ...])``.

    ``device``/``dtype``: where the codec decodes (the payload moves there in one copy)
    and what it returns (default: the CPU, the dtype encoded). ``borrow=True`` views the payload in place (only for bytes
    nobody else holds); otherwise it is copied once. Raises :class:`CorruptData` for
    any damage.
    """
    # A move to another device copies anyway: view the bytes in place for it rather than
    # copying them on the host first (a 32 MiB chunk's copy into fresh, page-faulting memory
    # cost more than the transfer itself).
    off_host = device is not None and _torch().device(device).type != "cpu"
    header, payload = chunk_payload(data, source=source, borrow=borrow or off_host)
    if device is not None:
        # One transfer of the whole payload, then views on the device: far faster than a
        # copy per tensor per layer (thousands of small host-to-device copies).
        payload = payload.to(device)
    return header, decode_payload(header, payload, dtype=dtype)
