"""The package version (layer 1: the OpenAPI document and the package root read it)."""

__version__ = "0.1.0"
