"""Typed errors of the served model, one class per cause, with messages a user can act on.

They subclass MlflowException so that the MLflow scoring server answers them with their own
message and HTTP status (400 for bad input, 500 for a failed forward pass) instead of a generic
error with a traceback.
"""
from __future__ import annotations

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE


class TaggerError(MlflowException):
    """Base class of every error tagger raises on purpose."""

    error_code = INVALID_PARAMETER_VALUE

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=self.error_code)


class InvalidInputError(TaggerError):
    """A prediction request has a bad column, value or parameter (HTTP 400)."""


class ConfigError(TaggerError):
    """A predictor setting (given at packaging or as `model_config` at load) has a value it cannot run with."""


class CheckpointError(TaggerError):
    """A model's files are missing, unreadable or disagree with each other, or its forward path cannot run."""


class IntegrityError(CheckpointError):
    """A model's files differ from the manifest recorded when it was packaged."""


class SignatureError(IntegrityError):
    """A model does not verify against the team's public key: unsigned, signed by another key, or changed since signing."""


class BuildError(TaggerError):
    """A build (engine x precision) could not be made, or failed its check against the torch fp32 model."""


class InferenceError(TaggerError):
    """A forward pass failed or did not answer in time (HTTP 500, message without traceback)."""

    error_code = INTERNAL_ERROR
