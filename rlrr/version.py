"""The package version, in a module of its own so that code inside the package reads it without importing
the package root (no arrow runs back up the import graph)."""
__version__ = "0.1.0"
