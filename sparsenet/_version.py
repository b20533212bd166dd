"""The package version, in a leaf module: ``io`` and ``ops`` read it without importing the package root."""
__version__ = "0.1.0"  # keep equal to pyproject.toml's [project] version
