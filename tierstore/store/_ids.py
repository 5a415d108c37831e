"""Integer ids as the store keeps them: vector ids and token ids share one check."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgument, InvalidType

__all__ = ["as_id_array"]

_MAX_ID = np.iinfo(np.int64).max


def as_id_array(arr: np.ndarray, what: str, *, empty: str, range_note: str = "") -> np.ndarray:
    """``arr`` (1-D) as a private read-only little-endian int64 copy of ids from 0 to 2**63 - 1.

    ``empty`` is the message for an empty array; ``range_note`` is added to the range error.
    """
    if arr.ndim != 1:
        raise InvalidArgument(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise InvalidArgument(empty)
    if arr.dtype.kind not in "iu":
        raise InvalidType(f"{what} must be integers, got dtype {arr.dtype}; pass an int64 array or a list of int")
    if (arr.dtype.kind == "u" and arr.max() > _MAX_ID) or (arr.dtype.kind == "i" and arr.min() < 0):
        bad = arr[(arr > _MAX_ID) if arr.dtype.kind == "u" else (arr < 0)][0]
        raise InvalidArgument(f"{what} must be from 0 to 2**63 - 1{range_note}, got {bad}")
    out = np.array(arr, dtype="<i8")  # a private copy: later changes by the caller cannot leak in
    out.flags.writeable = False
    return out
