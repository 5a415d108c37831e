"""Optional dependencies, imported when first needed, with an error that says what to install.

torch (extra ``kv``) and transformers (extra ``hf``) are never imported by vector search
or the Lambda handler; the modules that use them call :func:`torch` / :func:`transformers`
where they run.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from .errors import ConfigError

__all__ = ["require", "torch", "transformers"]


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise :class:`ConfigError` naming the extra that brings it."""
    found = sys.modules.get(module)
    if found is not None:
        return found
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{purpose} needs {module}: pip install 'tierstore[{extra}]'") from exc


def torch() -> ModuleType:
    """The torch module (extra ``kv``)."""
    return require("torch", "kv", "this part of tierstore (KV caches, GPU tier, torch scanning)")


def transformers() -> ModuleType:
    """The transformers module (extra ``hf``)."""
    return require("transformers", "hf", "transformers interop (cache objects, model loading, CacheBlend)")
