"""The errors of the models package: a model that cannot be found, fetched, converted or loaded."""

from __future__ import annotations

from kvstore.errors import StoreError


class ModelLoadError(StoreError):
    """The model could not be found, fetched or loaded; the message says how to get it."""


class ModelFileError(ModelLoadError):
    """A model file is damaged, truncated or of a kind the converter does not support (the file is named)."""
