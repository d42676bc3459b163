"""The package version, importable from any layer without importing ``echo``'s public API."""

__all__ = ["__version__"]

__version__ = "0.1.0"
