"""Typed errors of the build-side commands (training, packaging, promotion), one line each on the CLI."""
from __future__ import annotations

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
