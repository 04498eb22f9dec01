"""The package version, in a module of its own so inner modules import it without going through
the package face (`qdylora/__init__.py` imports every stage)."""

__version__ = "0.1.0"
