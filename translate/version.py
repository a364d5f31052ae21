"""The package version, written into exported generators' metadata."""

__version__ = "0.1.0"
