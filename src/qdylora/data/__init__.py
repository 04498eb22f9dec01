"""Rows to examples: reading and tokenizing rows, batching, the embedded model and data."""

from .rows import read_rows  # `from qdylora.data import read_rows`, as before the stages had folders

__all__ = ["read_rows"]
