"""What packaging records in MLflow: each setting once, the manifest as one artifact, names not paths, linked runs."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from conftest import build_tiny_checkpoint, log_training_run
from mlflow.tracking import MlflowClient

from mlflow_model.config import PredictorConfig
from mlflow_model.integrity import MANIFEST_FILE
from tagger.config import PackageConfig
from tagger.package import package_best_run


@pytest.fixture
def packaged(tmp_path, tiny_encoder, tracking_uri) -> dict:
    """One training run packaged as torch-fp32: the version, the training run and the package run."""
    training = log_training_run("exp", build_tiny_checkpoint(tmp_path / "ckpt", tiny_encoder, seed=1), 0.4)
    mlflow.set_experiment("Default")  # as in a fresh `tagger package`: the current experiment is not the run's
    version = package_best_run(PackageConfig(experiment_name="exp", base_model=str(tiny_encoder)))
    client = MlflowClient()
    return {"version": version, "training": client.get_run(training), "package": client.get_run(version.run_id)}


def test_the_package_run_logs_each_setting_once_and_the_manifest_as_one_artifact(packaged, tiny_encoder):
    params = packaged["package"].data.params
    settings = PredictorConfig().to_dict()
    assert {f"predictor.{name}" for name in settings} <= params.keys()
    assert not [name for name in params if name in settings]  # no second, bare copy of a setting
    assert not [name for name in params if "sha256" in name]  # the manifest is no param
    assert params["predictor.forward"] == "shipped_trace"
    assert params["predictor.max_request_rows"] != "None"  # the value the model ships with, measured at packaging
    assert params["encoder"] == tiny_encoder.name and str(tiny_encoder) not in json.dumps(params)

    local = Path(mlflow.artifacts.download_artifacts(f"models:/tagger/{packaged['version'].version}"))
    manifest = json.loads((local / "artifacts" / MANIFEST_FILE).read_text())
    assert "checkpoint/model.safetensors" in manifest and "encoder/tokenizer.json" in manifest
    config = mlflow.models.Model.load(str(local / "MLmodel")).flavors["python_function"]["config"]
    assert "artifact_sha256" not in config and config["max_request_rows"] == int(params["predictor.max_request_rows"])


def test_the_training_and_package_runs_both_list_the_logged_model_that_became_the_version(packaged):
    package_outputs = [output.model_id for output in packaged["package"].outputs.model_outputs]
    training_outputs = [output.model_id for output in packaged["training"].outputs.model_outputs]
    assert len(package_outputs) == 1 and training_outputs == package_outputs
    model = MlflowClient().get_logged_model(package_outputs[0])
    assert model.source_run_id == packaged["package"].info.run_id
    assert model.experiment_id == packaged["package"].info.experiment_id  # not the Default experiment
    assert model.params["forward"] == "shipped_trace"  # the model page shows the settings, each once
    assert packaged["version"].run_id == packaged["package"].info.run_id
