"""Rows to examples: reading and tokenizing rows, batching, the embedded model and data."""
