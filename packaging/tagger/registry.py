"""Register a logged model as a new version and promote a version (stage + alias)."""
from __future__ import annotations

import warnings

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tagger.config import CHAMPION_ALIAS, PRODUCTION_STAGE
from tagger.errors import RunSelectionError


def register_version(model_uri: str, name: str, tags: dict[str, str], description: str) -> ModelVersion:
    """A new version of `name` (created if needed) with tags and a description."""
    version = mlflow.register_model(model_uri, name, tags=tags)
    return MlflowClient().update_model_version(name, version.version, description=description)


def newest_version(name: str) -> str:
    """The highest version number of a registered model."""
    versions = MlflowClient().search_model_versions(f"name = '{name}'")
    if not versions:
        raise RunSelectionError(f"registered model {name!r} has no versions; run the package command first")
    return str(max(int(v.version) for v in versions))


def promote(name: str, version: str | None = None) -> ModelVersion:
    """Make a version the one served: stage Production (archiving the previous) and alias champion."""
    client = MlflowClient()
    version = str(version or newest_version(name))
    with warnings.catch_warnings():  # stages are deprecated in favour of aliases; we keep both working
        warnings.simplefilter("ignore", FutureWarning)
        client.transition_model_version_stage(name, version, PRODUCTION_STAGE, archive_existing_versions=True)
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    return client.get_model_version(name, version)


def champion_version(name: str) -> str | None:
    """The version the champion alias points to, or None when there is no champion yet."""
    try:
        return MlflowClient().get_model_version_by_alias(name, CHAMPION_ALIAS).version
    except MlflowException as error:  # no such model: RESOURCE_DOES_NOT_EXIST; no such alias: INVALID_PARAMETER_VALUE
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
