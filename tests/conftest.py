"""Shared fixtures: a tiny BERT encoder and checkpoint, a fresh sqlite MLflow store per test, and the
session's one packaged model (the helpers they use are in helpers.py)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from helpers import (
    PackagedModel, build_tiny_checkpoint, build_tiny_encoder, copy_empty_store, log_training_run, make_empty_store,
    mlflow_store,
)

PACKAGED_MAX_REQUEST_ROWS = 100  # given, not measured at packaging: the same limit on every machine


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """Folder with the tiny encoder's config and tokenizer."""
    return build_tiny_encoder(tmp_path_factory.mktemp("encoder"))


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_encoder) -> Path:
    """A checkpoint folder of a tiny model (seed 0)."""
    return build_tiny_checkpoint(tmp_path / "checkpoint", tiny_encoder, seed=0)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An empty sqlite store with MLflow's tables, made once: each fresh store is a copy of it."""
    return make_empty_store(tmp_path_factory.mktemp("empty-store"))


@pytest.fixture
def tracking_uri(tmp_path, empty_store) -> Iterator[str]:
    """A fresh sqlite tracking store + registry with local artifacts (cwd: tmp_path), used by this test alone."""
    with mlflow_store(copy_empty_store(empty_store, tmp_path), cwd=tmp_path) as uri:
        yield uri


@pytest.fixture(scope="session")
def packaged(tmp_path_factory, tiny_encoder, empty_store) -> Iterator[PackagedModel]:
    """The one store-and-package of the session: a training run of a tiny checkpoint (seed 2, val_loss 0.4)
    in a sqlite store, packaged torch-fp32 with `tagger package`'s code, registered as tagger v1 and
    promoted to @champion; loaded once and downloaded once. The store is in use only while it is built:
    a test that needs it as the current store asks for `packaged_store`."""
    from mlflow_model.config import PredictorConfig
    from tagger.config import PackageConfig
    from tagger.package import package_best_run
    from tagger.registry import promote

    folder = tmp_path_factory.mktemp("packaged")
    with mlflow_store(copy_empty_store(empty_store, folder), cwd=folder) as uri:
        checkpoint = build_tiny_checkpoint(folder / "checkpoint", tiny_encoder, seed=2)
        run_id = log_training_run("exp", checkpoint, 0.4)
        config = PackageConfig(experiment_name="exp", base_model=str(tiny_encoder),
                               predictor=PredictorConfig(max_request_rows=PACKAGED_MAX_REQUEST_ROWS))
        version = promote("tagger", package_best_run(config).version)
        model_uri = "models:/tagger@champion"
        model = mlflow.pyfunc.load_model(model_uri)
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(folder / "local")))
    yield PackagedModel(tracking_uri=uri, folder=folder, model_uri=model_uri, version=str(version.version),
                        run_id=run_id, checkpoint=checkpoint, model=model, local=local,
                        max_request_rows=PACKAGED_MAX_REQUEST_ROWS)
    model.unwrap_python_model().predictor.close()


@pytest.fixture
def packaged_store(packaged, tmp_path) -> Iterator[PackagedModel]:
    """The shared packaged model with its store as the current one (MLFLOW_TRACKING_URI too) for this test.

    For reading and loading only: registering, evaluating or promoting would change what the
    other tests read.
    """
    with mlflow_store(packaged.tracking_uri, cwd=tmp_path):
        yield packaged
