"""KV-cache codecs: one attention layer's keys and values as compact, checked bytes.

A layer's KV is a pair of torch tensors ``key`` and ``value`` of one shape
``(kv_heads, tokens, head_dim)`` and dtype float16, bfloat16 or float32, on any device.
A codec turns them into an :class:`EncodedLayer` (tensors still on that device: encoding
runs in torch where the data is) and back; :meth:`EncodedLayer.to_bytes` moves the
encoded tensors to the CPU and frames them as a checksummed blob
(:mod:`tierstore.store.blob`), :meth:`EncodedLayer.from_bytes` checks and reads one::

    codec = get_codec("int4", group_size=32, residual_tokens=16)
    data = codec.encode(key, value).to_bytes()
    key2, value2 = decode_layer(EncodedLayer.from_bytes(data), device="cuda")

Codecs (:func:`get_codec` names and options):

=========  ==========================================================================
``fp16``   lossless cast to float16 (bit-exact for float16 input; float32 input is
           rounded, values beyond float16 range are refused)
``bf16``   lossless cast to bfloat16 (bit-exact for bfloat16 input)
``int8``   symmetric int8, one absmax scale per (head, token), for keys and values
``int4``   KIVI: keys per channel (groups of ``group_size`` tokens), values per token
``int2``   (groups of ``group_size`` channels), asymmetric min/max; the
           ``residual_tokens`` most recent tokens are kept exact; ``group_size``
           defaults to 64 for int4 (3.55x smaller than fp16) and 32 for int2
``mixed``  the ``keep_ratio`` most salient tokens (by a per-token score such as the
           attention mass they receive; key L2 norm when none is given) kept exact,
           the others int4 KIVI; ``group_size``, ``residual_tokens`` as for int4
=========  ==========================================================================

"Exact" tokens (residual window, salient tokens) are kept in the input dtype when it
is 16-bit (bit-exact) and in float16 for float32 input. Scales and minima are float16
unless ``scale_dtype="float32"`` (needed only for values beyond float16's range).

``codec.key()`` names the codec, every option and the format version: put it in cache
keys, any option change changes it.

Blob header (``kind == "kv_layer"``)::

    {"kind": "kv_layer", "kv_format": 1, "codec": "int4",
     "options": {"group_size": 32, "residual_tokens": 0, "scale_dtype": "float16"},
     "shape": [kv_heads, tokens, head_dim], "dtype": "float16",
     "tensors": {"k_q": ["uint8", [n]], "k_scale": ["float16", [h, g, d]], ...}}

with one blob section per tensor holding its raw little-endian bytes (int4 packs two
codes a byte, int2 four, low bits first, over the flattened codes). Never pickle.
"""

from __future__ import annotations

import abc
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ..._optional import torch as _torch
from ...errors import CorruptData, InvalidArgument, InvalidType, TierstoreError
from ..blob import decode_blob, encode_blob

__all__ = ["get_codec", "decode_layer", "KVCodec", "EncodedLayer", "CODEC_NAMES", "KV_FORMAT_VERSION"]

KV_FORMAT_VERSION = 1
_KIND = "kv_layer"
_INPUT_DTYPES = ("float16", "bfloat16", "float32")
_STORED_DTYPES = {"float16": 2, "bfloat16": 2, "float32": 4, "uint8": 1, "int8": 1, "int32": 4}
_SCALE_DTYPES = ("float16", "float32")
# For bits_per_value: a typical layer shape (the estimate depends on it only slightly).
_NOMINAL_SHAPE = (8, 4096, 128)


def _tdtype(name: str):
    return getattr(_torch(), name)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _exact_dtype(input_dtype: str) -> str:
    """Where exact tokens are kept: the input dtype when 16-bit, else float16."""
    return input_dtype if input_dtype in ("float16", "bfloat16") else "float16"


# ============================================================== the encoded form
@dataclass(frozen=True, eq=False)
class EncodedLayer:
    """One layer's encoded KV: codec name and options, original shape/dtype, tensors.

    ``tensors`` maps names to torch tensors (on the device that encoded them, or the
    CPU after :meth:`from_bytes`). Read-only: build a new one to change anything.
    """

    codec: str
    options: Mapping[str, Any]
    shape: tuple[int, int, int]
    dtype: str
    tensors: Mapping[str, Any]

    @property
    def nbytes(self) -> int:
        """Bytes of the encoded tensors (what :meth:`to_bytes` writes, less the framing)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def device(self):
        for t in self.tensors.values():
            return t.device
        return _torch().device("cpu")

    def codec_key(self) -> str:
        return get_codec(self.codec, **self.options).key()

    def to(self, device) -> EncodedLayer:
        """The same layer with its tensors moved to ``device``."""
        return EncodedLayer(self.codec, self.options, self.shape, self.dtype,
                            MappingProxyType({n: t.to(device) for n, t in self.tensors.items()}))

    def to_bytes(self, *, align: int = 8) -> bytes:
        """The checked blob of this layer (tensors moved to the CPU, little-endian)."""
        if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts in use
            raise InvalidArgument("KV codecs write little-endian tensors; this host is big-endian")
        torch = _torch()
        table: dict[str, list] = {}
        sections: dict[str, bytes] = {}
        for name, t in self.tensors.items():
            t = t.detach().to("cpu").contiguous()
            table[name] = [_dtype_name(t.dtype), list(t.shape)]
            sections[name] = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header = {"kind": _KIND, "kv_format": KV_FORMAT_VERSION, "codec": self.codec,
                  "options": dict(self.options), "shape": list(self.shape), "dtype": self.dtype,
                  "tensors": table}
        return encode_blob(header, sections=sections, align=align)

    @classmethod
    def from_bytes(cls, data: object, *, source: str | None = None) -> EncodedLayer:
        """Check and read a blob written by :meth:`to_bytes`; :class:`CorruptData` if bad."""
        blob = decode_blob(data, source=source)
        where = f"KV layer {source!r}" if source else "KV layer"
        h = blob.header
        try:
            if not isinstance(h, dict) or h.get("kind") != _KIND:
                raise ValueError(f"not a KV layer blob (kind {h.get('kind') if isinstance(h, dict) else h!r})")
            if h.get("kv_format") != KV_FORMAT_VERSION:
                raise ValueError(f"KV format {h.get('kv_format')!r}; this reader knows {KV_FORMAT_VERSION}")
            shape = h["shape"]
            if (not isinstance(shape, list) or len(shape) != 3
                    or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
                raise ValueError(f"bad shape {shape!r}")
            if h["dtype"] not in _INPUT_DTYPES:
                raise ValueError(f"bad dtype {h['dtype']!r}")
            if not isinstance(h["options"], dict):
                raise ValueError("options is not an object")
            try:
                codec = get_codec(h["codec"], **h["options"])
            except TierstoreError as exc:
                raise ValueError(f"bad codec or options: {exc}") from None
            expected = codec.layout(tuple(shape), h["dtype"])
            table = h["tensors"]
            want = {n: [dt, list(s)] for n, (dt, s) in expected.items()}
            if table != want:
                raise ValueError(f"tensor table {table!r:.300} does not match the codec's layout {want!r:.300}")
            if set(blob.sections) != set(want):
                raise ValueError(f"sections {sorted(blob.sections)} do not match tensors {sorted(want)}")
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptData(f"{where}: {exc}") from None
        torch = _torch()
        tensors = {}
        for name, (dt, shp) in want.items():
            raw = blob.section(name)
            if raw.nbytes != math.prod(shp) * _STORED_DTYPES[dt]:
                raise CorruptData(f"{where}: section {name!r} has {raw.nbytes} bytes, "
                                  f"{dt}{shp} needs {math.prod(shp) * _STORED_DTYPES[dt]}")
            if raw.nbytes:
                t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(_tdtype(dt)).reshape(shp)
            else:
                t = torch.empty(shp, dtype=_tdtype(dt))
            tensors[name] = t
        return cls(codec.name, MappingProxyType(dict(codec.options)), tuple(shape), h["dtype"],
                   MappingProxyType(tensors))


# ============================================================== input checks
def _check_kv(key, value) -> tuple[tuple[int, int, int], str]:
    torch = _torch()
    for what, t in (("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise InvalidType(f"{what} must be a torch.Tensor of shape (kv_heads, tokens, head_dim), "
                              f"got {type(t).__name__}")
        if t.ndim != 3:
            raise InvalidArgument(f"{what} must have 3 dims (kv_heads, tokens, head_dim), got shape "
                                  f"{tuple(t.shape)}; reshape a batch-1 (1, heads, tokens, dim) cache with [0]")
        if _dtype_name(t.dtype) not in _INPUT_DTYPES:
            raise InvalidType(f"{what} has dtype {_dtype_name(t.dtype)}; KV codecs take "
                              f"{', '.join(_INPUT_DTYPES)}: cast it first")
        if min(t.shape) < 1:
            raise InvalidArgument(f"{what} has an empty dimension (shape {tuple(t.shape)}); "
                                  "store at least one token")
    if key.shape != value.shape:
        raise InvalidArgument(f"key shape {tuple(key.shape)} and value shape {tuple(value.shape)} differ; "
                              "they must match (kv_heads, tokens, head_dim)")
    if key.dtype != value.dtype:
        raise InvalidArgument(f"key dtype {_dtype_name(key.dtype)} and value dtype "
                              f"{_dtype_name(value.dtype)} differ; cast them to one dtype")
    if key.device != value.device:
        raise InvalidArgument(f"key is on {key.device} and value on {value.device}; move them to one device")
    for what, t in (("key", key), ("value", value)):
        if not bool(torch.isfinite(t).all()):
            raise InvalidArgument(f"{what} holds NaN or infinity; a KV cache of finite values only can be stored")
    return tuple(key.shape), _dtype_name(key.dtype)


def _to_exact(t, exact: str, what: str):
    """``t`` cast to the exact dtype, refusing values that overflow float16."""
    torch = _torch()
    out = t.to(_tdtype(exact))
    if exact == "float16" and t.dtype == torch.float32 and not bool(torch.isfinite(out).all()):
        raise InvalidArgument(f"{what} has values beyond float16's range (|x| > 65504); "
                              "use the bf16 codec or scale the cache")
    return out


def _check_int(options: dict, name: str, minimum: int) -> int:
    v = options[name]
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidType(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if v < minimum:
        raise InvalidArgument(f"{name} must be >= {minimum}, got {v}")
    return v


# ============================================================== bit packing (torch)
def _pack(q, bits: int):
    """Flattened codes in [0, 2**bits) packed 8 // bits a byte, low bits first."""
    torch = _torch()
    if bits not in (1, 2, 4, 8):
        raise InvalidArgument(f"bits must divide 8 (1, 2, 4 or 8), got {bits}")
    flat = q.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat
    per = 8 // bits
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    flat = flat.reshape(-1, per)
    out = flat[:, 0].clone()
    for i in range(1, per):
        out |= flat[:, i] << (bits * i)
    return out


def _unpack(packed, bits: int, n: int):
    torch = _torch()
    if bits == 8:
        return packed[:n]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:n]


def _packed_len(n: int, bits: int) -> int:
    return -(-n * bits // 8)


# ============================================================== group quantization (KIVI)
def _quant_groups(x, axis: int, group: int, bits: int, scale_dtype: str, what: str):
    """Asymmetric min/max codes of float32 ``x`` (h, n, d) in groups along ``axis``.

    Returns (codes uint8 shaped like x, minima, scales), the last two shaped like x with
    ``axis`` replaced by the group count. A last partial group is padded by repeating
    its last element, which changes neither its minimum nor its maximum.
    """
    torch = _torch()
    levels = (1 << bits) - 1
    h, n, d = x.shape
    length = x.shape[axis]
    ngroups = -(-length // group)
    pad = ngroups * group - length
    if pad:
        x = torch.cat([x, x.narrow(axis, length - 1, 1).expand(*[pad if i == axis else s
                                                                 for i, s in enumerate(x.shape)])], axis)
    xg = x.reshape(h, ngroups, group, d) if axis == 1 else x.reshape(h, n, ngroups, group)
    red = 2 if axis == 1 else 3
    mn = xg.amin(red, keepdim=True).to(_tdtype(scale_dtype))
    mx = xg.amax(red, keepdim=True)
    scale = ((mx - mn.float()) / levels).to(_tdtype(scale_dtype))
    if not (bool(torch.isfinite(mn).all()) and bool(torch.isfinite(scale).all())):
        raise InvalidArgument(f"{what} values overflow {scale_dtype} scales; pass scale_dtype='float32'")
    sc = scale.float()
    safe = torch.where(sc > 0, sc, torch.ones_like(sc))
    q = torch.round((xg - mn.float()) / safe).clamp_(0, levels).to(torch.uint8)
    q = q.reshape(x.shape).narrow(axis, 0, length)
    return q, mn.squeeze(red), scale.squeeze(red)


def _dequant_groups(q, mn, scale, axis: int, group: int):
    torch = _torch()
    h, n, d = q.shape
    length = q.shape[axis]
    ngroups = mn.shape[axis]
    pad = ngroups * group - length
    qf = q.float()
    if pad:
        qf = torch.cat([qf, qf.new_zeros(*[pad if i == axis else s for i, s in enumerate(qf.shape)])], axis)
    if axis == 1:
        xg = qf.reshape(h, ngroups, group, d) * scale.float().unsqueeze(2) + mn.float().unsqueeze(2)
    else:
        xg = qf.reshape(h, n, ngroups, group) * scale.float().unsqueeze(3) + mn.float().unsqueeze(3)
    return xg.reshape(qf.shape).narrow(axis, 0, length)


def _kivi_layout(h: int, n: int, d: int, group: int, bits: int, sdt: str, prefix: str = "") -> dict:
    return {
        prefix + "k_q": ("uint8", (_packed_len(h * n * d, bits),)),
        prefix + "k_min": (sdt, (h, -(-n // group), d)),
        prefix + "k_scale": (sdt, (h, -(-n // group), d)),
        prefix + "v_q": ("uint8", (_packed_len(h * n * d, bits),)),
        prefix + "v_min": (sdt, (h, n, -(-d // group))),
        prefix + "v_scale": (sdt, (h, n, -(-d // group))),
    }


def _kivi_encode(k, v, group: int, bits: int, sdt: str) -> dict:
    """KIVI: keys grouped along tokens (per channel), values along channels (per token)."""
    kq, kmn, ksc = _quant_groups(k.float(), 1, group, bits, sdt, "key")
    vq, vmn, vsc = _quant_groups(v.float(), 2, group, bits, sdt, "value")
    return {"k_q": _pack(kq, bits), "k_min": kmn, "k_scale": ksc,
            "v_q": _pack(vq, bits), "v_min": vmn, "v_scale": vsc}


def _kivi_decode(t: Mapping, h: int, n: int, d: int, group: int, bits: int):
    kq = _unpack(t["k_q"], bits, h * n * d).reshape(h, n, d)
    vq = _unpack(t["v_q"], bits, h * n * d).reshape(h, n, d)
    return (_dequant_groups(kq, t["k_min"], t["k_scale"], 1, group),
            _dequant_groups(vq, t["v_min"], t["v_scale"], 2, group))


# ============================================================== codecs
class KVCodec(abc.ABC):
    """Base class: ``encode`` / ``decode`` one layer; ``key()`` names codec and options."""

    name: str = ""
    lossless: bool = False
    _defaults: dict = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self._defaults))
        if unknown:
            accepted = ", ".join(sorted(self._defaults)) or "none"
            raise InvalidArgument(f"codec {self.name!r} has no option(s) {unknown}; it accepts: {accepted}")
        opts = dict(self._defaults)
        opts.update(options)
        self.options: Mapping[str, Any] = MappingProxyType(self._validate(opts))

    def _validate(self, opts: dict) -> dict:
        return opts

    # -- identity
    def key(self) -> str:
        """``kv<format>:<name>[:opt=value,...]``: changes whenever any option changes."""
        opts = ",".join(f"{k}={self.options[k]}" for k in sorted(self.options))
        return f"kv{KV_FORMAT_VERSION}:{self.name}" + (f":{opts}" if opts else "")

    def __repr__(self) -> str:
        return f"<KVCodec {self.key()}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KVCodec) and other.key() == self.key()

    def __hash__(self) -> int:
        return hash(self.key())

    # -- sizes
    @abc.abstractmethod
    def layout(self, shape: tuple[int, int, int], dtype: str) -> dict:
        """``{tensor name: (dtype, shape)}`` of an encoded layer of this input shape/dtype."""

    def estimate_nbytes(self, kv_heads: int, tokens: int, head_dim: int, dtype: str = "float16") -> int:
        """Encoded tensor bytes of one layer (keys and values) of this shape, exactly."""
        return sum(math.prod(s) * _STORED_DTYPES[dt]
                   for dt, s in self.layout((kv_heads, tokens, head_dim), dtype).values())

    @property
    def bits_per_value(self) -> float:
        """Approximate stored bits per key/value element, scales included (8x4096x128 layer)."""
        h, n, d = _NOMINAL_SHAPE
        return self.estimate_nbytes(h, n, d) * 8 / (2 * h * n * d)

    # -- work
    def encode(self, key, value, *, saliency=None) -> EncodedLayer:
        """Encode one layer; runs in torch on the tensors' device. ``saliency``: see ``mixed``."""
        shape, dtype = _check_kv(key, value)
        tensors = self._encode(key.detach(), value.detach(), shape, dtype, saliency)
        return EncodedLayer(self.name, self.options, shape, dtype, MappingProxyType(tensors))

    def decode(self, encoded: EncodedLayer, *, device=None, dtype=None):
        """``(key, value)`` of ``encoded`` on ``device`` (default: where it is) as ``dtype``
        (default: the dtype that was encoded)."""
        torch = _torch()
        if not isinstance(encoded, EncodedLayer):
            raise InvalidType(f"decode takes an EncodedLayer, got {type(encoded).__name__}")
        if encoded.codec != self.name or dict(encoded.options) != dict(self.options):
            raise InvalidArgument(f"this layer was encoded by {encoded.codec_key()}, not {self.key()}; "
                                  "decode it with decode_layer()")
        if dtype is None:
            out_dtype = _tdtype(encoded.dtype)
        else:
            name = dtype if isinstance(dtype, str) else _dtype_name(dtype) \
                if isinstance(dtype, torch.dtype) else None
            if name not in _INPUT_DTYPES:
                raise InvalidType(f"dtype must be one of {', '.join(_INPUT_DTYPES)} (str or torch.dtype), "
                                  f"got {dtype!r}")
            out_dtype = _tdtype(name)
        tensors = encoded.tensors
        if device is not None:
            tensors = {n: t.to(device) for n, t in tensors.items()}
        expected = self.layout(encoded.shape, encoded.dtype)
        for n, (dt, s) in expected.items():
            t = tensors.get(n)
            if t is None or _dtype_name(t.dtype) != dt or tuple(t.shape) != tuple(s):
                raise CorruptData(f"encoded {self.name} layer: tensor {n!r} is missing or not {dt}{list(s)}")
        k, v = self._decode(tensors, encoded.shape, encoded.dtype)
        return k.to(out_dtype), v.to(out_dtype)

    @abc.abstractmethod
    def _encode(self, key, value, shape, dtype, saliency) -> dict:
        """The named tensors of one encoded layer."""

    @abc.abstractmethod
    def _decode(self, tensors: Mapping, shape, dtype):
        """``(key, value)`` back from :meth:`_encode`'s tensors."""


class _CastCodec(KVCodec):
    lossless = True
    _target = "float16"

    def layout(self, shape, dtype):
        return {"k": (self._target, tuple(shape)), "v": (self._target, tuple(shape))}

    def _encode(self, key, value, shape, dtype, saliency):
        return {"k": _to_exact(key, self._target, "key"), "v": _to_exact(value, self._target, "value")}

    def _decode(self, tensors, shape, dtype):
        return tensors["k"], tensors["v"]


class Fp16Codec(_CastCodec):
    name = "fp16"
    _target = "float16"

    def _encode(self, key, value, shape, dtype, saliency):
        torch = _torch()
        for what, t in (("key", key), ("value", value)):
            if t.dtype != torch.float16 and bool((t.abs() > 65504).any()):
                raise InvalidArgument(f"{what} has values beyond float16's range (|x| > 65504); "
                                      "use the bf16 codec")
        return super()._encode(key, value, shape, dtype, saliency)


class Bf16Codec(_CastCodec):
    name = "bf16"
    _target = "bfloat16"


class Int8Codec(KVCodec):
    """Symmetric int8 with one absmax scale per (head, token), for keys and values."""

    name = "int8"
    _defaults = {"scale_dtype": "float16"}

    def _validate(self, opts):
        if opts["scale_dtype"] not in _SCALE_DTYPES:
            raise InvalidArgument(f"scale_dtype must be one of {_SCALE_DTYPES}, got {opts['scale_dtype']!r}")
        return opts

    def layout(self, shape, dtype):
        h, n, _ = shape
        sdt = self.options["scale_dtype"]
        return {"k_q": ("int8", tuple(shape)), "k_scale": (sdt, (h, n)),
                "v_q": ("int8", tuple(shape)), "v_scale": (sdt, (h, n))}

    def _encode(self, key, value, shape, dtype, saliency):
        torch = _torch()
        sdt = self.options["scale_dtype"]
        out = {}
        for p, what, t in (("k", "key", key), ("v", "value", value)):
            x = t.float()
            scale = (x.abs().amax(-1) / 127).to(_tdtype(sdt))
            if not bool(torch.isfinite(scale).all()):
                raise InvalidArgument(f"{what} values overflow {sdt} scales; pass scale_dtype='float32'")
            sc = scale.float()
            safe = torch.where(sc > 0, sc, torch.ones_like(sc)).unsqueeze(-1)
            out[p + "_q"] = torch.round(x / safe).clamp_(-127, 127).to(torch.int8)
            out[p + "_scale"] = scale
        return out

    def _decode(self, t, shape, dtype):
        return (t["k_q"].float() * t["k_scale"].float().unsqueeze(-1),
                t["v_q"].float() * t["v_scale"].float().unsqueeze(-1))


class KiviCodec(KVCodec):
    """KIVI (Liu et al. 2024): keys per channel, values per token, asymmetric, grouped."""

    name = "kivi"
    bits = 4
    _defaults = {"group_size": 32, "residual_tokens": 0, "scale_dtype": "float16"}

    def _validate(self, opts):
        _check_int(opts, "group_size", 1)
        _check_int(opts, "residual_tokens", 0)
        if opts["scale_dtype"] not in _SCALE_DTYPES:
            raise InvalidArgument(f"scale_dtype must be one of {_SCALE_DTYPES}, got {opts['scale_dtype']!r}")
        return opts

    def _split(self, shape) -> tuple[int, int]:
        """(quantized tokens, residual tokens) of a layer with this many tokens."""
        n = shape[1]
        r = min(self.options["residual_tokens"], n)
        return n - r, r

    def layout(self, shape, dtype):
        h, _, d = shape
        nq, r = self._split(shape)
        out = _kivi_layout(h, nq, d, self.options["group_size"], self.bits, self.options["scale_dtype"])
        ex = _exact_dtype(dtype)
        out["k_res"] = (ex, (h, r, d))
        out["v_res"] = (ex, (h, r, d))
        return out

    def _encode(self, key, value, shape, dtype, saliency):
        nq, _ = self._split(shape)
        out = _kivi_encode(key[:, :nq], value[:, :nq], self.options["group_size"], self.bits,
                           self.options["scale_dtype"])
        ex = _exact_dtype(dtype)
        out["k_res"] = _to_exact(key[:, nq:], ex, "key").contiguous()
        out["v_res"] = _to_exact(value[:, nq:], ex, "value").contiguous()
        return out

    def _decode(self, t, shape, dtype):
        torch = _torch()
        h, _, d = shape
        nq, _ = self._split(shape)
        k, v = _kivi_decode(t, h, nq, d, self.options["group_size"], self.bits)
        return torch.cat([k, t["k_res"].float()], 1), torch.cat([v, t["v_res"].float()], 1)


class Int4Codec(KiviCodec):
    # Groups of 64: 3.55x smaller than fp16 against 3.19x at KIVI's 32, for the same
    # quality on bytelm-man (+0.00105 vs +0.00102 nats/byte; bench/kv.py).
    name = "int4"
    bits = 4
    _defaults = {"group_size": 64, "residual_tokens": 0, "scale_dtype": "float16"}


class Int2Codec(KiviCodec):
    name = "int2"
    bits = 2


class MixedCodec(KiviCodec):
    """The most salient tokens exact, the rest int4 KIVI (plus an exact residual window).

    ``saliency``: per-token scores, shape ``(tokens,)`` or ``(kv_heads, tokens)`` (summed
    over heads), e.g. the attention mass each token receives; higher is kept. Without
    it tokens are ranked by the L2 norm of their keys over all heads.
    """

    name = "mixed"
    bits = 4
    _defaults = {"keep_ratio": 0.1, "group_size": 64, "residual_tokens": 0, "scale_dtype": "float16"}

    def _validate(self, opts):
        super()._validate(opts)
        r = opts["keep_ratio"]
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise InvalidType(f"keep_ratio must be a number in [0, 1], got {type(r).__name__} {r!r}")
        if not 0.0 <= float(r) <= 1.0:
            raise InvalidArgument(f"keep_ratio must be in [0, 1], got {r}")
        opts["keep_ratio"] = float(r)
        return opts

    def _n_keep(self, nq: int) -> int:
        return min(nq, math.ceil(self.options["keep_ratio"] * nq - 1e-9))

    def layout(self, shape, dtype):
        h, _, d = shape
        nq, r = self._split(shape)
        s = self._n_keep(nq)
        ex = _exact_dtype(dtype)
        out = _kivi_layout(h, nq - s, d, self.options["group_size"], self.bits, self.options["scale_dtype"])
        out.update({"s_idx": ("int32", (s,)), "k_sal": (ex, (h, s, d)), "v_sal": (ex, (h, s, d)),
                    "k_res": (ex, (h, r, d)), "v_res": (ex, (h, r, d))})
        return out

    def _scores(self, key, saliency, n: int):
        torch = _torch()
        if saliency is None:
            return key.float().pow(2).sum(dim=(0, 2))
        if not isinstance(saliency, torch.Tensor):
            try:
                saliency = torch.as_tensor(saliency)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise InvalidType(f"saliency must be an array of per-token scores, got "
                                  f"{type(saliency).__name__}: {exc}") from None
        if saliency.is_complex() or saliency.dtype == torch.bool:
            raise InvalidType(f"saliency must hold real numbers, got {saliency.dtype}")
        s = saliency.detach().to(device=key.device, dtype=torch.float32)
        if s.ndim == 2 and s.shape[0] == key.shape[0]:
            s = s.sum(0)
        if s.ndim != 1 or s.shape[0] != n:
            raise InvalidArgument(f"saliency must have shape ({n},) or ({key.shape[0]}, {n}) "
                                  f"(one score per token), got {tuple(saliency.shape)}")
        if not bool(torch.isfinite(s).all()):
            raise InvalidArgument("saliency holds NaN or infinity")
        return s

    def _encode(self, key, value, shape, dtype, saliency):
        torch = _torch()
        h, n, d = shape
        nq, _ = self._split(shape)
        scores = self._scores(key, saliency, n)[:nq]
        s = self._n_keep(nq)
        idx = torch.topk(scores, s, sorted=False).indices.sort().values if s else \
            torch.zeros(0, dtype=torch.long, device=key.device)
        keep = torch.zeros(nq, dtype=torch.bool, device=key.device)
        keep[idx] = True
        rest = (~keep).nonzero().squeeze(1)
        out = _kivi_encode(key[:, rest], value[:, rest], self.options["group_size"], self.bits,
                           self.options["scale_dtype"])
        ex = _exact_dtype(dtype)
        out["s_idx"] = idx.to(torch.int32)
        out["k_sal"] = _to_exact(key[:, idx], ex, "key").contiguous()
        out["v_sal"] = _to_exact(value[:, idx], ex, "value").contiguous()
        out["k_res"] = _to_exact(key[:, nq:], ex, "key").contiguous()
        out["v_res"] = _to_exact(value[:, nq:], ex, "value").contiguous()
        return out

    def _decode(self, t, shape, dtype):
        torch = _torch()
        h, n, d = shape
        nq, _ = self._split(shape)
        idx = t["s_idx"].long()
        s = idx.numel()
        if s and (bool((idx < 0).any()) or bool((idx >= nq).any()) or bool((idx[1:] <= idx[:-1]).any())):
            raise CorruptData("encoded mixed layer: salient token indices out of range or not increasing")
        keep = torch.zeros(nq, dtype=torch.bool, device=idx.device)
        keep[idx] = True
        rest = (~keep).nonzero().squeeze(1)
        kq, vq = _kivi_decode(t, h, nq - s, d, self.options["group_size"], self.bits)
        k = torch.empty(h, n, d, dtype=torch.float32, device=idx.device)
        v = torch.empty_like(k)
        k[:, rest], v[:, rest] = kq, vq
        k[:, idx], v[:, idx] = t["k_sal"].float(), t["v_sal"].float()
        k[:, nq:], v[:, nq:] = t["k_res"].float(), t["v_res"].float()
        return k, v


# ============================================================== registry
_CODECS: dict[str, type[KVCodec]] = {c.name: c for c in (Fp16Codec, Bf16Codec, Int8Codec, Int4Codec,
                                                           Int2Codec, MixedCodec)}
CODEC_NAMES = tuple(_CODECS)


def get_codec(name: str, **options: Any) -> KVCodec:
    """The codec called ``name`` (one of :data:`CODEC_NAMES`) with ``options``."""
    if not isinstance(name, str):
        raise InvalidType(f"codec name must be a str, got {type(name).__name__}")
    cls = _CODECS.get(name)
    if cls is None:
        raise InvalidArgument(f"unknown KV codec {name!r}; choose one of {', '.join(CODEC_NAMES)}")
    return cls(**options)


def decode_layer(encoded: EncodedLayer, *, device=None, dtype=None):
    """Decode ``encoded`` with the codec and options it names: ``(key, value)``."""
    if not isinstance(encoded, EncodedLayer):
        raise InvalidType(f"decode_layer takes an EncodedLayer, got {type(encoded).__name__}")
    return get_codec(encoded.codec, **encoded.options).decode(encoded, device=device, dtype=dtype)
