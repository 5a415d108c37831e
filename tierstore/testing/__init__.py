"""Helpers for tests and benchmarks (not needed at run time)."""

from .moto_server import MotoServer

__all__ = ["MotoServer"]
