"""srw: run your own Python next to your data."""
from importlib import metadata

try:
    __version__ = metadata.version("srw")  # pyproject.toml's, defined there once
except metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
