"""The library version (one place: the package, the dispatch cache file's name)."""

__version__ = "0.1.0"
