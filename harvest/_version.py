"""The package version, in a module of its own so that the runner can record it without importing
the ``harvest`` package's facade (which imports the runner)."""

__version__ = "0.1.0"
