"""The package version (one place; `mcit.__version__`, model cards and Hub commits read it)."""

__version__ = "0.1.0"
