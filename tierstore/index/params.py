"""Index and search parameters: frozen, keyword-only, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from ..errors import InvalidArgument, InvalidType
from .quant import DEFAULT_QUANTIZER, QUANTIZERS

__all__ = ["IndexParams", "SearchParams", "MAX_K", "search_params"]

MAX_K = 1 << 20  # the largest k a search takes: as many candidates as a serverless worker may return per query


def _check_number(name: str, value: object, *, low: float, integer: bool, high: float | None = None) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise InvalidType(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"from {low} to {high}"
        raise InvalidArgument(f"{name} must be {bound}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class IndexParams:
    """How :meth:`Collection.build_index` partitions and codes the vectors.

    :param quantizer: code format of the posting lists (``"pq4fs"``, ``"sq8"``, ``"sq4"``,
        ``"rabitq"``); see :mod:`tierstore.index.quant`.
    :param target_list_size: vectors per posting list aimed at (before replication);
        ``None`` (default) picks ``sqrt(n)`` within 64..4096 at build time: about 224 at
        50,000 vectors, 1,000 at a million (fast-scan codes want long lists, and fewer
        lists mean fewer centroids to compare each query with).
    :param max_list_size: hard bound on a list's length; an update that grows a list past
        it splits the list (default ``2 * target_list_size``).
    :param max_replicas: lists a boundary vector may be stored in (SPANN; 1 disables).
    :param closure: a replica list must be within ``closure`` x the squared distance of
        the vector's own list (SPANN's ``1 + eps``).
    :param rng_factor: the RNG rule's strictness (1.0 is SPANN's rule).
    :param segment_bytes: posting lists are coalesced into blobs of about this size.
    :param spare_lists: list slots reserved for splits, as a fraction of the initial count.
    """

    quantizer: str = DEFAULT_QUANTIZER
    target_list_size: int | None = None
    max_list_size: int | None = None
    max_replicas: int = 4
    closure: float = 1.3
    rng_factor: float = 1.0
    segment_bytes: int = 1 << 20
    spare_lists: float = 0.5
    seed: int = 0
    niter: int = 20

    def __post_init__(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise InvalidArgument(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.target_list_size is not None:
            _check_number("target_list_size", self.target_list_size, low=8, integer=True)
        if self.max_list_size is not None:
            _check_number("max_list_size", self.max_list_size, low=self.target_list_size or 8, integer=True)
        _check_number("max_replicas", self.max_replicas, low=1, high=8, integer=True)
        _check_number("closure", self.closure, low=1.0, integer=False)
        _check_number("rng_factor", self.rng_factor, low=0.0, integer=False)
        _check_number("segment_bytes", self.segment_bytes, low=4096, integer=True)
        _check_number("spare_lists", self.spare_lists, low=0.0, high=10.0, integer=False)
        _check_number("seed", self.seed, low=0, integer=True)
        _check_number("niter", self.niter, low=1, integer=True)

    @property
    def list_limit(self) -> int:
        """The hard bound on a list's length (needs a resolved ``target_list_size``)."""
        return self.max_list_size or 2 * self.target_list_size

    def resolved(self, n: int) -> "IndexParams":
        """These parameters with ``target_list_size`` fixed for ``n`` vectors."""
        if self.target_list_size is not None:
            return self
        target = int(min(4096, max(64, round(n ** 0.5))))
        if self.max_list_size is not None:
            target = min(target, self.max_list_size)
        return dataclasses.replace(self, target_list_size=target)

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: dict) -> "IndexParams":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True, kw_only=True)
class SearchParams:
    """How one search runs.

    :param nprobe: posting lists probed per query, nearest centroids first.
    :param prune_ratio: skip a probed list whose centroid is farther than ``prune_ratio``
        x the nearest one (squared L2; SPANN's query-aware pruning). ``None``: no pruning.
    :param rerank: candidates reranked exactly = ``rerank * k`` (0: return code distances).
    """

    nprobe: int = 16
    prune_ratio: float | None = None
    rerank: int = 4

    def __post_init__(self) -> None:
        _check_number("nprobe", self.nprobe, low=1, integer=True)
        if self.prune_ratio is not None:
            _check_number("prune_ratio", self.prune_ratio, low=1.0, integer=False)
        _check_number("rerank", self.rerank, low=0, integer=True)


_SEARCH_KEYS = frozenset({"nprobe", "prune_ratio", "rerank"})


_PARAMS_SEEN: dict[tuple, SearchParams] = {}  # checked parameter sets, as passed (at most 256)


def search_params(params: dict) -> SearchParams:
    """``SearchParams(**params)``, checked once per distinct set of values (memoised: a search
    passing ``nprobe=32`` costs a dict look-up, not a validation)."""
    try:
        key = (*params.items(), *map(type, params.values()))  # the types too: True == 1 == 1.0 as keys
        seen = _PARAMS_SEEN.get(key)
    except TypeError:  # an unhashable value: validated below (and rejected)
        key, seen = None, None
    if seen is not None:
        return seen
    unknown = params.keys() - _SEARCH_KEYS
    if unknown:
        raise InvalidArgument(f"unknown search parameter(s) {sorted(unknown)}; use {sorted(_SEARCH_KEYS)}")
    checked = SearchParams(**params)
    if key is not None and len(_PARAMS_SEEN) < 256:
        _PARAMS_SEEN[key] = checked
    return checked
