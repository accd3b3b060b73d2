"""Typed errors of the build-side commands (training, packaging, promotion), one line each on the CLI."""
from __future__ import annotations

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from mlflow_model.errors import TaggerError


class RunSelectionError(TaggerError):
    """No run, checkpoint or model version can be selected from what the user named."""

    error_code = RESOURCE_DOES_NOT_EXIST


class PromotionRefused(TaggerError):
    """The promotion gate kept the champion: the challenger scored worse on the evaluation set."""


class DatasetError(TaggerError):
    """A dataset cannot be read, lacks a column, has unlabelled rows or too few rows per tag."""


class TrainConfigError(TaggerError):
    """A training setting is out of range (e.g. an unknown scheduler, zero epochs)."""


class BuildError(TaggerError):
    """An engine x precision that does not exist, or a build that failed its check against torch fp32."""


class ServiceError(TaggerError):
    """A tracking server or Ray cluster cannot be reached or joined, or a job on it lost or duplicated rows."""


def one_line(error: BaseException) -> str:
    """An error as one line: the first line of its message (an MlflowException's own), else its type."""
    text = error.message if isinstance(error, MlflowException) else str(error)
    return (text.strip().splitlines() or [type(error).__name__])[0]
