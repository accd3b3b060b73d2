"""What packaging records in MLflow: each setting once, the manifest as one artifact, names not paths, linked runs."""
from __future__ import annotations

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mlflow_model.config import PredictorConfig
from mlflow_model.integrity import MANIFEST_FILE


@pytest.fixture
def records(packaged_store) -> dict:
    """The shared packaged model's records: its version, the training run and the package run."""
    client = MlflowClient()
    version = client.get_model_version("tagger", packaged_store.version)
    return {"version": version, "training": client.get_run(packaged_store.run_id),
            "package": client.get_run(version.run_id)}


def test_the_package_run_logs_each_setting_once_and_the_manifest_as_one_artifact(records, packaged, tiny_encoder):
    params = records["package"].data.params
    settings = PredictorConfig().to_dict()
    assert {f"predictor.{name}" for name in settings} <= params.keys()
    assert not [name for name in params if name in settings]  # no second, bare copy of a setting
    assert not [name for name in params if "sha256" in name]  # the manifest is no param
    assert params["predictor.forward"] == "shipped_trace"
    assert params["predictor.max_request_rows"] == str(packaged.max_request_rows)  # the value the model ships with
    assert params["encoder"] == tiny_encoder.name and str(tiny_encoder) not in json.dumps(params)

    manifest = json.loads((packaged.local / "artifacts" / MANIFEST_FILE).read_text())
    assert "checkpoint/model.safetensors" in manifest and "encoder/tokenizer.json" in manifest
    config = mlflow.models.Model.load(str(packaged.local / "MLmodel")).flavors["python_function"]["config"]
    assert "artifact_sha256" not in config and config["max_request_rows"] == int(params["predictor.max_request_rows"])


def test_the_training_and_package_runs_both_list_the_logged_model_that_became_the_version(records):
    package_outputs = [output.model_id for output in records["package"].outputs.model_outputs]
    training_outputs = [output.model_id for output in records["training"].outputs.model_outputs]
    assert len(package_outputs) == 1 and training_outputs == package_outputs
    model = MlflowClient().get_logged_model(package_outputs[0])
    assert model.source_run_id == records["package"].info.run_id
    assert model.params["forward"] == "shipped_trace"  # the model page shows the settings, each once
    assert records["version"].run_id == records["package"].info.run_id
