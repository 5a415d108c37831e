"""OSQ: a KLT rotation, variance-driven bit allocation and per-dimension scalar cells.

This is the "optimized scalar quantization" (OSQ) of SQUASH (J. Oakley and H.
Ferhatosmanoglu, *SQUASH: Serverless and Distributed Quantization-based Attributed Vector
Similarity Search*, arXiv:2502.01528, 2025), reduced to a self-contained numpy codec:

1. **Rotation (KLT/PCA).** The covariance of the training sample is eigen-decomposed;
   the eigenvectors, sorted by decreasing eigenvalue, form a full ``d x d`` orthogonal
   matrix ``R``. A vector is coded as ``y = (x - mean) @ R``. ``R`` is orthogonal, so L2
   distances are preserved, and the energy is concentrated in the leading dimensions.
2. **Non-uniform bit allocation.** The budget is ``round(bits_per_dim * d)`` bits per
   vector (Python's ``round``). Every dimension starts at 0 bits; one bit at a time goes
   to the dimension with the largest remaining variance (ties: the lower dimension), whose
   remaining variance is then quartered (one more bit doubles its cells, which quarters
   the squared quantization error), with at most :data:`MAX_BITS` bits per dimension.
   Because the per-dimension sequences ``v, v/4, v/16, ...`` decrease, the greedy choice is
   the same as taking the ``budget`` largest of all ``v_j / 4**k`` (``k < 8``), which is
   how :func:`allocate_bits` computes it, without a loop.
3. **Scalar cells.** A dimension with ``b > 0`` bits is cut into ``2**b`` equal cells
   between robust bounds ``lo``/``hi`` (the 0.1 and 99.9 percentiles of the rotated
   training data); values outside are clipped into the edge cells, and a cell is
   reconstructed by its center ``lo + (c + 0.5) * step`` with ``step = (hi - lo) / 2**b``.
   A dimension with 0 bits is not stored and reconstructs to the training mean (``y = 0``).

SQUASH's OSQ also fits non-uniform cell boundaries per dimension and splits codes into
segments for storage; here the cells are uniform and a code is one bitstream.

**Codes.** A vector's code is the cell indexes of the dimensions with bits, in rotated
order, packed LSB-first into one little-endian bitstream: dimension ``j`` occupies bits
``[p_j, p_j + b_j)`` where ``p_j`` is the sum of the widths before it, bit ``p`` of the
stream is bit ``p % 8`` of byte ``p // 8``, and the last byte is padded with zero bits.
A code is therefore ``ceil(budget / 8)`` bytes.

**Distances.** With ``step``/``offset`` per used dimension (``offset = lo + step / 2``) and
``cells`` the ``(n, d_used)`` cell indexes, a reconstruction is ``y_hat = offset + step *
cells`` and, for a query ``q``,

* ``q . x_hat = q . mean + (q @ R) . offset + ((q @ R) * step) @ cells``   (metric ``"ip"``,
  reported as ``-q . x_hat`` so that smaller is better),
* ``||q - x_hat||^2 = ||q - mean||^2 - 2 q_c . y_hat + ||y_hat||^2`` with
  ``q_c = (q - mean) @ R``                                                 (metric ``"l2"``),

so scanning is one matrix product per block of codes (the ``(n,)`` norms
``||y_hat||^2`` are expanded the same way, or taken from :meth:`OsqCodec.cell_norms`).

Unpacking has no per-vector loop and no gather: the allocation makes the widths
non-increasing along the rotated order, so a code is a few runs of equal width, and in a
run of width ``w`` every ``lcm(w, 8) / w``-th cell starts at the same bit of a byte a fixed
number of bytes apart. A block of codes is byte-transposed (``(code_bytes, b)``) and each
such family of cells is one strided slice of byte rows, a shift or two and a mask, run
along the ``b`` codes. The cells land transposed, ``(d_used, b)``, which is the layout the
product ``weights (nq, d_used) @ cells_t`` wants for an ``(nq, n)`` result.
:meth:`OsqCodec.unpack` exposes the cells (uint8, 4 bits/dim: 2x the packed size) so a
caller can cache them and call :meth:`OsqCodec.distances_unpacked`.

For unit-norm vectors (cosine), metric ``"l2"`` ranks like ``"ip"`` on exact vectors but
estimates better from codes: its error term is ``2 (x - q) . e`` instead of ``q . e`` for
a reconstruction error ``e``.

**Serialized format** (:meth:`OsqCodec.to_bytes`, version 1), all integers little-endian::

    magic      6 bytes   b"TSOSQ\\x00"
    version    uint16    1
    hlen       uint32    length of the header
    header     hlen bytes of UTF-8 JSON (sorted keys, no spaces): "d", "metric",
               "bits_per_dim", "budget_bits", "code_bytes", "clip_percentiles",
               "n_train", "payload_bytes" and "arrays": [[name, dtype, shape, offset], ...]
    payload    the arrays, raw C-order little-endian, each at its offset (from the start
               of the payload), 8-byte aligned:  mean <f4 (d,), rotation <f4 (d, d),
               variances <f8 (d,), bits |u1 (d,), lo <f4 (d,), hi <f4 (d,)
    crc32      uint32    zlib.crc32 of everything before it

Loading checks the magic, version, lengths, checksum, the header against the canonical
layout and the values (finite, widths <= 8 summing to the budget, orthogonal rotation)
and raises :class:`~tierstore.errors.CorruptData` on any mismatch. Nothing is ever
unpickled or evaluated.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from numbers import Integral, Real

import numpy as np

from ...errors import CorruptData, InvalidArgument

__all__ = ["OsqCodec", "allocate_bits", "MAX_BITS", "METRICS", "FORMAT_VERSION"]

METRICS = ("l2", "ip")
MAX_BITS = 8
FORMAT_VERSION = 1
CLIP_PERCENTILES = (0.1, 99.9)

_MAGIC = b"TSOSQ\x00"
_PREFIX = struct.Struct("<6sHI")
_CRC = struct.Struct("<I")
_BLOCK = 4096  # codes per block in scans: keeps the float32 cells in cache
_ENCODE_BLOCK = 16384
_MAX_HEADER = 1 << 16
_ARRAY_LAYOUT = (  # name, dtype, shape as a function of d
    ("mean", "<f4", lambda d: (d,)),
    ("rotation", "<f4", lambda d: (d, d)),
    ("variances", "<f8", lambda d: (d,)),
    ("bits", "|u1", lambda d: (d,)),
    ("lo", "<f4", lambda d: (d,)),
    ("hi", "<f4", lambda d: (d,)),
)


def allocate_bits(variances, budget: int, max_bits: int = MAX_BITS) -> np.ndarray:
    """Greedy variance-driven bit allocation: ``(d,)`` uint8 widths summing to ``budget``.

    Equivalent to giving, ``budget`` times, one bit to the dimension with the largest
    remaining variance (ties to the lower index) and quartering that variance, with at
    most ``max_bits`` bits per dimension.
    """
    v = np.asarray(variances, dtype=np.float64)
    if v.ndim != 1 or v.size == 0 or not np.all(np.isfinite(v)):
        raise InvalidArgument("variances must be a non-empty 1-D array of finite numbers")
    if not isinstance(budget, Integral) or not 0 <= budget <= max_bits * v.size:
        raise InvalidArgument(f"budget must be an integer in [0, {max_bits * v.size}], got {budget!r}")
    d = v.size
    v = np.maximum(v, 0.0)
    # candidate k of dimension j is worth v_j / 4**k (exact: a power-of-two scaling)
    values = (v[:, None] * 4.0 ** -np.arange(max_bits)).ravel()
    dims = np.repeat(np.arange(d), max_bits)
    levels = np.tile(np.arange(max_bits), d)
    order = np.lexsort((levels, dims, -values))[: int(budget)]
    return np.bincount(dims[order], minlength=d).astype(np.uint8)


def _runs(bits: np.ndarray):
    """The used dimensions as runs of equal width: ``(width, first_cell, count, bit_start)``."""
    used = bits[bits > 0].astype(np.int64)
    runs = []
    j = 0
    pos = 0
    while j < used.size:
        w = int(used[j])
        k = j
        while k < used.size and used[k] == w:
            k += 1
        runs.append((w, j, k - j, pos))
        pos += (k - j) * w
        j = k
    return tuple(runs)


def _chunk(w: int):
    """A run of width ``w`` splits into chunks of ``L`` bytes holding ``per`` cells each."""
    per = 8 // math.gcd(w, 8)
    nbytes = per * w // 8
    word = 1 if nbytes == 1 else 4 if nbytes <= 4 else 8
    return per, nbytes, word


def _unpack_plan(runs):
    """Row operations that unpack every run from byte-transposed codes (see ``_unpack_t``).

    In a run of width ``w`` the cells at positions ``i, i + per, i + 2 per, ...`` (``per``
    cells per ``lcm(w, 8)``-bit chunk of ``nbytes`` bytes) all start at the same bit of a
    byte, ``nbytes`` bytes apart, so one strided slice of byte rows, a shift or two, an or
    and a mask get them all. Entries: ``(byte, byte_stride, count, shift, width,
    first_cell, cell_stride)``.
    """
    plan = []
    for w, first, count, bit_start in runs:
        per, nbytes, _ = _chunk(w)
        for i in range(min(per, count)):
            byte, shift = divmod(bit_start + i * w, 8)
            plan.append((byte, nbytes, len(range(i, count, per)), shift, w, first + i, per))
    return tuple(plan)


def _transpose_bytes(codes: np.ndarray) -> np.ndarray:
    """``codes.T`` as a C-contiguous ``(code_bytes, n)`` array.

    Moving 8-byte words first and then the bytes inside them is about twice as fast as a
    byte-wise transpose in numpy.
    """
    n, cb = codes.shape
    word = 8 if cb % 8 == 0 else 4 if cb % 4 == 0 else 2 if cb % 2 == 0 else 1
    if word == 1 or n == 0:
        return np.ascontiguousarray(codes.T)
    words = np.ascontiguousarray(codes.view(f"u{word}").T)  # (cb / word, n): whole words
    lanes = words.view(np.uint8).reshape(cb // word, n, word).transpose(0, 2, 1)
    return np.ascontiguousarray(lanes).reshape(cb, n)


class OsqCodec:
    """A trained OSQ quantizer; see the module docstring. Build one with :meth:`train`."""

    __slots__ = ("_d", "_metric", "_bits_per_dim", "_n_train", "_mean", "_rotation", "_variances",
                 "_bits", "_lo", "_hi", "_used", "_step", "_offset", "_inv_step", "_runs",
                 "_budget", "_code_bytes", "_unpack_plan", "_unpack_rows", "_r_used", "_r_used64",
                 "_mean64", "_mean_rot")

    def __init__(self, *, d, metric, bits_per_dim, n_train, mean, rotation, variances, bits, lo, hi):
        """Internal: use :meth:`train` or :meth:`from_bytes` (arrays are taken as they are)."""
        self._d = int(d)
        self._metric = metric
        self._bits_per_dim = float(bits_per_dim)
        self._n_train = int(n_train)
        self._mean = _frozen(mean, np.float32)
        self._rotation = _frozen(rotation, np.float32)
        self._variances = _frozen(variances, np.float64)
        self._bits = _frozen(bits, np.uint8)
        self._lo = _frozen(lo, np.float32)
        self._hi = _frozen(hi, np.float32)
        self._budget = int(self._bits.sum(dtype=np.int64))
        self._code_bytes = (self._budget + 7) // 8
        self._used = _frozen(np.flatnonzero(self._bits), np.int64)
        widths = self._bits[self._used].astype(np.int64)
        lo_u = self._lo[self._used]
        step = ((self._hi[self._used] - lo_u) / np.float32(2.0) ** widths.astype(np.float32)).astype(np.float32)
        step = np.maximum(step, np.float32(0.0))
        self._step = _frozen(step, np.float32)
        self._offset = _frozen(lo_u + np.float32(0.5) * step, np.float32)
        with np.errstate(divide="ignore"):
            inv = np.where(step > 0, 1.0 / step.astype(np.float64), 0.0)
        self._inv_step = _frozen(inv, np.float64)
        self._runs = _runs(self._bits)
        self._unpack_plan = _unpack_plan(self._runs)
        self._unpack_rows = max((p[2] for p in self._unpack_plan), default=0)
        self._r_used = _frozen(np.ascontiguousarray(self._rotation[:, self._used]), np.float32)
        self._r_used64 = self._r_used.astype(np.float64)
        self._mean64 = self._mean.astype(np.float64)
        self._mean_rot = _frozen(self._mean @ self._r_used, np.float32)

    # ------------------------------------------------------------------ training

    @classmethod
    def train(cls, x, *, bits_per_dim: float = 4.0, metric: str = "l2", seed: int = 0,
              max_train: int = 100_000) -> OsqCodec:
        """Train on ``x`` ``(n, d)``: rotation, bit allocation and cell bounds.

        ``bits_per_dim`` in ``(0, 8]`` sets the budget ``round(bits_per_dim * d)`` bits per
        vector. ``metric`` (``"l2"`` or ``"ip"``) only selects what :meth:`distances`
        returns. At most ``max_train`` rows (a seeded uniform sample) are used.
        """
        if metric not in METRICS:
            raise InvalidArgument(f"metric must be one of {METRICS}, got {metric!r}")
        if isinstance(bits_per_dim, bool) or not isinstance(bits_per_dim, Real):
            raise InvalidArgument(f"bits_per_dim must be a number in (0, {MAX_BITS}], got {bits_per_dim!r}")
        bits_per_dim = float(bits_per_dim)
        if not (math.isfinite(bits_per_dim) and 0.0 < bits_per_dim <= MAX_BITS):
            raise InvalidArgument(f"bits_per_dim must be in (0, {MAX_BITS}], got {bits_per_dim!r}")
        if isinstance(seed, bool) or not isinstance(seed, Integral):
            raise InvalidArgument(f"seed must be an integer, got {seed!r}")
        if isinstance(max_train, bool) or not isinstance(max_train, Integral) or max_train < 2:
            raise InvalidArgument(f"max_train must be an integer >= 2, got {max_train!r}")
        x = _as_matrix(x, None, "training vectors")
        n, d = x.shape
        if n < 2:
            raise InvalidArgument(f"training needs at least 2 vectors, got {n}")
        budget = int(round(bits_per_dim * d))
        if budget < 1:
            raise InvalidArgument(
                f"bits_per_dim * d = {bits_per_dim} * {d} rounds to 0 bits; raise bits_per_dim")
        if n > max_train:
            rows = np.sort(np.random.default_rng(seed).choice(n, size=int(max_train), replace=False))
            x = x[rows]
            n = x.shape[0]
        mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
        xc = x - mean
        # float32 products (sums of n terms) are accurate enough for the axes and far faster
        cov = (xc.T @ xc).astype(np.float64) / (n - 1)
        cov = (cov + cov.T) / 2.0
        evals, evecs = np.linalg.eigh(cov)
        order = np.argsort(-evals, kind="stable")
        variances = np.maximum(evals[order], 0.0)
        rotation = evecs[:, order]
        # deterministic signs: the largest-magnitude entry of each column is positive
        pivot = np.argmax(np.abs(rotation), axis=0)
        rotation *= np.where(rotation[pivot, np.arange(d)] < 0, -1.0, 1.0)
        rotation = rotation.astype(np.float32)
        bits = allocate_bits(variances, budget)
        y = xc @ rotation  # the rotated training data, as encode() computes it
        lo, hi = np.percentile(y, CLIP_PERCENTILES, axis=0)
        lo = lo.astype(np.float32)
        hi = np.maximum(hi.astype(np.float32), lo)
        return cls(d=d, metric=metric, bits_per_dim=bits_per_dim, n_train=n, mean=mean,
                   rotation=rotation, variances=variances, bits=bits, lo=lo, hi=hi)

    # ------------------------------------------------------------------ properties

    @property
    def d(self) -> int:
        """Dimension of the vectors."""
        return self._d

    @property
    def metric(self) -> str:
        """``"l2"`` (squared L2 distances) or ``"ip"`` (negative inner products)."""
        return self._metric

    @property
    def bits_per_dim(self) -> float:
        return self._bits_per_dim

    @property
    def budget_bits(self) -> int:
        """Bits of one code before byte padding: ``round(bits_per_dim * d)``."""
        return self._budget

    @property
    def code_bytes(self) -> int:
        """Bytes of one code: ``ceil(budget_bits / 8)``."""
        return self._code_bytes

    @property
    def bits(self) -> np.ndarray:
        """``(d,)`` uint8 width of every rotated dimension (read-only)."""
        return self._bits

    @property
    def used_dims(self) -> np.ndarray:
        """Rotated dimensions with at least one bit: the columns of :meth:`unpack`."""
        return self._used

    @property
    def d_used(self) -> int:
        return int(self._used.size)

    @property
    def mean(self) -> np.ndarray:
        return self._mean

    @property
    def rotation(self) -> np.ndarray:
        """``(d, d)`` orthogonal float32; column ``j`` is the ``j``-th principal axis."""
        return self._rotation

    @property
    def variances(self) -> np.ndarray:
        """Variance of the training sample along each rotated dimension (decreasing)."""
        return self._variances

    @property
    def step(self) -> np.ndarray:
        """Cell width of each used dimension (``(d_used,)`` float32)."""
        return self._step

    @property
    def offset(self) -> np.ndarray:
        """Reconstruction of cell 0 of each used dimension (``(d_used,)`` float32)."""
        return self._offset

    def __repr__(self) -> str:
        return (f"OsqCodec(d={self._d}, metric={self._metric!r}, bits_per_dim={self._bits_per_dim}, "
                f"budget_bits={self._budget}, code_bytes={self._code_bytes}, d_used={self.d_used})")

    # ------------------------------------------------------------------ coding

    def quantize(self, x) -> np.ndarray:
        """Cell indexes ``(n, d_used)`` uint8 of vectors ``x`` ``(n, d)`` (or ``(d,)``)."""
        x = _as_matrix(x, self._d, "vectors")
        n = x.shape[0]
        out = np.empty((n, self._used.size), dtype=np.uint8)
        top = (np.int64(1) << self._bits[self._used].astype(np.int64)) - 1
        lo = self._lo[self._used].astype(np.float64)
        for start in range(0, n, _ENCODE_BLOCK):
            block = x[start:start + _ENCODE_BLOCK].astype(np.float64)
            y = (block - self._mean64) @ self._r_used64
            y -= lo
            y *= self._inv_step
            np.floor(y, out=y)
            np.clip(y, 0, top, out=y)
            out[start:start + block.shape[0]] = y
        return out

    def encode(self, x) -> np.ndarray:
        """Codes ``(n, code_bytes)`` uint8 of vectors ``x`` ``(n, d)`` (or ``(d,)``)."""
        return self.pack(self.quantize(x))

    def pack(self, cells) -> np.ndarray:
        """Pack ``(n, d_used)`` cell indexes into ``(n, code_bytes)`` codes (inverse of :meth:`unpack`)."""
        cells = np.asarray(cells)
        if cells.ndim != 2 or cells.shape[1] != self._used.size or cells.dtype != np.uint8:
            raise InvalidArgument(
                f"cells must be a (n, {self._used.size}) uint8 array, got {cells.dtype} {cells.shape}")
        widths = self._bits[self._used]
        if cells.size and np.any(cells >> widths != 0):
            raise InvalidArgument("a cell index does not fit its dimension's width")
        n = cells.shape[0]
        out = np.zeros((n, self._code_bytes + 1), dtype=np.uint8)
        for w, first, count, bit_start in self._runs:
            part = cells[:, first:first + count]
            if w == 8:
                aligned = part
            else:
                per, nbytes, word = _chunk(w)
                groups = -(-count // per)
                padded = np.zeros((n, groups * per), dtype=f"<u{word}")
                padded[:, :count] = part
                shifts = (np.arange(per) * w).astype(f"<u{word}")
                words = np.bitwise_or.reduce(padded.reshape(n, groups, per) << shifts, axis=2)
                raw = words.reshape(n, groups, 1).view(np.uint8)[:, :, :nbytes]
                aligned = raw.reshape(n, groups * nbytes)[:, : -(-count * w // 8)]
            k, o = divmod(bit_start, 8)
            m = aligned.shape[1]
            if o == 0:
                out[:, k:k + m] |= aligned
            else:
                out[:, k:k + m] |= aligned << np.uint8(o)
                out[:, k + 1:k + m + 1] |= aligned >> np.uint8(8 - o)
        return out[:, : self._code_bytes].copy()

    def unpack(self, codes) -> np.ndarray:
        """Cell indexes ``(n, d_used)`` uint8 of codes ``(n, code_bytes)``; cache them for scans.

        The array is the transpose of a C-contiguous ``(d_used, n)`` one (Fortran order):
        that is the layout unpacking produces and :meth:`distances_unpacked` scans fastest
        (``np.ascontiguousarray`` gives rows, at a cost; both layouts are accepted).
        """
        codes = self._as_codes(codes)
        n = codes.shape[0]
        out = np.empty((self._used.size, n), dtype=np.uint8)
        scratch = self._unpack_scratch(min(_BLOCK, n))
        for start in range(0, n, _BLOCK):
            stop = min(start + _BLOCK, n)
            self._unpack_t(codes[start:stop], out[:, start:stop], scratch)
        return out.T

    def _unpack_scratch(self, rows: int):
        return (np.empty((self._unpack_rows, rows), dtype=np.uint8),
                np.empty((self._unpack_rows, rows), dtype=np.uint8))

    def _unpack_t(self, codes: np.ndarray, out: np.ndarray, scratch) -> None:
        """Write the cells of ``codes`` ``(b, code_bytes)`` TRANSPOSED into ``out`` ``(d_used, b)``.

        ``out`` may be uint8 or float32 (the last operation of each row writes it, casting).
        Working on byte-transposed codes makes every numpy operation run along the ``b``
        codes of a block instead of along a few bytes of one code.
        """
        n = codes.shape[0]
        if n == 0:
            return
        rows = _transpose_bytes(codes)
        t1 = scratch[0][:, :n]
        t2 = scratch[1][:, :n]
        for byte, stride, count, shift, w, cell, cell_stride in self._unpack_plan:
            src = rows[byte: byte + (count - 1) * stride + 1: stride]
            dst = out[cell: cell + (count - 1) * cell_stride + 1: cell_stride]
            mask = np.uint8((1 << w) - 1)
            if shift + w <= 8:  # the cell lies in one byte
                if shift + w == 8:
                    np.right_shift(src, np.uint8(shift), out=dst, casting="unsafe")
                elif shift == 0:
                    np.bitwise_and(src, mask, out=dst, casting="unsafe")
                else:
                    a = t1[:count]
                    np.right_shift(src, np.uint8(shift), out=a)
                    np.bitwise_and(a, mask, out=dst, casting="unsafe")
            else:  # low bits from this byte, high bits from the next one
                nxt = rows[byte + 1: byte + 1 + (count - 1) * stride + 1: stride]
                a = t1[:count]
                b = t2[:count]
                np.right_shift(src, np.uint8(shift), out=a)
                np.left_shift(nxt, np.uint8(8 - shift), out=b)
                if w == 8:
                    np.bitwise_or(a, b, out=dst, casting="unsafe")
                else:
                    a |= b
                    np.bitwise_and(a, mask, out=dst, casting="unsafe")

    def decode(self, codes) -> np.ndarray:
        """Reconstructions ``(n, d)`` float32 of codes, in the original space."""
        return self.decode_cells(self.unpack(codes))

    def decode_cells(self, cells) -> np.ndarray:
        """Reconstructions ``(n, d)`` float32 of ``(n, d_used)`` cell indexes."""
        cells = self._as_cells(cells)
        y = cells.astype(np.float32)
        y *= self._step
        y += self._offset
        out = y @ self._r_used.T
        out += self._mean
        return out

    # ------------------------------------------------------------------ scanning

    def distances(self, query, codes) -> np.ndarray:
        """Approximate distances ``(nq, n)`` float32 of queries ``(nq, d)`` or ``(d,)`` to codes.

        Squared L2 to the reconstructions for metric ``"l2"``; the negative inner product
        with them for ``"ip"`` (smaller is better for both).
        """
        q = _as_matrix(query, self._d, "query")
        codes = self._as_codes(codes)
        return self._scan(q, codes, None, packed=True)

    def distances_unpacked(self, query, cells, *, norms=None) -> np.ndarray:
        """Like :meth:`distances`, on cells from :meth:`unpack` (uint8, or float32 for speed).

        For metric ``"l2"``, ``norms`` from :meth:`cell_norms` (cached with the cells) saves
        recomputing ``||y_hat||^2`` on every call; metric ``"ip"`` ignores it.
        """
        q = _as_matrix(query, self._d, "query")
        cells = self._as_cells(cells, allow_float=True)
        if norms is not None:
            norms = np.asarray(norms, dtype=np.float32)
            if norms.shape != (cells.shape[0],):
                raise InvalidArgument(f"norms must have shape ({cells.shape[0]},), got {norms.shape}")
        return self._scan(q, cells, norms, packed=False)

    def cell_norms(self, cells) -> np.ndarray:
        """``||y_hat||^2 = ||decode(codes) - mean||^2`` per row of cells: ``(n,)`` float32."""
        cells = self._as_cells(cells, allow_float=True)
        n = cells.shape[0]
        out = np.empty(n, dtype=np.float32)
        rows = min(_BLOCK, max(n, 1))
        bufs = {}
        step = self._step[:, None]
        offset = self._offset[:, None]
        for start in range(0, n, _BLOCK):
            y = self._float_block_t(cells, start, min(start + _BLOCK, n), bufs, rows) * step
            y += offset
            np.square(y, out=y)
            out[start:start + y.shape[1]] = y.sum(axis=0)
        return out

    def _float_block_t(self, cells: np.ndarray, start: int, stop: int, bufs: dict, rows: int) -> np.ndarray:
        """Rows ``start:stop`` of cached cells as a float32 ``(d_used, b)`` matrix (a view if possible)."""
        block = cells[start:stop]
        if block.dtype == np.float32:
            return block.T
        if block.strides[0] <= block.strides[1]:  # column-major, as unpack() returns it
            if "t" not in bufs:
                bufs["t"] = np.empty((self._used.size, rows), dtype=np.float32)
            f = bufs["t"][:, : stop - start]
            f[...] = block.T
            return f
        if "r" not in bufs:
            bufs["r"] = np.empty((rows, self._used.size), dtype=np.float32)
        f = bufs["r"][: stop - start]
        f[...] = block
        return f.T

    def _scan(self, q: np.ndarray, data: np.ndarray, norms, *, packed: bool) -> np.ndarray:
        nq = q.shape[0]
        n = data.shape[0]
        out = np.empty((nq, n), dtype=np.float32)
        qr = q @ self._r_used  # (nq, d_used): the queries in rotated coordinates
        quadratic = None
        if self._metric == "ip":
            # -(q . x_hat) = -(q . mean + qr . offset) - (qr * step) . cells
            weights = qr * -self._step
            const = -(q @ self._mean + qr @ self._offset)
        else:
            # ||q - x_hat||^2 = ||q - mean||^2 - 2 qc . y_hat + ||y_hat||^2 with y_hat =
            # offset + step * cells and ||y_hat||^2 = |offset|^2 + 2 (offset * step) . cells
            # + step^2 . cells^2
            qc = qr - self._mean_rot
            diff = q - self._mean
            const = np.einsum("ij,ij->i", diff, diff) - 2.0 * (qc @ self._offset)
            weights = qc * (-2.0 * self._step)
            if norms is None:
                weights += 2.0 * self._offset * self._step
                const += float(np.dot(self._offset.astype(np.float64), self._offset))
                quadratic = np.square(self._step)[None, :]  # (1, d_used)
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        const = const.astype(np.float32)[:, None]
        rows = min(_BLOCK, max(n, 1))
        # cells are handled transposed, (d_used, b), so the product lands in out's layout
        bufs = {}
        if packed:
            buf = np.empty((self._used.size, rows), dtype=np.float32)
            scratch = self._unpack_scratch(rows)
        sq = np.empty((self._used.size, rows), dtype=np.float32) if quadratic is not None else None
        for start in range(0, n, _BLOCK):
            stop = min(start + _BLOCK, n)
            if packed:
                f = buf[:, : stop - start]
                self._unpack_t(data[start:stop], f, scratch)
            else:
                f = self._float_block_t(data, start, stop, bufs, rows)
            block = out[:, start:stop]
            np.matmul(weights, f, out=block)
            block += const
            if quadratic is not None:
                f2 = sq[:, : stop - start]
                np.square(f, out=f2)
                block += quadratic @ f2
            elif norms is not None and self._metric == "l2":
                block += norms[start:stop]
        return out

    # ------------------------------------------------------------------ validation

    def _as_codes(self, codes) -> np.ndarray:
        if isinstance(codes, (bytes, bytearray, memoryview)):
            codes = np.frombuffer(codes, dtype=np.uint8)
        codes = np.asarray(codes)
        if codes.dtype != np.uint8:
            raise InvalidArgument(f"codes must be a uint8 array, got dtype {codes.dtype}")
        if codes.ndim == 1:
            codes = codes.reshape(1, -1)
        if codes.ndim != 2 or codes.shape[1] != self._code_bytes:
            raise InvalidArgument(
                f"codes must have shape (n, {self._code_bytes}) for this codec, got {codes.shape}")
        return np.ascontiguousarray(codes)

    def _as_cells(self, cells, *, allow_float: bool = False) -> np.ndarray:
        cells = np.asarray(cells)
        ok = cells.dtype == np.uint8 or (allow_float and cells.dtype == np.float32)
        if not ok or cells.ndim != 2 or cells.shape[1] != self._used.size:
            kinds = "uint8 or float32" if allow_float else "uint8"
            raise InvalidArgument(
                f"cells must be a (n, {self._used.size}) {kinds} array from unpack(), got "
                f"{cells.dtype} {cells.shape}")
        return cells

    # ------------------------------------------------------------------ serialization

    def to_bytes(self) -> bytes:
        """The codec in the versioned format of the module docstring (deterministic)."""
        arrays = {"mean": self._mean, "rotation": self._rotation, "variances": self._variances,
                  "bits": self._bits, "lo": self._lo, "hi": self._hi}
        layout, payload_bytes = _layout(self._d)
        header = {
            "arrays": [[name, dtype, list(shape), offset] for name, dtype, shape, offset in layout],
            "bits_per_dim": self._bits_per_dim,
            "budget_bits": self._budget,
            "clip_percentiles": list(CLIP_PERCENTILES),
            "code_bytes": self._code_bytes,
            "d": self._d,
            "metric": self._metric,
            "n_train": self._n_train,
            "payload_bytes": payload_bytes,
        }
        head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
        payload = bytearray(payload_bytes)
        for name, dtype, shape, offset in layout:
            raw = np.ascontiguousarray(arrays[name], dtype=dtype).tobytes()
            payload[offset:offset + len(raw)] = raw
        body = _PREFIX.pack(_MAGIC, FORMAT_VERSION, len(head)) + head + bytes(payload)
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data) -> OsqCodec:
        """Load :meth:`to_bytes` output; raises :class:`CorruptData` on any damage."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgument(f"from_bytes needs bytes, bytearray or memoryview, got {type(data).__name__}")
        try:
            data = bytes(data)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"from_bytes needs a bytes-like object, got {type(data).__name__}") from exc
        if len(data) < _PREFIX.size + _CRC.size:
            raise CorruptData(f"OSQ codec: {len(data)} bytes is too short")
        magic, version, hlen = _PREFIX.unpack_from(data, 0)
        if magic != _MAGIC:
            raise CorruptData("OSQ codec: bad magic (not a tierstore OSQ codec)")
        if version != FORMAT_VERSION:
            raise CorruptData(f"OSQ codec: unsupported format version {version} (expected {FORMAT_VERSION})")
        body = data[: -_CRC.size]
        (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
        if zlib.crc32(body) != crc:
            raise CorruptData("OSQ codec: checksum mismatch (truncated or damaged)")
        if hlen > _MAX_HEADER or _PREFIX.size + hlen > len(body):
            raise CorruptData(f"OSQ codec: header length {hlen} out of range")
        try:
            header = json.loads(body[_PREFIX.size:_PREFIX.size + hlen].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CorruptData(f"OSQ codec: unreadable header: {exc}") from exc
        payload = body[_PREFIX.size + hlen:]
        return cls._from_parts(header, payload)

    @classmethod
    def _from_parts(cls, header, payload: bytes) -> OsqCodec:
        def bad(what: str) -> CorruptData:
            return CorruptData(f"OSQ codec: {what}")

        keys = {"arrays", "bits_per_dim", "budget_bits", "clip_percentiles", "code_bytes", "d",
                "metric", "n_train", "payload_bytes"}
        if not isinstance(header, dict) or set(header) != keys:
            raise bad("header fields do not match format version 1")
        d = header["d"]
        if not _is_int(d) or not 1 <= d <= 1 << 16:
            raise bad(f"bad dimension {d!r}")
        if header["metric"] not in METRICS:
            raise bad(f"bad metric {header['metric']!r}")
        bpd = header["bits_per_dim"]
        if isinstance(bpd, bool) or not isinstance(bpd, (int, float)) or not (
                math.isfinite(bpd) and 0 < bpd <= MAX_BITS):
            raise bad(f"bad bits_per_dim {bpd!r}")
        budget = int(round(float(bpd) * d))
        if header["budget_bits"] != budget or not _is_int(header["budget_bits"]) or budget < 1:
            raise bad("budget_bits does not match bits_per_dim * d")
        if header["code_bytes"] != (budget + 7) // 8 or not _is_int(header["code_bytes"]):
            raise bad("code_bytes does not match budget_bits")
        if header["clip_percentiles"] != list(CLIP_PERCENTILES):
            raise bad("unsupported clip_percentiles")
        if not _is_int(header["n_train"]) or header["n_train"] < 2:
            raise bad("bad n_train")
        layout, payload_bytes = _layout(d)
        expected = [[name, dtype, list(shape), offset] for name, dtype, shape, offset in layout]
        if header["arrays"] != expected or header["payload_bytes"] != payload_bytes:
            raise bad("array layout does not match format version 1")
        if len(payload) != payload_bytes:
            raise bad(f"payload is {len(payload)} bytes, header says {payload_bytes}")
        arrays = {}
        for name, dtype, shape, offset in layout:
            count = int(np.prod(shape))
            arr = np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(shape)
            arrays[name] = arr.astype(np.dtype(dtype).newbyteorder("="))
        for name in ("mean", "rotation", "variances", "lo", "hi"):
            if not np.all(np.isfinite(arrays[name])):
                raise bad(f"non-finite values in {name}")
        bits = arrays["bits"]
        if np.any(bits > MAX_BITS) or int(bits.sum(dtype=np.int64)) != budget:
            raise bad("bit widths exceed 8 or do not sum to budget_bits")
        if np.any(arrays["hi"] < arrays["lo"]) or np.any(arrays["variances"] < 0):
            raise bad("inconsistent bounds or variances")
        r = arrays["rotation"].astype(np.float64)
        if np.max(np.abs(r.T @ r - np.eye(d))) > 1e-3:
            raise bad("rotation is not orthogonal")
        return cls(d=d, metric=header["metric"], bits_per_dim=float(bpd), n_train=header["n_train"],
                   **arrays)


def _layout(d: int):
    """Canonical ``(name, dtype, shape, offset)`` of the payload arrays and its total size."""
    layout = []
    offset = 0
    for name, dtype, shape_of in _ARRAY_LAYOUT:
        shape = shape_of(d)
        layout.append((name, dtype, shape, offset))
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        offset += -(-nbytes // 8) * 8
    return layout, offset


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _frozen(arr, dtype) -> np.ndarray:
    out = np.array(arr, dtype=dtype, copy=True, order="C")
    out.setflags(write=False)
    return out


def _as_matrix(x, d, what: str) -> np.ndarray:
    """``x`` as a C-contiguous ``(n, d)`` float32 matrix of finite values, or InvalidArgument."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise InvalidArgument(f"{what} must be a real-valued numeric array, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise InvalidArgument(f"{what} must have shape (n, d) or (d,), got {np.shape(x)}")
    if d is not None and arr.shape[1] != d:
        raise InvalidArgument(f"{what} have dimension {arr.shape[1]}, this codec was trained on d={d}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise InvalidArgument(f"{what} contain NaN or infinite values (or values too large for float32)")
    return arr
