"""Typed errors of the build-side commands (training, packaging, promotion, batch jobs), one line each on the CLI.

The served model's own errors (bad input, config, checkpoint and integrity, builds, inference) are in
`mlflow_model.errors`; BuildError is re-exported here, since packaging raises it too.
"""
from __future__ import annotations

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, RESOURCE_DOES_NOT_EXIST, UNAUTHENTICATED

from mlflow_model.errors import BuildError, TaggerError

__all__ = [
    "AuthenticationError", "BuildError", "DatasetError", "OptionError", "PermissionDeniedError", "PromotionRefused", "RunSelectionError", "ServiceError",
    "TrainConfigError", "TrainingError", "one_line",
]


class RunSelectionError(TaggerError):
    """No run, checkpoint or model version can be selected from what the user named."""

    error_code = RESOURCE_DOES_NOT_EXIST


class PromotionRefused(TaggerError):
    """The promotion gate kept the champion: the challenger scored worse on the evaluation set."""


class DatasetError(TaggerError):
    """A dataset cannot be read, lacks a column, has unlabelled rows or too few rows per tag."""


class TrainConfigError(TaggerError):
    """A training setting is out of range (e.g. an unknown scheduler, zero epochs)."""


class OptionError(TaggerError):
    """A command-line option (or the config it fills) has a value the command cannot run with."""


class TrainingError(TaggerError):
    """A training or sweep job ended without what it must produce (e.g. no checkpoint reported)."""


class ServiceError(TaggerError):
    """A tracking server or Ray cluster cannot be reached or joined, or a job on it lost or duplicated rows."""


class AuthenticationError(TaggerError):
    """The tracking server does not know the user or password it was sent (HTTP 401)."""

    error_code = UNAUTHENTICATED


class PermissionDeniedError(TaggerError):
    """The tracking server knows the user, who lacks the permission an action needs (HTTP 403)."""

    error_code = PERMISSION_DENIED


def one_line(error: BaseException) -> str:
    """An error as one line: the first line of its message (an MlflowException's own), else its type."""
    text = error.message if isinstance(error, MlflowException) else str(error)
    return (text.strip().splitlines() or [type(error).__name__])[0]
