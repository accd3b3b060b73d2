"""Typed errors of the served model, with messages a user can act on.

They subclass MlflowException so that the MLflow scoring server answers them with their own
message and HTTP status (400 for bad input) instead of a generic error with a traceback.
"""
from __future__ import annotations

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


class TaggerError(MlflowException):
    """Base class of every error tagger raises on purpose."""

    error_code = INVALID_PARAMETER_VALUE

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=self.error_code)


class InvalidInputError(TaggerError):
    """A prediction request has a bad column, value or parameter (HTTP 400)."""


class CheckpointError(TaggerError):
    """A checkpoint folder is missing a file or its files disagree with each other."""


class ConfigError(TaggerError):
    """A predictor setting (given at packaging or as `model_config` at load) has a value it cannot run with."""
