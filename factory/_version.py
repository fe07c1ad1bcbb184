"""The package version, importable without importing anything else of the project."""

__version__ = "0.1.0"
