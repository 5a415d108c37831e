"""Helpers for tests and benchmarks (not needed at run time)."""

from .fault_proxy import FaultProxy
from .moto_server import MotoServer

__all__ = ["FaultProxy", "MotoServer"]
