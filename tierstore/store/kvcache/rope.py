"""Re-rotating cached RoPE keys to new positions (non-prefix KV reuse).

A Llama-style model stores its keys *after* rotary position embedding: the key of a
token at position ``p`` is ``s * R(p) k`` where ``R(p)`` rotates each pair of channels
``(i, i + head_dim/2)`` by the angle ``p * inv_freq[i]`` (the transformers
``rotate_half`` convention) and ``s`` is the rope type's ``attention_scaling`` (1 for
plain RoPE, not 1 for e.g. YaRN). Rotations compose, ``R(p + d) = R(d) R(p)``, so a
chunk's cached keys move to positions ``p + d`` by one more rotation by ``d * inv_freq``,
with no model call: :func:`rerotate_keys`. The scale ``s`` is already inside the cached
keys and must not be applied again, which is why the re-rotation uses plain ``cos`` /
``sin`` where transformers multiplies them by ``attention_scaling``.

Values carry no position and are reused as they are. Only rope types whose frequencies
are fixed can be re-rotated: ``"dynamic"`` and ``"longrope"`` change ``inv_freq`` with
the sequence length, so :meth:`RopeSpec.from_model` refuses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import ConfigError, InvalidArgument, InvalidType
from ..._optional import torch as _torch

__all__ = ["RopeSpec", "rerotate_keys"]

# rope types whose inv_freq depends on the sequence length seen in the forward pass
_LENGTH_DEPENDENT = frozenset({"dynamic", "longrope"})


@dataclass(frozen=True)
class RopeSpec:
    """The rotary frequencies of a model: ``inv_freq`` (float32, ``head_dim / 2``).

    ``attention_scaling`` is the factor transformers multiplies ``cos`` / ``sin`` by for
    this rope type; it is recorded for reference and deliberately *not* applied by
    :func:`rerotate_keys`, because cached keys already carry it.
    Build one with :meth:`from_model` (honours llama3 / linear / YaRN scaling) or
    :meth:`from_theta` (plain RoPE).
    """

    inv_freq: Any
    attention_scaling: float = 1.0

    def __post_init__(self) -> None:
        torch = _torch()
        if not isinstance(self.inv_freq, torch.Tensor) or self.inv_freq.ndim != 1 or self.inv_freq.numel() == 0:
            raise InvalidType("inv_freq must be a non-empty 1-D torch.Tensor (head_dim / 2 frequencies)")
        object.__setattr__(self, "inv_freq", self.inv_freq.detach().to(torch.float32))
        object.__setattr__(self, "attention_scaling", float(self.attention_scaling))

    @property
    def head_dim(self) -> int:
        """The key width these frequencies rotate (twice the number of frequencies)."""
        return 2 * self.inv_freq.numel()

    @classmethod
    def from_theta(cls, head_dim: int, theta: float = 10000.0) -> RopeSpec:
        """Plain RoPE: ``inv_freq[i] = theta ** (-2 i / head_dim)``."""
        torch = _torch()
        if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0 or head_dim % 2:
            raise InvalidArgument(f"head_dim must be a positive even int, got {head_dim!r}")
        if not theta > 0:
            raise InvalidArgument(f"theta must be positive, got {theta!r}")
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        return cls(inv_freq=1.0 / (float(theta) ** exponents))

    @classmethod
    def from_model(cls, model: Any) -> RopeSpec:
        """The frequencies of a transformers model's rotary embedding (``model.model.rotary_emb``).

        Raises :class:`ConfigError` for a model without one, or with a rope type whose
        frequencies depend on the sequence length (``"dynamic"``, ``"longrope"``).
        """
        base = getattr(model, "model", model)
        rotary = getattr(base, "rotary_emb", None)
        inv_freq = getattr(rotary, "inv_freq", None)
        if inv_freq is None:
            raise ConfigError(f"{type(model).__name__} has no rotary embedding with inv_freq "
                              "(expected model.model.rotary_emb, as in Llama-architecture models)")
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type in _LENGTH_DEPENDENT:
            raise ConfigError(f"rope type {rope_type!r} changes its frequencies with the sequence length; "
                              "cached keys cannot be re-rotated exactly, recompute them instead")
        return cls(inv_freq=inv_freq, attention_scaling=getattr(rotary, "attention_scaling", 1.0))


def _rotate_half(x: Any) -> Any:
    half = x.shape[-1] // 2
    return _torch().cat((-x[..., half:], x[..., :half]), dim=-1)


def _delta_tensor(delta: Any, tokens: int, device: Any) -> Any:
    torch = _torch()
    if isinstance(delta, bool):
        raise InvalidType("delta must be an int or a 1-D integer tensor, got a bool")
    if isinstance(delta, int):
        return torch.tensor(float(delta), device=device)
    if not isinstance(delta, torch.Tensor):
        raise InvalidType(f"delta must be an int or a 1-D integer tensor, got {type(delta).__name__}")
    if delta.is_floating_point() or delta.is_complex() or delta.dtype == torch.bool:
        raise InvalidType(f"delta must hold integer position offsets, got dtype {delta.dtype}")
    if delta.ndim == 0:
        return delta.to(device=device, dtype=torch.float32)
    if delta.ndim != 1 or delta.numel() != tokens:
        raise InvalidArgument(f"a per-token delta must be 1-D with one offset per token ({tokens}), "
                              f"got shape {tuple(delta.shape)}")
    return delta.to(device=device, dtype=torch.float32)[:, None]


def rerotate_keys(keys: Any, delta: Any, rope: RopeSpec) -> Any:
    """Post-RoPE ``keys`` computed at positions ``p`` as they would be at ``p + delta``.

    :param keys: ``(kv_heads, tokens, head_dim)`` or batch-1 ``(1, kv_heads, tokens, head_dim)``,
        any dtype and device; the result has the same shape, dtype and device.
    :param delta: the position offset: an int (every token moves alike) or a 1-D integer
        tensor with one offset per token. Negative offsets move keys back.
    :param rope: the model's frequencies (:meth:`RopeSpec.from_model`).

    Computed in float32. ``rope.attention_scaling`` is not applied (keys already carry it).
    """
    torch = _torch()
    if not isinstance(keys, torch.Tensor):
        raise InvalidType(f"keys must be a torch.Tensor, got {type(keys).__name__}")
    if keys.ndim not in (3, 4) or (keys.ndim == 4 and keys.shape[0] != 1):
        raise InvalidArgument("keys must be (kv_heads, tokens, head_dim) or (1, kv_heads, tokens, head_dim), "
                              f"got shape {tuple(keys.shape)}")
    if keys.shape[-1] != rope.head_dim:
        raise InvalidArgument(f"keys have head_dim {keys.shape[-1]} but the rope rotates {rope.head_dim} channels")
    offsets = _delta_tensor(delta, keys.shape[-2], keys.device)
    angles = offsets * rope.inv_freq.to(keys.device)  # (head_dim/2,) or (tokens, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)
    k = keys.to(torch.float32)
    return (k * angles.cos() + _rotate_half(k) * angles.sin()).to(keys.dtype)
